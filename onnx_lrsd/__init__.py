"""onnx_lrsd: low-rank + sparse compression of ONNX models, verified in onnxruntime.

    >>> import onnx_lrsd
    >>> result = onnx_lrsd.compress("model.onnx", keep=0.5)
    >>> result.report.params_ratio
    >>> recovered = onnx_lrsd.recover(result.model, "model.onnx", "calib.npz", steps=200)

The maths (`onnx_lrsd.decompose`, `onnx_lrsd.decompose.stats`) imports without onnx; the API below is
loaded on first use.
"""
__version__ = "0.1.0"

_API = {
    "compress": "api", "compress_file": "api", "inspect_model": "api", "sweep": "api", "CompressionResult": "api",
    "plot_sweep": "report.plot", "SweepReport": "report.types", "write_report": "report.render",
    "profile_layers": "runtime.profile",
    "CompressConfig": "config", "LayerOverride": "config", "load_config_file": "config",
    "LrsdError": "errors", "CompressionReport": "report.types", "InspectReport": "report.types",
    "recover": "recover", "recover_file": "recover", "RecoverConfig": "recover", "RecoveryReport": "recover",
}

__all__ = sorted(_API)


def __getattr__(name):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'onnx_lrsd' has no attribute {name!r}")
