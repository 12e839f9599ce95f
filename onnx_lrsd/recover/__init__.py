"""Recovery: fine-tune a compressed model against the original (distillation) with gradients
that onnxruntime computes on an adjoint ONNX graph; no training framework."""
