"""The scale of recovery's Adam step (`step_scale`): "absolute" moves every weight by about lr,
"relative" moves each tensor by about lr times its RMS at the start (`distill.step_scales`).

A wide first layer (fan-in 1024) left at its fit is where plain Adam's first steps, lr·sign(g)
on every weight whatever the tensor's scale, kick the held-out loss up; relative steps do not."""
import json
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from helpers.graphs import make_model
from onnx_lrsd.cli import main
from onnx_lrsd.config import RECOVER_STEP_SCALES, CompressConfig, load_config_file
from onnx_lrsd.errors import LrsdError, UsageError
from onnx_lrsd.recover.distill import ADAM_EPS, RELATIVE_FLOOR, adam_loop, recover_models, step_scales, with_values
from onnx_lrsd.recover.gradients import TARGET, LossGradient
from onnx_lrsd.recover.types import MIN_EVALS, STEP_SCALE_CHOICES, RecoverConfig

F = TensorProto.FLOAT
REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "models" / "digits_cnn.onnx"
CALIB = REPO / "models" / "digits_calib.npz"
FAN_IN = 1024


def _wide_mlp(seed=0):
    """x [n, 1024] → MatMul W1 [1024, 24] → Add b1 → Relu → MatMul W2 [24, 10] → logits."""
    rng = np.random.default_rng(seed)
    inits = {"W1": (rng.normal(size=(FAN_IN, 24)) / np.sqrt(FAN_IN)).astype(np.float32),
             "b1": np.zeros(24, np.float32), "W2": (rng.normal(size=(24, 10)) / np.sqrt(24)).astype(np.float32)}
    return make_model([helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
                       helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
                       helper.make_node("Relu", ["hb"], ["r"], name="relu"),
                       helper.make_node("MatMul", ["r", "W2"], ["logits"], name="fc2")],
                      [("x", F, ["n", FAN_IN])], [("logits", F, ["n", 10])], inits, opset=17)


def _data(n=64, seed=1):
    """Inputs sharing a positive mean, as pixels do: a sign step on every weight of W1 moves
    each hidden unit by about lr·Σ|x|, coherently."""
    x = (1 + 0.5 * np.random.default_rng(seed).normal(size=(n, FAN_IN))).astype(np.float32)
    return [{"x": x[i:i + 16]} for i in range(0, n, 16)]


def _student(teacher, scale=0.3, seed=5):
    """The teacher with its output layer knocked off (something to recover) and its wide first
    layer at the teacher's values (an optimum the first steps can leave)."""
    rng = np.random.default_rng(seed)
    w2 = numpy_helper.to_array(next(t for t in teacher.graph.initializer if t.name == "W2"))
    return with_values(teacher, {"W2": w2 + scale * w2.std() * rng.normal(size=w2.shape)})


def test_step_scales_are_the_rms_floored_by_a_share_of_their_mean():
    params = {"w": np.full((4, 5), -2.0), "v": np.array([3.0, -4.0]), "b": np.zeros(7)}
    rms = {"w": 2.0, "v": np.sqrt(12.5), "b": 0.0}
    floor = RELATIVE_FLOOR * np.mean(list(rms.values()))
    scales = step_scales(params, "relative")
    assert scales == pytest.approx({"w": 2.0, "v": np.sqrt(12.5), "b": floor}, rel=1e-12)
    assert step_scales(params, "absolute") == {"w": 1.0, "v": 1.0, "b": 1.0}
    assert STEP_SCALE_CHOICES == RECOVER_STEP_SCALES


def test_relative_steps_follow_the_formula():
    """Three Adam steps on the whole training split (so each batch is known): θ ← θ − lr·s_θ·m̂/(√v̂ + ε)
    with s_θ the tensor's RMS at the start (the zero bias: the floor), to float64 rounding."""
    teacher = _wide_mlp()
    student = _student(teacher)
    x = np.concatenate([b["x"] for b in _data(24)])
    y = _run(teacher, x)
    train, held = np.arange(16), np.arange(16, 24)
    names = ["W1", "b1", "W2"]
    lg = LossGradient(student, names, {"x": (16, FAN_IN)}, loss="mse", output="logits")
    config = RecoverConfig(steps=3, lr=3e-3, batch=16, eval_every=1, patience=None, schedule="constant",
                           step_scale="relative")
    label = lambda picks, feeds: {TARGET: y[picks]}  # noqa: E731
    fit = adam_loop(lg, {"x": x}, train, {"x": x[held]}, {TARGET: y[held]}, label, None, {}, config,
                    np.random.default_rng(0), time.perf_counter())
    assert fit.best_step == 3 and [s for s, _ in fit.curve] == [0, 1, 2, 3]

    params = {k: v.astype(np.float64) for k, v in lg.initial.items()}
    scales = step_scales(params, "relative")
    assert scales["b1"] == pytest.approx(RELATIVE_FLOOR * np.mean([np.sqrt(np.mean(params[k] ** 2)) for k in names]))
    rng, m, v = np.random.default_rng(0), {k: 0.0 for k in names}, {k: 0.0 for k in names}
    for step in range(1, 4):
        picks = list(rng.permutation(train))[::-1]  # adam_loop pops a fresh permutation from its end
        _, grads = lg({"x": x[picks]}, {TARGET: y[picks]}, params)
        for k in names:
            g = grads[k].astype(np.float64)
            m[k] = 0.9 * m[k] + 0.1 * g
            v[k] = 0.999 * v[k] + 0.001 * g * g
            m_hat, v_hat = m[k] / (1 - 0.9 ** step), v[k] / (1 - 0.999 ** step)
            params[k] = params[k] - 3e-3 * scales[k] * m_hat / (np.sqrt(v_hat) + ADAM_EPS)
    for k in names:
        assert np.abs(fit.params[k] - params[k]).max() <= 1e-12 * max(1.0, np.abs(params[k]).max()), k
    moved = {k: np.abs(fit.params[k] - lg.initial[k]).max() for k in names}
    assert moved["W1"] <= 3 * 3e-3 * scales["W1"] * 1.05 < 3 * 3e-3 / 10  # far below the absolute step


