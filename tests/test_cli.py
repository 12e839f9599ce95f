"""The `onnx-lrsd` command line through click's runner: exit codes, JSON output, one-line
errors, no partial output files."""
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from onnx_lrsd.cli import main

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "models" / "digits_cnn.onnx"
DIGITS_CALIB = REPO / "models" / "digits_calib.npz"


def _mlp(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((32, 64)).astype(np.float32)
    w2 = rng.standard_normal((64, 16)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")],
        "mlp", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 16])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


@pytest.fixture
def runner():
    return CliRunner()


def test_inspect_lists_targets_as_json(runner, tmp_path):
    result = runner.invoke(main, ["inspect", str(_mlp(tmp_path / "m.onnx")), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [t["name"] for t in report["targets"]] == ["fc1", "fc2"]
    assert report["targets"][0]["weight_shape"] == [32, 64]
    assert report["params"] == 32 * 64 + 64 * 16


def test_compress_full_rank_round_trip(runner, tmp_path):
    source = _mlp(tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    result = runner.invoke(main, ["compress", str(source), "-o", str(out), "--rank", "*=full", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["output_errors"]["y"] < 1e-5
    assert {layer["method"] for layer in report["layers"]} == {"svd"}
    x = np.random.default_rng(1).standard_normal((5, 32)).astype(np.float32)
    run = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
           for p in (source, out)]
    np.testing.assert_allclose(run[1], run[0], rtol=1e-4, atol=1e-4)


def test_compress_with_calibration_writes_report_file(runner, tmp_path):
    out, report_file = tmp_path / "d.onnx", tmp_path / "report.json"
    result = runner.invoke(main, ["compress", str(DIGITS), "-o", str(out), "--calib", str(DIGITS_CALIB),
                                  "--keep", "0.25", "--report", str(report_file), "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads(report_file.read_text())
    assert report["params_ratio"] < 0.3
    fc1 = next(layer for layer in report["layers"] if layer["name"] == "fc1")
    assert fc1["method"] == "svd" and fc1["data_error"] is not None and fc1["data_error"] < 0.5
    assert onnx.load(str(out)).graph.output[0].name == "logits"


def test_bench_compares_two_models(runner, tmp_path):
    source = _mlp(tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    assert runner.invoke(main, ["compress", str(source), "-o", str(out), "--keep", "0.5", "-q",
                                "--accept-error"]).exit_code == 0
    result = runner.invoke(main, ["bench", str(source), str(out), "--runs", "5", "--batch", "4", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["batch"] == 4 and data["speedup"] > 0
    assert data["candidate"]["params"] < data["baseline"]["params"]
    assert data["baseline"]["latency"]["runs"] == 5


@pytest.mark.parametrize("content, message", [
    (None, "model file not found"),
    (b"hello", "not an ONNX model"),
    (b"", "empty"),
    (DIGITS.read_bytes()[:5000], "not an ONNX model"),
])
def test_bad_model_one_line_error_no_output(runner, tmp_path, content, message):
    source = tmp_path / "model.onnx"
    if content is not None:
        source.write_bytes(content)
    out = tmp_path / "out.onnx"
    result = runner.invoke(main, ["compress", str(source), "-o", str(out)])
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".onnx_lrsd")] == []


@pytest.mark.parametrize("args, message, code", [
    (["--keep", "0"], "keep must be in (0, 1]", 2),
    (["--keep", "1.5"], "keep must be in (0, 1]", 2),
    (["--rank", "nolayer=4"], "config names no layer", 1),
    (["--calib", "/nonexistent.npz"], "does not exist", 1),
    (["--target-params", "0.5", "--max-error", "0.1"], "choose one target", 2),
    (["--target-latency", "0.5"], "must be > 1", 2),
    (["--target-params", "0.01", "--calib", "random"], "unreachable", 1),
    (["--target-latency", "1000", "--calib", "random", "--calib-samples", "32"], "unreachable", 1),
    (["--evbmf", "2"], "evbmf", 2),
    (["--max-output-error", "0"], "max_output_error must be > 0", 2),
])
def test_bad_options_exit_1_or_2(runner, tmp_path, args, message, code):
    """Values out of their documented range are usage errors (2); the rest fail with 1."""
    out = tmp_path / "out.onnx"
    result = runner.invoke(main, ["compress", str(_mlp(tmp_path / "m.onnx")), "-o", str(out)] + args)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert not out.exists()


def test_usage_errors_exit_2(runner, tmp_path):
    source = str(_mlp(tmp_path / "m.onnx"))
    assert runner.invoke(main, ["compress", source]).exit_code == 2  # no -o
    assert runner.invoke(main, ["compress", source, "-o", "x.onnx", "--method", "nope"]).exit_code == 2
    assert runner.invoke(main, ["compress", source, "-o", "x.onnx", "--dim", "bad"]).exit_code == 2
    assert runner.invoke(main, ["frobnicate"]).exit_code == 2


def test_refuses_to_overwrite_input_and_leaves_it_untouched(runner, tmp_path):
    source = _mlp(tmp_path / "m.onnx")
    before = source.read_bytes()
    result = runner.invoke(main, ["compress", str(source), "-o", str(source)])
    assert result.exit_code == 1 and "input path" in result.output
    assert source.read_bytes() == before


def test_missing_output_directory(runner, tmp_path):
    result = runner.invoke(main, ["compress", str(_mlp(tmp_path / "m.onnx")), "-o", str(tmp_path / "no" / "o.onnx")])
    assert result.exit_code == 1 and "output directory does not exist" in result.output


def test_config_file_yaml_overrides(runner, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("keep: 0.9\nlayers:\n  fc2: {skip: true}\n  fc1: {rank: 4}\n")
    out = tmp_path / "out.onnx"
    result = runner.invoke(main, ["compress", str(_mlp(tmp_path / "m.onnx")), "-o", str(out),
                                  "--config", str(config), "--json", "--accept-error"])
    assert result.exit_code == 0, result.output
    layers = {layer["name"]: layer for layer in json.loads(result.output)["layers"]}
    assert layers["fc1"]["ranks"] == [4] and layers["fc2"]["method"] == "dense"


def test_config_file_errors(runner, tmp_path):
    source = str(_mlp(tmp_path / "m.onnx"))
    bad_key = tmp_path / "bad.json"
    bad_key.write_text('{"kep": 0.5}')
    result = runner.invoke(main, ["compress", source, "-o", str(tmp_path / "o.onnx"), "--config", str(bad_key)])
    assert result.exit_code == 2 and "unknown keys" in result.output
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    result = runner.invoke(main, ["compress", source, "-o", str(tmp_path / "o.onnx"), "--config", str(broken)])
    assert result.exit_code == 2 and "not valid" in result.output


def test_bench_refuses_a_batch_the_model_cannot_take(runner, tmp_path):
    model = onnx.load(str(_mlp(tmp_path / "m.onnx")))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    fixed = tmp_path / "fixed.onnx"
    onnx.save(model, fixed)
    result = runner.invoke(main, ["bench", str(fixed), str(fixed), "--batch", "8", "--runs", "3"])
    assert result.exit_code == 1 and "fixes its batch size to 1" in result.output
    assert runner.invoke(main, ["bench", str(fixed), str(fixed), "--batch", "1", "--runs", "3"]).exit_code == 0


def test_compress_to_a_params_target_reports_the_allocation(runner, tmp_path):
    out = tmp_path / "d.onnx"
    result = runner.invoke(main, ["compress", str(DIGITS), "-o", str(out), "--calib", str(DIGITS_CALIB),
                                  "--calib-samples", "64", "--target-params", "0.2", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["params_ratio"] <= 0.2
    assert report["allocation"]["target"] == "params" and report["allocation"]["sensitivity"] is True
    assert out.is_file()


def test_sweep_writes_table_json_and_plot(runner, tmp_path):
    out = tmp_path / "sweep"
    result = runner.invoke(main, ["sweep", str(DIGITS), "-o", str(out), "--calib", str(DIGITS_CALIB),
                                  "--calib-samples", "64", "--points", "0.5,0.2", "--save-models", "-q"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "sweep.json").read_text())
    assert [p["target_params"] for p in data["points"]] == [0.5, 0.2]
    assert all(p["params_ratio"] <= p["target_params"] for p in data["points"])
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.glob("*.onnx")) == ["params-0.2.onnx", "params-0.5.onnx"]
    assert "| 0.5 |" in (out / "sweep.md").read_text()


@pytest.mark.parametrize("points, message", [("0,0.5", "(0, 1]"), ("a,b", "comma-separated")])
def test_sweep_rejects_bad_points_before_any_work(runner, tmp_path, points, message):
    out = tmp_path / "sweep"
    result = runner.invoke(main, ["sweep", str(DIGITS), "-o", str(out), "--points", points])
    assert result.exit_code == 1 and message in result.output
    assert not out.exists()


def test_compress_in_stages_reports_every_stage(runner, tmp_path):
    out = tmp_path / "d.onnx"
    result = runner.invoke(main, ["compress", str(DIGITS), "-o", str(out), "--calib", str(DIGITS_CALIB),
                                  "--calib-samples", "64", "--keep", "0.25", "--stages", "2", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [s["stage"] for s in report["stages"]] == [1, 2]
    assert report["stages"][1]["params_ratio"] < report["stages"][0]["params_ratio"]
    assert report["params_ratio"] == report["stages"][1]["params_ratio"]
