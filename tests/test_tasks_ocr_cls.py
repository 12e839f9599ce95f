"""The PP-OCR direction-classifier task: the copy with symbolic dims computes what the wheel's
model computes, the lines of a set alternate directions, and the original model tells them apart."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

if importlib.util.find_spec("rapidocr_onnxruntime") is None:
    pytest.skip("needs the rapidocr_onnxruntime wheel (pip install --no-deps rapidocr_onnxruntime==1.4.4)",
                allow_module_level=True)

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.tasks.ocr import evaluation_vocabulary, make_text, render_line, resize_norm_img  # noqa: E402
from benchmarks.tasks.ocr_cls import (CLEAN_STYLE, CLS_HEIGHT, CLS_WIDTH, cls_source_path, make_lines,  # noqa: E402
                                      write_symbolic_batch_copy)
from onnx_lrsd.model.io import load_model  # noqa: E402


def test_the_copy_loads_and_computes_what_the_wheels_model_computes(tmp_path):
    copy = tmp_path / "cls.onnx"
    write_symbolic_batch_copy(cls_source_path(), copy)
    wheel = load_model(cls_source_path())  # batch -1, height and width both '?': named on load
    assert [d.dim_param or d.dim_value for d in wheel.graph.input[0].type.tensor_type.shape.dim] == [
        "x_dim0", 3, "x_dim2", "x_dim3"]
    model = load_model(copy)
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "", "height", "width"]
    assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert len(model.graph.node) == len(onnx.load(str(cls_source_path())).graph.node)
    inputs, _ = make_lines(7, 5, evaluation_vocabulary(), (CLEAN_STYLE,))
    copied, original = (ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": inputs})[0]
                        for path in (copy, cls_source_path()))
    np.testing.assert_array_equal(copied, original)


def test_odd_lines_are_the_same_drawing_turned_by_180_degrees():
    inputs, labels = make_lines(11, 4, evaluation_vocabulary(), (CLEAN_STYLE,))
    assert labels.tolist() == [0, 1, 0, 1] and inputs.shape == (4, 3, CLS_HEIGHT, CLS_WIDTH)
    rng = np.random.default_rng([11, 1])
    crop = None
    while crop is None:
        crop = render_line(rng, make_text(rng, evaluation_vocabulary()), CLEAN_STYLE)
    np.testing.assert_array_equal(inputs[1], resize_norm_img(np.ascontiguousarray(crop[::-1, ::-1]), CLS_WIDTH,
                                                             CLS_HEIGHT))
    np.testing.assert_array_equal(inputs, make_lines(11, 4, evaluation_vocabulary(), (CLEAN_STYLE,))[0])


def test_the_original_model_tells_the_directions_apart():
    inputs, labels = make_lines(13, 40, evaluation_vocabulary(), (CLEAN_STYLE,))
    session = ort.InferenceSession(str(cls_source_path()), providers=["CPUExecutionProvider"])
    predicted = session.run(None, {"x": inputs})[0].argmax(axis=1)
    assert np.mean(predicted == labels) >= 0.9
