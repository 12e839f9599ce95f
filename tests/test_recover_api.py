"""The public recovery entry points on the bundled digits CNN: `onnx_lrsd.recover`,
`recover_file`, and bad input as one-line errors with nothing written."""
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnx_lrsd
from onnx_lrsd.errors import LrsdError
from onnx_lrsd.recover import RecoverConfig, recover, recover_file

MODELS = Path(__file__).resolve().parents[1] / "models"
DIGITS, CALIB = MODELS / "digits_cnn.onnx", MODELS / "digits_calib.npz"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("small") / "small.onnx"
    onnx_lrsd.compress_file(DIGITS, path, calibration=[CALIB], keep=0.02, min_rank=2, verify=False)
    return path


def _logits(model, x):
    import onnxruntime as ort

    source = model if isinstance(model, (str, Path)) else model.SerializeToString()
    return ort.InferenceSession(str(source) if isinstance(source, Path) else source).run(None, {"input": x})[0]


def test_recover_from_paths_moves_outputs_toward_the_teacher(small):
    result = recover(small, DIGITS, CALIB, steps=60, lr=1e-3, batch=16, eval_every=10, patience=None)
    r = result.report
    assert r.loss == "kl" and r.augment == "image" and r.train_samples + r.heldout_samples == 128
    assert r.loss_after < 0.7 * r.loss_before
    x = np.load(MODELS / "digits_test.npz")["input"][:200]
    teacher = _logits(DIGITS, x).argmax(1)
    agree_before = np.mean(_logits(small, x).argmax(1) == teacher)
    agree_after = np.mean(_logits(result.model, x).argmax(1) == teacher)
    assert agree_after > agree_before + 0.05  # on unseen test images


def test_recover_file_writes_only_the_output(small, tmp_path):
    out = tmp_path / "rec.onnx"
    before = small.read_bytes()
    result = recover_file(small, DIGITS, out, [CALIB], RecoverConfig(steps=5, batch=16, eval_every=5))
    assert out.is_file() and small.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec.onnx"]
    loaded = onnx.load(str(out))
    assert [i.name for i in loaded.graph.initializer] == [i.name for i in result.model.graph.initializer]


def test_bad_inputs_are_one_line_errors(small, tmp_path):
    out = tmp_path / "never.onnx"
    cases = [
        dict(model=tmp_path / "missing.onnx", teacher=DIGITS, calibration=CALIB),
        dict(model=small, teacher=DIGITS, calibration="random"),
        dict(model=small, teacher=DIGITS, calibration=None),
    ]
    for case in cases:
        with pytest.raises(LrsdError) as info:
            recover_file(output=out, steps=1, **case)
        assert "\n" not in str(info.value)
    other = onnx.load(str(DIGITS))
    other.graph.output[0].name = "renamed"
    other.graph.node[-1].output[0] = "renamed"
    with pytest.raises(LrsdError, match="different outputs"):
        recover(small, other, CALIB, steps=1)
    assert not out.exists()


def test_interrupt_keeps_nothing(small, tmp_path):
    out = tmp_path / "rec.onnx"

    def interrupt(progress):
        if progress.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        recover_file(small, DIGITS, out, CALIB, RecoverConfig(steps=10, batch=16), on_step=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_package_call_and_compress_with_recover():
    result = onnx_lrsd.compress(DIGITS, calibration=CALIB, keep=0.02, min_rank=2, recover=30)
    recovery = result.report.recovery
    assert recovery is not None and recovery.steps >= 1 and recovery.loss_after <= recovery.loss_before
    assert "recovery (block-wise (1 blocks) + end-to-end" in result.report.to_text()  # the default level
    again = onnx_lrsd.recover(result.model, DIGITS, CALIB, steps=2)  # the subpackage is callable
    assert again.report.steps == 2


def test_musco_stages_recover_between_stages():
    result = onnx_lrsd.compress(DIGITS, calibration=CALIB, keep=0.04, min_rank=2, stages=2, recover=20, verify=False)
    report = result.report
    assert len(report.stages) == 2 and report.recovery is not None and report.recovery.steps == 10
    assert report.params_ratio < 0.1
