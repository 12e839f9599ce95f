"""int8 quantization after compression (`--then-quantize`): Constant weights become
initializers, every mode writes int8 weights that onnxruntime runs close to the original, the
report gives the errors before and after, and bad requests are one-line errors."""
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from helpers.graphs import cnn_model, feeds_for, mlp_model, rel_error, run
from onnx_lrsd.api import compress
from onnx_lrsd.cli import main
from onnx_lrsd.config import CompressConfig
from onnx_lrsd.plan.cost import count_params
from onnx_lrsd.errors import LrsdError
from onnx_lrsd.runtime.quantize import constants_to_initializers, int8_weights, integer_nodes, quantize_model


def _calibration(model, n=4, batch=8, seed=3):
    return [feeds_for(model, seed=seed + i, batch=batch) for i in range(n)]


def _with_constant_weights(model):
    """The same model with every initializer held in a Constant node."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    nodes = [onnx.helper.make_node("Constant", [], [t.name], value=t) for t in model.graph.initializer]
    del model.graph.initializer[:]
    nodes.extend(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def test_constants_become_initializers_and_outputs_stay_equal():
    model = _with_constant_weights(mlp_model(batch=3))
    feeds = feeds_for(model, batch=3)
    before = run(model, feeds)[0]
    moved = constants_to_initializers(model)
    assert moved == 6 and not any(n.op_type == "Constant" for n in model.graph.node)
    assert {t.name for t in model.graph.initializer} >= {"enc/fc1.weight", "dec/fc.bias"}
    np.testing.assert_array_equal(run(model, feeds)[0], before)


@pytest.mark.parametrize("mode", ["dynamic", "dynamic-matmul", "static"])
def test_every_mode_writes_int8_weights_close_to_the_original(mode):
    model = mlp_model(sizes=(64, 128, 96, 16), batch="batch")
    calibration = _calibration(model)
    quantized = quantize_model(_with_constant_weights(model), mode, calibration)
    count, share = int8_weights(quantized)
    weights = 64 * 128 + 128 * 96 + 96 * 16
    assert count >= weights and share > 0.9
    assert integer_nodes(quantized) >= 3
    assert count_params(quantized) >= weights  # int8 weights are parameters
    feeds = feeds_for(model, seed=11, batch=8)
    error = rel_error(run(model, feeds)[0], run(quantized, feeds)[0])
    assert 0 < error < 0.03


def test_static_quantization_converts_an_old_opset():
    model = cnn_model(opset=11)
    quantized = quantize_model(model, "static", _calibration(model, batch=1))
    assert next(o.version for o in quantized.opset_import if o.domain in ("", "ai.onnx")) >= 13
    feeds = feeds_for(model, seed=5, batch=1)
    assert rel_error(run(model, feeds)[0], run(quantized, feeds)[0]) < 0.05


def test_bad_requests_are_one_line_errors():
    model = mlp_model()
    with pytest.raises(LrsdError, match="needs calibration"):
        quantize_model(model, "static")
    with pytest.raises(LrsdError, match="unknown quantization mode"):
        quantize_model(model, "int4")
    with pytest.raises(LrsdError, match="unknown then_quantize"):
        CompressConfig(then_quantize="fp8")


def test_compress_then_quantize_reports_errors_before_and_after():
    model = mlp_model(sizes=(64, 128, 96, 16), batch="batch")
    calibration = _calibration(model, n=10)
    plain = compress(model, calibration=calibration, keep=0.5)
    result = compress(model, calibration=calibration, keep=0.5, then_quantize="static")
    quantization = result.report.quantization
    assert quantization is not None and quantization.mode == "static"
    assert quantization.output_errors_before == plain.report.output_errors
    assert result.report.output_errors == quantization.output_errors
    error = quantization.output_errors["y"]
    assert plain.report.output_errors["y"] <= error < plain.report.output_errors["y"] + 0.05
    assert len(result.model.SerializeToString()) < 0.5 * len(plain.model.SerializeToString())
    assert result.report.after.params == count_params(result.model)


def test_stages_quantize_once_at_the_end():
    model = mlp_model(sizes=(64, 128, 96, 16), batch="batch")
    result = compress(model, calibration=_calibration(model, n=10), keep=0.3, stages=2,
                      then_quantize="dynamic-matmul")
    assert len(result.report.stages) == 2 and result.report.quantization.mode == "dynamic-matmul"
    assert sum(n.op_type == "DynamicQuantizeLinear" for n in result.model.graph.node) >= 3
    assert result.report.output_errors == result.report.quantization.output_errors


def test_cli_then_quantize(tmp_path):
    model = mlp_model(sizes=(64, 128, 96, 16), batch="batch")
    source, output, report = tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "r.json"
    source.write_bytes(model.SerializeToString())
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.concatenate([f["x"] for f in _calibration(model, n=6)]))
    result = CliRunner().invoke(main, ["compress", str(source), "-o", str(output), "--calib", str(calib),
                                       "--keep", "0.5", "--then-quantize", "dynamic", "--report", str(report), "-q",
                                       "--accept-error"])
    assert result.exit_code == 0, result.output
    assert "int8 (dynamic)" in result.output
    data = json.loads(report.read_text())
    assert data["quantization"]["mode"] == "dynamic" and data["quantization"]["int8_share"] > 0.9
    assert output.stat().st_size < 0.5 * source.stat().st_size
    result = CliRunner().invoke(main, ["compress", str(source), "-o", str(tmp_path / "s.onnx"),
                                       "--then-quantize", "static", "-q"])
    assert result.exit_code == 1 and "needs calibration" in result.output
    assert not (tmp_path / "s.onnx").exists()


def test_the_metric_search_judges_the_quantized_model():
    model = mlp_model(sizes=(64, 128, 96, 16), batch="batch")
    calibration = _calibration(model, n=10)
    feeds = feeds_for(model, seed=21, batch=32)
    reference = run(model, feeds)[0]
    seen = []

    def fidelity(candidate):
        seen.append(int8_weights(candidate)[0])
        return 1.0 - rel_error(reference, run(candidate, feeds)[0])

    result = compress(model, calibration=calibration, metric=fidelity, max_metric_drop=0.45,
                      then_quantize="dynamic-matmul")
    assert seen[0] == 0 and len(seen) > 2 and all(count > 0 for count in seen[1:])
    allocation = result.report.allocation
    assert allocation.metric >= 1.0 - 0.45 and result.report.quantization.mode == "dynamic-matmul"
    assert 1.0 - rel_error(reference, run(result.model, feeds)[0]) == pytest.approx(allocation.metric, abs=1e-6)
