"""Ctrl-C (SIGINT) or SIGTERM during `onnx-lrsd compress` leaves no output, no report and no
staging files: exit 130 (143 for SIGTERM) with one line on stderr."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import onnx_lrsd
import onnx_lrsd.api
import onnx_lrsd.cli
import onnx_lrsd.model.io
import onnx_lrsd.report.render
from onnx_lrsd.cli import main

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "models" / "digits_cnn.onnx"
CALIB = REPO / "models" / "digits_calib.npz"


def _interrupt_mid_fit(tmp_path: Path, signum: int) -> subprocess.CompletedProcess:
    """Start a compression that fits for ~20 s, wait until the fits start, send `signum`."""
    output = tmp_path / "out" / "small.onnx"
    output.parent.mkdir()
    args = [sys.executable, "-m", "onnx_lrsd.cli", "-vv", "compress", str(DIGITS), "-o", str(output),
            "--calib", str(CALIB), "--sparse-share", "auto", "--keep", "0.3", "--report", str(tmp_path / "out" / "r.json")]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + 120
    for line in process.stderr:
        lines.append(line)
        if "pass collect_activations" in line or time.monotonic() > deadline:
            break
    time.sleep(0.5)
    assert process.poll() is None, "finished before it could be interrupted"
    process.send_signal(signum)
    try:
        rest = process.communicate(timeout=300)[1]
    except subprocess.TimeoutExpired:
        process.kill()
        rest = process.communicate()[1]
        pytest.fail(f"still running 300 s after the signal: {''.join(lines[-5:]) + rest[-2000:]}")
    return subprocess.CompletedProcess(args, process.returncode, "", "".join(lines) + rest)


@pytest.mark.parametrize("signum, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_signal_during_compress_leaves_no_output(tmp_path, signum, code, word):
    run = _interrupt_mid_fit(tmp_path, signum)
    assert run.returncode == code, run.stderr[-2000:]
    assert run.stderr.splitlines()[-1] == f"error: {word}; no output written"
    assert "Traceback" not in run.stderr
    assert list((tmp_path / "out").iterdir()) == []


def test_interrupt_while_saving_leaves_no_output(tmp_path, monkeypatch):
    """Ctrl-C arriving in the middle of the save: the staging files are removed."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_lrsd.model.io.os, "replace", interrupted)
    output = tmp_path / "out" / "small.onnx"
    output.parent.mkdir()
    result = CliRunner().invoke(main, ["compress", str(DIGITS), "-o", str(output), "--keep", "0.5", "--external-data"])
    assert result.exit_code == 130 and "interrupted; no output written" in result.stderr
    assert list(output.parent.iterdir()) == []


def test_interrupt_right_after_saving_removes_the_new_output(tmp_path, monkeypatch):
    """Ctrl-C delivered once the model is in place (e.g. held back during the renames): the
    command fails, so the output it wrote is removed too; a previous file's place is freed."""
    real_save = onnx_lrsd.api.save_model

    def save_then_interrupt(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_lrsd.api, "save_model", save_then_interrupt)
    output = tmp_path / "small.onnx"
    result = CliRunner().invoke(main, ["compress", str(DIGITS), "-o", str(output), "--keep", "0.5", "--external-data"])
    assert result.exit_code == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_interrupt_swallowed_by_a_destructor_still_discards_the_output(tmp_path, monkeypatch):
    """Python drops a KeyboardInterrupt raised inside a destructor; the command still sees
    the signal before keeping its output."""
    real_save = onnx_lrsd.api.save_model

    def save_after_a_lost_interrupt(*args, **kwargs):
        onnx_lrsd.cli._SIGNALLED["SIGINT"] = True  # what the handler records before raising
        return real_save(*args, **kwargs)

    monkeypatch.setattr(onnx_lrsd.api, "save_model", save_after_a_lost_interrupt)
    output = tmp_path / "small.onnx"
    result = CliRunner().invoke(main, ["compress", str(DIGITS), "-o", str(output), "--keep", "0.5"])
    assert result.exit_code == 130 and "interrupted; no output written" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_failure_after_saving_removes_the_output(tmp_path, monkeypatch):
    """A report that cannot be written fails the command: the model is not left behind."""
    def disk_full(path, data):
        raise onnx_lrsd.LrsdError(f"cannot write {path}: No space left on device")

    monkeypatch.setattr(onnx_lrsd.report.render, "write_atomic", disk_full)
    output = tmp_path / "small.onnx"
    result = CliRunner().invoke(main, ["compress", str(DIGITS), "-o", str(output), "--keep", "0.5",
                                       "--report", str(tmp_path / "report.json")])
    assert result.exit_code == 1 and "No space left" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path):
    """Reports are staged through a temporary file, yet end with the umask's permissions."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    written = onnx_lrsd.model.io.write_atomic(tmp_path / "report.json", "{}")
    assert written.read_text() == "{}"
    assert written.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.txt", "report.json"]


BLOCKED_IN_BLAS = """
import sys
import numpy as np
import onnx_lrsd.plan.factorize as factorize
from onnx_lrsd.cli import main

def endless_blas(*args, **kwargs):  # one BLAS call after another: the interpreter never gets a turn for minutes
    sys.stderr.write("fitting\\n"); sys.stderr.flush()
    a = np.ones((3000, 3000))
    while True:
        a = a @ a / 3000.0

factorize.low_rank = endless_blas
main(["compress", {model!r}, "-o", {output!r}, "--keep", "0.5", "-q"])
"""


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_inside_a_long_blas_call_ends_the_run_promptly(tmp_path, signum, code):
    """The command computes in a worker thread; the main thread answers the signal while the
    worker is inside BLAS (which no signal interrupts), removes what the run created, leaves.
    The bound is liveness, not speed: the BLAS loop alone would run until killed."""
    output = tmp_path / "out" / "small.onnx"
    output.parent.mkdir()
    code_text = BLOCKED_IN_BLAS.format(model=str(DIGITS), output=str(output))
    process = subprocess.Popen([sys.executable, "-c", code_text], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    assert process.stderr.readline() == "fitting\n"
    time.sleep(1.0)
    process.send_signal(signum)
    try:
        rest = process.communicate(timeout=30)[1]
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("still computing 30 s after the signal")
    assert process.returncode == code, rest
    assert rest.strip().splitlines()[-1].endswith("no output written")
    assert list(output.parent.iterdir()) == []
