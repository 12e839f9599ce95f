"""Recovery: fine-tune a compressed model against the original (distillation) with gradients
that onnxruntime computes on an adjoint ONNX graph; no training framework."""
from .api import recover, recover_file
from .distill import RecoveryResult, recover_models
from .gradients import LossGradient, UnsupportedOp
from .types import LeftAsFitted, RecoverConfig, RecoverProgress, RecoveryReport

__all__ = ["recover", "recover_file", "recover_models", "RecoveryResult", "LossGradient", "UnsupportedOp",
           "LeftAsFitted", "RecoverConfig", "RecoverProgress", "RecoveryReport"]
