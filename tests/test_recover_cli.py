"""`onnx-lrsd recover` and `compress --recover` through click's runner on the digits CNN:
the report, one-line errors, no output written on failure."""
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from onnx_lrsd.cli import main

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "models" / "digits_cnn.onnx"
CALIB = REPO / "models" / "digits_calib.npz"
TEST = REPO / "models" / "digits_test.npz"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("small") / "small.onnx"
    result = CliRunner().invoke(main, ["compress", str(DIGITS), "-o", str(path), "--calib", str(CALIB), "--rank", "fc1=3",
                                       "--no-verify", "-q"])
    assert result.exit_code == 0, result.output
    return path


def _agreement(model: Path) -> float:
    x = np.load(TEST)["input"][:300]
    run = lambda p: ort.InferenceSession(str(p)).run(None, {"input": x})[0].argmax(1)  # noqa: E731
    return float(np.mean(run(model) == run(DIGITS)))


def test_recover_command_writes_a_closer_model(small, tmp_path):
    out, report, plot = tmp_path / "rec.onnx", tmp_path / "rec.json", tmp_path / "rec.png"
    result = CliRunner().invoke(main, ["recover", str(small), "--teacher", str(DIGITS), "--calib", str(CALIB), "-o",
                                       str(out), "--steps", "60", "--lr", "1e-3", "--batch", "16", "--report",
                                       str(report), "--plot", str(plot), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["steps"] >= 1 and data["loss_after"] < data["loss_before"]
    assert json.loads(report.read_text())["loss_after"] == data["loss_after"]
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert _agreement(out) > _agreement(small)


@pytest.mark.parametrize("args, message", [
    (["--teacher", "missing.onnx", "--calib", str(CALIB)], "model file not found"),
    (["--teacher", str(DIGITS), "--calib", "random"], ""),
    (["--teacher", str(DIGITS), "--calib", str(CALIB), "--recover-time", "ten"], "duration"),
    (["--teacher", str(DIGITS), "--calib", str(CALIB), "--lr", "-1"], "lr"),
])
def test_recover_command_bad_input_is_one_line_without_output(small, tmp_path, args, message):
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["recover", str(small), "-o", str(out), "--steps", "2", *args])
    assert result.exit_code != 0
    assert "Traceback" not in result.output and message in result.output
    assert len([line for line in result.output.splitlines() if line.lower().startswith("error")]) == 1
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_compress_with_recover_reports_the_recovery(tmp_path):
    out = tmp_path / "small.onnx"
    result = CliRunner().invoke(main, ["compress", str(DIGITS), "-o", str(out), "--calib", str(CALIB), "--rank", "fc1=3", "--accept-error",
                                       "--recover", "40", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    recovery = report["recovery"]
    assert recovery["steps"] >= 1 and recovery["loss_after"] <= recovery["loss_before"]
    assert out.is_file()


def test_compress_recover_needs_real_calibration(tmp_path):
    out = tmp_path / "small.onnx"
    result = CliRunner().invoke(main, ["compress", str(DIGITS), "-o", str(out), "--keep", "0.1", "--recover", "auto"])
    assert result.exit_code == 1 and "calib" in result.output and not out.exists()


def test_bare_recover_flag_means_auto_with_a_time_budget(tmp_path):
    out = tmp_path / "small.onnx"
    result = CliRunner().invoke(main, ["compress", str(DIGITS), "-o", str(out), "--calib", str(CALIB), "--rank", "fc1=3", "--accept-error",
                                       "--recover", "--recover-time", "3s", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["config"]["recover"] == "auto" and report["config"]["recover_time"] == 3.0
    assert report["recovery"]["stopped_by"] in ("time", "early stop") and report["recovery"]["steps"] >= 1


def test_recover_command_block_wise_then_end_to_end(small, tmp_path):
    out, report = tmp_path / "rec.onnx", tmp_path / "rec.json"
    result = CliRunner().invoke(main, ["recover", str(small), "--teacher", str(DIGITS), "--calib", str(CALIB), "-o",
                                       str(out), "--steps", "10", "--level", "blocks+end-to-end", "--block-size", "2",
                                       "--report", str(report), "-q"])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["level"].startswith("block-wise (") and data["level"].endswith("+ end-to-end")
    assert 0 < data["steps"] <= 10 and out.exists()  # the steps are shared by the blocks, then end-to-end
