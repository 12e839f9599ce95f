"""Recovery: fine-tune a compressed model against the original (distillation) with gradients
that onnxruntime computes on an adjoint ONNX graph; no training framework.

    >>> from onnx_lrsd.recover import recover
    >>> result = recover("small.onnx", "original.onnx", "calib.npz", steps=200)
    >>> result.report.error_after

Modules load on first use (the report types import `types` without the adjoint engine).
"""
_API = {
    "recover": "api", "recover_file": "api", "recover_models": "distill", "RecoveryResult": "distill",
    "LossGradient": "gradients", "UnsupportedOp": "gradients", "LeftAsFitted": "types", "RecoverConfig": "types",
    "RecoverProgress": "types", "RecoveryReport": "types",
}

__all__ = sorted(_API)


def __getattr__(name):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'onnx_lrsd.recover' has no attribute {name!r}")
