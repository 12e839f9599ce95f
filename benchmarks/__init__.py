"""Benchmarks of onnx_lrsd: real models and real tasks (see ``benchmarks/tasks``)."""
