"""Recovery: fine-tune a compressed model against the original (distillation) with gradients
that onnxruntime computes on an adjoint ONNX graph; no training framework.

    >>> import onnx_lrsd
    >>> result = onnx_lrsd.recover("small.onnx", "original.onnx", "calib.npz", steps=200)
    >>> result.report.error_after

The package itself is callable as `recover` (`onnx_lrsd.recover(...)` is
`onnx_lrsd.recover.recover(...)`: the subpackage's name would otherwise hide the function).
Modules load on first use (the report types import `types` without the adjoint engine).
"""
import sys
import types
_API = {
    "recover": "api", "recover_file": "api", "recover_models": "distill", "recover_at_level": "blockwise",
    "RecoveryResult": "distill",
    "LossGradient": "gradients", "UnsupportedOp": "gradients", "LeftAsFitted": "types", "RecoverConfig": "types",
    "RecoverProgress": "types", "RecoveryReport": "types",
}

__all__ = sorted(_API)


def __getattr__(name):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'onnx_lrsd.recover' has no attribute {name!r}")


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return self.recover(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
