"""int8 quantization with onnxruntime's quantizer, as a pipeline's last step or on its own.

Three modes, because on CPU their speed and accuracy differ by model (which one wins is
measured per model, not assumed):

- ``dynamic``: ``quantize_dynamic`` on every op type it supports (MatMul, Conv, Gather, ...);
  weights int8, activations quantized at run time. Its ConvInteger can run slower than fp32 Conv.
- ``dynamic-matmul``: ``quantize_dynamic`` on MatMul only (the low-rank chains are MatMuls).
- ``static``: ``quantize_static`` in QDQ format, activation ranges calibrated (MinMax) on the
  same calibration batches as the compression; uint8 activations, int8 per-channel weights.

onnxruntime's quantizer refuses weights held in ``Constant`` nodes, so they become
initializers first; the model is staged in a temporary directory (the quantizer works on files
and writes external data for large models), and the quantizer runs with that directory as the
working directory: some of its helpers write scratch files into the current directory (the
symbolic shape inference leaves ``sym_shape_infer_temp.onnx`` and its ``*.data`` there when it
cannot infer every shape), which must never land in the user's.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx

from .calibrate import ListReader
from ..config import QUANTIZE_MODES
from ..errors import LrsdError
from ..model.io import default_opset, load_model, save_model, temporary_directory
from ..report.types import QuantizationSummary

log = logging.getLogger(__name__)

STATIC_MIN_OPSET = 13
"""Per-channel QDQ (QuantizeLinear with an axis) needs opset 13."""

INTEGER_OPS = frozenset({"MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul",
                         "QuantizeLinear", "DequantizeLinear", "QLinearMatMul", "QLinearConv", "QGemm",
                         "MatMulIntegerToFloat", "QAttention", "QEmbedLayerNormalization"})


class _WithoutPreprocessingHint(logging.Filter):
    """Drops the quantizer's root-logger advice to run its shape-inference pre-processing
    (which fails on models with incomplete symbolic shapes, PP-OCR among them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Move the tensors of main-graph ``Constant`` nodes (``value`` attribute) into
    initializers of the same name, in place; returns how many moved."""
    graph = model.graph
    keep, moved = [], 0
    for node in graph.node:
        value = next((a for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and value is not None:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value.t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            moved += 1
        else:
            keep.append(node)
    if moved:
        del graph.node[:]
        graph.node.extend(keep)
    return moved


def _prepared(model: onnx.ModelProto, mode: str) -> onnx.ModelProto:
    model = load_model(model)  # a copy
    constants_to_initializers(model)
    if mode == "static" and default_opset(model) < STATIC_MIN_OPSET:
        from onnx import version_converter

        try:
            model = version_converter.convert_version(model, STATIC_MIN_OPSET)
        except Exception as exc:  # the converter raises its own error types
            raise LrsdError(f"static quantization needs opset {STATIC_MIN_OPSET}; converting from opset "
                            f"{default_opset(model)} failed: {' '.join(str(exc).split())[:200]}") from None
    return model


@contextlib.contextmanager
def _working_directory(path: Path):
    """Run the block with `path` as the process's working directory, restored afterwards."""
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def quantize_model(model: onnx.ModelProto, mode: str, calibration: Sequence[Mapping[str, np.ndarray]] = (),
                   per_channel: bool = True) -> onnx.ModelProto:
    """The int8 model of `model` (not modified) in `mode` (see the module docstring).
    `calibration` (feed dicts) is required by ``static``."""
    if mode not in QUANTIZE_MODES:
        raise LrsdError(f"unknown quantization mode {mode!r}: choose one of {', '.join(QUANTIZE_MODES)}")
    if mode == "static" and not calibration:
        raise LrsdError("static quantization needs calibration data (--calib)")
    prepared = _prepared(model, mode)
    with temporary_directory("onnx_lrsd-quantize-") as tmp:
        source, target = Path(tmp) / "model.onnx", Path(tmp) / "model.int8.onnx"
        save_model(prepared, source)
        large = (Path(tmp) / "model.onnx.data").exists()
        hint = _WithoutPreprocessingHint()
        logging.getLogger().addFilter(hint)
        scratch = Path(tmp) / "scratch"
        scratch.mkdir()
        try:
            with _working_directory(scratch):
                _quantize(mode, source, target, calibration, per_channel, large)
        except LrsdError:
            raise
        except Exception as exc:  # the quantizer raises bare Exceptions and ValueErrors
            raise LrsdError(f"{mode} quantization failed: {' '.join(str(exc).split())[:300]}") from None
        finally:
            logging.getLogger().removeFilter(hint)
        quantized = load_model(target)
    quantized.ir_version = min(quantized.ir_version, max(prepared.ir_version, 3))
    log.info("%s quantization: %d int8 weights", mode, int8_weights(quantized)[0])
    return quantized


def _quantize(mode: str, source: Path, target: Path, calibration, per_channel: bool, large: bool) -> None:
    """onnxruntime's quantizer on the file `source`, writing `target`."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    if mode == "static":
        quantize_static(str(source), str(target), ListReader(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, use_external_data_format=large)
    else:
        quantize_dynamic(str(source), str(target), op_types_to_quantize=["MatMul"] if mode == "dynamic-matmul"
                         else None, per_channel=per_channel, weight_type=QuantType.QInt8,
                         use_external_data_format=large)


def int8_weights(model: onnx.ModelProto) -> tuple[int, float]:
    """(int8 / uint8 initializer elements, their share of all initializer elements)."""
    small = total = 0
    for tensor in model.graph.initializer:
        count = int(np.prod(tensor.dims)) if tensor.dims else 1
        total += count
        if tensor.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
            small += count
    return small, small / total if total else 0.0


def integer_nodes(model: onnx.ModelProto) -> int:
    """Nodes of the quantized op types (QDQ pairs and integer kernels)."""
    return sum(node.op_type in INTEGER_OPS for node in model.graph.node)


def summarize(quantized: onnx.ModelProto, mode: str, errors_before: Mapping[str, float],
              errors_after: Mapping[str, float]) -> QuantizationSummary:
    count, share = int8_weights(quantized)
    return QuantizationSummary(mode=mode, int8_weights=count, int8_share=share, integer_nodes=integer_nodes(quantized),
                               output_errors_before=dict(errors_before), output_errors=dict(errors_after))


__all__ = ["QUANTIZE_MODES", "QuantizationSummary", "constants_to_initializers", "quantize_model",
           "int8_weights", "integer_nodes", "summarize"]
