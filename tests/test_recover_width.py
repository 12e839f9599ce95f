"""Recovery after structured width reduction (`method="prune"`): the trainable set is the
narrowed layers, its gradients match central finite differences, the loss falls, runs repeat
for a seed, a grouped conv's weight (no gradient rule) is left as fitted while its bias trains."""
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import onnx_lrsd
from onnx_lrsd.cli import main
from onnx_lrsd.passes.prune import PruneOptions, prune_model
from onnx_lrsd.recover.distill import recover_models, trainable_tensors
from onnx_lrsd.recover.gradients import TARGET, LossGradient, prepared_copy
from onnx_lrsd.recover.types import RecoverConfig
from onnx_lrsd.runtime.bench import output_errors_on
from onnx_lrsd.runtime.calibrate import calibration_batches, split_holdout
from helpers.graphs import run
from test_recover_gradients import _check, _float64
from test_width import ffn_model, mobile_model

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "models" / "digits_cnn.onnx"
CALIB = REPO / "models" / "digits_calib.npz"


def _images(n=48, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, 3, 10, 12)).astype(np.float32)
    return [{"x": x[i:i + 8]} for i in range(0, n, 8)]


def _tokens(n=24, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, 5, 16)).astype(np.float32)
    return [{"x": x[i:i + 4]} for i in range(0, n, 4)]


@pytest.fixture(scope="module")
def mobile_pair():
    teacher = mobile_model()
    return teacher, prune_model(teacher, _images(), PruneOptions(keep=0.5)).model


def test_trainable_set_is_the_narrowed_layers(mobile_pair):
    teacher, student = mobile_pair
    names = trainable_tensors(prepared_copy(student), "compressed")
    untouched = {t.name for t in teacher.graph.initializer} | {n.output[0] for n in teacher.graph.node
                                                              if n.op_type == "Constant"}
    narrowed = {t.name for t in student.graph.initializer
                if "/lrsd/" in t.name and t.data_type == onnx.TensorProto.FLOAT}
    bn_statistics = {"bn/lrsd/param3", "bn/lrsd/param4"}
    assert bn_statistics <= narrowed
    assert set(names) == narrowed - bn_statistics
    assert {"stem/lrsd/weight", "depthwise/lrsd/weight", "depthwise/lrsd/bias", "mid/lrsd/weight",
            "head/lrsd/weight", "head/lrsd/bias", "bn/lrsd/weight", "channel_scale/lrsd/weight"} <= set(names)
    assert not untouched & set(names)


def test_gradients_of_narrowed_ffn_and_heads_match_central_differences_float64():
    teacher = ffn_model()
    student = _float64(prune_model(teacher, _tokens(), PruneOptions(keep=0.5)).model)
    for node in student.graph.node:  # onnxruntime has no float64 Erf; Tanh keeps the GELU's shape
        if node.op_type == "Erf":
            node.op_type = "Tanh"
    trainable = trainable_tensors(prepared_copy(student), "compressed")
    assert {"up/lrsd/weight", "down/lrsd/weight"} <= set(trainable) and len(trainable) >= 4
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 5, 16))
    lg = LossGradient(student, trainable, {"x": x.shape}, loss="mse", output="y", mse_scale=1.5)
    _check(lg, {"x": x}, {TARGET: rng.normal(size=(3, 5, 16))}, h=1e-6, rtol=1e-5, atol=1e-8)


def test_gradients_of_narrowed_convs_match_central_differences(mobile_pair):
    """onnxruntime's Conv is float32 only: the distillation loss (teacher outputs as targets)
    against central differences with a step small enough for the Relu / Clip kinks and a
    tolerance at float32 rounding (a wrong rule is off by far more)."""
    teacher, student = mobile_pair
    trainable = ["mid/lrsd/weight", "mid/lrsd/bias", "head/lrsd/weight", "head/lrsd/bias", "bn/lrsd/weight",
                 "depthwise/lrsd/bias"]
    x = np.random.default_rng(3).normal(size=(2, 3, 10, 12)).astype(np.float32)
    target = run(teacher, {"x": x})[0]
    lg = LossGradient(student, trainable, {"x": x.shape}, loss="mse", mse_scale=float(np.mean(target ** 2)))
    _check(lg, {"x": x}, {TARGET: target}, h=1e-3, rtol=3e-2, atol=3e-4)


def test_recovery_after_width_reduction_lowers_the_loss_and_repeats(mobile_pair):
    teacher, student = mobile_pair
    config = RecoverConfig(steps=40, lr=1e-2, batch=8, augment="none", eval_every=10, patience=None,
                           schedule="constant")
    first = recover_models(student, teacher, _images(96, seed=4), config)
    again = recover_models(student, teacher, _images(96, seed=4), config)
    report = first.report
    assert report.loss_after < 0.9 * report.loss_before and report.error_after < report.error_before
    assert first.model.SerializeToString() == again.model.SerializeToString()
    assert [a.part for a in report.left_as_fitted] == ["depthwise/lrsd/weight"]
    assert "grouped Conv" in report.left_as_fitted[0].reason
    before = {t.name: numpy_helper.to_array(t) for t in student.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in first.model.graph.initializer}
    np.testing.assert_array_equal(after["depthwise/lrsd/weight"], before["depthwise/lrsd/weight"])
    assert not np.array_equal(after["depthwise/lrsd/bias"], before["depthwise/lrsd/bias"])
    assert set(after) == set(before) and all(after[k].shape == before[k].shape for k in before)


def test_compress_method_prune_with_recover_reports_the_recovered_model():
    plain = onnx_lrsd.compress(DIGITS, calibration=CALIB, method="prune", keep=0.4)
    result = onnx_lrsd.compress(DIGITS, calibration=CALIB, method="prune", keep=0.4, recover=30)
    recovery = result.report.recovery
    assert recovery is not None and recovery.steps == 30 and recovery.loss_after <= recovery.loss_before
    assert result.report.after.params == plain.report.after.params  # the same narrowed graph, trained
    assert result.report.widths == plain.report.widths
    config = onnx_lrsd.CompressConfig()
    held = split_holdout(calibration_batches(CALIB, onnx.load(str(DIGITS)), config), config.holdout_every).held_out
    names = list(result.report.output_errors)
    assert result.report.output_errors == pytest.approx(output_errors_on(onnx.load(str(DIGITS)), result.model,
                                                                         held, names), rel=1e-6)
    assert "recovery (block-wise (1 blocks) + end-to-end" in result.report.to_text()  # the default level


def test_cli_compress_method_prune_with_recover(tmp_path):
    out, report = tmp_path / "small.onnx", tmp_path / "report.json"
    result = CliRunner().invoke(main, ["compress", str(DIGITS), "-o", str(out), "--calib", str(CALIB), "--method",
                                       "prune", "--keep", "0.5", "--recover", "5", "--report", str(report), "-q"])
    assert result.exit_code == 0, result.output
    assert out.exists() and '"recovery"' in report.read_text()