def _run(model, x):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"x": x})[0]


def test_relative_step_keeps_the_heldout_loss_from_rising_where_the_absolute_one_does():
    """At the same lr (1e-3): plain Adam moves W1 (RMS 1/32) by 3 % of its scale a step and the
    held-out loss climbs; relative steps fall from the first evaluation on."""
    teacher = _wide_mlp()
    student = _student(teacher)
    config = RecoverConfig(steps=30, lr=1e-3, batch=8, eval_every=3, patience=None, trainable="all",
                           augment="none", level="end-to-end")
    curves = {}
    for scale in STEP_SCALE_CHOICES:
        report = recover_models(student, teacher, _data(), config.replace(step_scale=scale)).report
        curves[scale] = [loss for _, loss in report.curve]
    absolute, relative = curves["absolute"], curves["relative"]
    assert max(absolute[1:4]) > 2 * absolute[0]  # plain Adam's first steps leave the fit
    assert all(later < earlier for earlier, later in zip(relative[:5], relative[1:5]))
    assert max(relative[1:]) < relative[0] and relative[-1] < 0.5 * relative[0]


def test_patience_waits_for_min_evals():
    """Plain Adam at lr 1e-3 first climbs: patience 2 stops it at its second evaluation keeping
    nothing; not stopping before 10 evaluations, it gets below its start and keeps that step."""
    teacher = _wide_mlp()
    student = _student(teacher)
    config = RecoverConfig(steps=60, lr=1e-3, batch=8, eval_every=3, patience=2, trainable="all", augment="none",
                           level="end-to-end", schedule="constant")
    eager = recover_models(student, teacher, _data(), config.replace(min_evals=0)).report
    assert (eager.steps, eager.best_step, eager.stopped_by) == (6, 0, "early stop")
    waiting = recover_models(student, teacher, _data(), config).report  # the default: 10
    assert waiting.steps >= 30 and waiting.best_step > 0 and waiting.loss_after < 0.9 * waiting.loss_before
    assert RecoverConfig().min_evals == MIN_EVALS == 10
    with pytest.raises(LrsdError, match="min_evals"):
        RecoverConfig(min_evals=-1)


def test_relative_steps_repeat_for_a_seed():
    teacher = _wide_mlp()
    student = _student(teacher)
    config = RecoverConfig(steps=6, batch=8, eval_every=3, patience=None, trainable="all", step_scale="relative")
    runs = [recover_models(student, teacher, _data(), config.replace(seed=seed)).model.SerializeToString()
            for seed in (0, 0, 1)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_step_scale_is_one_option_of_recover_compress_and_config_files(tmp_path):
    assert CompressConfig().recover_step_scale == RecoverConfig().step_scale
    with pytest.raises(LrsdError, match="step_scale"):
        RecoverConfig(step_scale="adaptive")
    with pytest.raises(UsageError, match="recover_step_scale"):
        CompressConfig(recover_step_scale="adaptive")
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"recover": 5, "recover_step_scale": "absolute"}))
    assert load_config_file(path).recover_step_scale == "absolute"

    from onnx_lrsd.cli import recover as recover_command
    params = {p.name: p for p in recover_command.params}
    assert list(params["step_scale"].type.choices) == list(RECOVER_STEP_SCALES)
    assert params["step_scale"].help.endswith(f"[{RecoverConfig.step_scale}]")

    other = next(s for s in RECOVER_STEP_SCALES if s != RecoverConfig.step_scale)
    out = tmp_path / "small.onnx"
    result = CliRunner().invoke(main, ["compress", str(DIGITS), "-o", str(out), "--calib", str(CALIB), "--rank",
                                       "fc1=3", "--accept-error", "--recover", "4", "--recover-level", "end-to-end",
                                       "--recover-step-scale", other, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["config"]["recover_step_scale"] == other and out.is_file()
    runs = {}
    for scale in RECOVER_STEP_SCALES:
        runs[scale] = tmp_path / f"{scale}.onnx"
        result = CliRunner().invoke(main, ["recover", str(out), "--teacher", str(DIGITS), "--calib", str(CALIB), "-o",
                                           str(runs[scale]), "--steps", "3", "--level", "end-to-end", "--samples",
                                           "32", "--step-scale", scale, "-q"])
        assert result.exit_code == 0, result.output
    assert runs["absolute"].read_bytes() != runs["relative"].read_bytes()
    bad = CliRunner().invoke(main, ["recover", str(out), "--teacher", str(DIGITS), "--calib", str(CALIB), "-o",
                                    str(tmp_path / "x.onnx"), "--step-scale", "adaptive"])
    assert bad.exit_code == 2 and not (tmp_path / "x.onnx").exists()
