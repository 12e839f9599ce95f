"""The copyable scripts under examples/ run on the bundled digits model: compress with a
CalibrationDataReader, and the build gate (passes at a sane drop, fails the build and leaves no
model when the drop allowed is negative)."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL, CALIB, TEST = (REPO / "models" / n for n in ("digits_cnn.onnx", "digits_calib.npz", "digits_test.npz"))


def _run(script, *args):
    return subprocess.run([sys.executable, str(REPO / "examples" / script), *map(str, args)], capture_output=True,
                          text=True, timeout=600)


def test_compress_with_reader_writes_a_verified_model(tmp_path):
    out = tmp_path / "small.onnx"
    run = _run("compress_with_reader.py", MODEL, out, "--data", CALIB, "--keep", "0.5", "--samples", "64")
    assert run.returncode == 0, run.stderr[-2000:]
    assert out.is_file() and "held-out calibration" in run.stdout
    error = float(run.stdout.split("relative error ")[1].split()[0])
    assert error < 0.05


def test_pipeline_gate_passes_and_fails_the_build(tmp_path):
    out = tmp_path / "small.onnx"
    run = _run("pipeline_gate.py", MODEL, out, "--calib", CALIB, "--test", TEST, "--speedup", "1.2", "--max-drop", "0.02")
    assert run.returncode == 0 and out.is_file(), run.stderr[-2000:]
    assert "OK: wrote" in run.stdout
    strict = _run("pipeline_gate.py", MODEL, tmp_path / "strict.onnx", "--calib", CALIB, "--test", TEST,
                  "--speedup", "1.2", "--max-drop", "-1")
    assert strict.returncode == 1 and "FAIL: accuracy dropped" in strict.stderr
    assert not (tmp_path / "strict.onnx").exists()
