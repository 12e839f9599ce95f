"""Recovery's gradient shards on the executors (a batch's gradient summed from shards of its
samples, each an executor task), the step-size warm-up, and the recovery options of `compress`.

The model depends on the number of shards, not on where they run: a process pool of 2 workers
gives the same bytes as the same shards run in this process."""
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import onnx_lrsd
from helpers.graphs import make_model
from onnx_lrsd.cli import main
from onnx_lrsd.config import CompressConfig, RECOVER_LEVELS, load_config_file
from onnx_lrsd.errors import LrsdError, UsageError
from onnx_lrsd.parallel.executor import InProcessExecutor, PoolExecutor
from onnx_lrsd.recover.blockwise import recover_at_level
from onnx_lrsd.recover.distill import step_size, with_values
from onnx_lrsd.recover.gradients import TEACHER_LOGP, TEACHER_PROB, LossGradient
from onnx_lrsd.recover.shards import ShardedGradient, shard_count, sharded
from onnx_lrsd.recover.types import LEVEL_CHOICES, RecoverConfig

F = TensorProto.FLOAT
REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "models" / "digits_cnn.onnx"
CALIB = REPO / "models" / "digits_calib.npz"


def _conv_net(seed=0):
    """x [n, 2, 8, 8] → Conv 3×3 → Relu → Conv 3×3 → Relu → GlobalAveragePool → Flatten → MatMul."""
    rng = np.random.default_rng(seed)
    inits = {"w1": (rng.normal(size=(8, 2, 3, 3)) / 4).astype(np.float32), "b1": (0.1 * rng.normal(size=8)).astype(np.float32),
             "w2": (rng.normal(size=(8, 8, 3, 3)) / 8).astype(np.float32), "b2": (0.1 * rng.normal(size=8)).astype(np.float32),
             "wo": (rng.normal(size=(8, 5)) / 3).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="pool"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "wo"], ["logits"], name="fc")]
    return make_model(nodes, [("x", F, ["n", 2, 8, 8])], [("logits", F, ["n", 5])], inits, opset=17)


def _perturbed(model, scale=0.3, seed=5):
    rng = np.random.default_rng(seed)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return with_values(model, {k: v + scale * v.std() * rng.normal(size=v.shape) for k, v in weights.items()})


def _images(n=48, seed=1):
    x = np.random.default_rng(seed).normal(size=(n, 2, 8, 8)).astype(np.float32)
    return [{"x": x[i:i + 16]} for i in range(0, n, 16)]


@pytest.fixture(scope="module")
def pool():
    with PoolExecutor(2) as executor:
        yield executor


def test_shard_gradients_sum_to_the_batch_gradient():
    """Σ_s (n_s/n) ∂L_s/∂θ over shards of 3, 2 and 3 samples (two adjoint shapes) is the
    gradient of the whole batch of 8, up to float32 rounding of the two computations."""
    teacher, student = _conv_net(), _perturbed(_conv_net())
    names = ["w1", "b1", "w2", "b2", "wo"]
    rng = np.random.default_rng(3)
    x = rng.normal(size=(8, 2, 8, 8)).astype(np.float32)
    p = np.exp(rng.normal(size=(8, 5))).astype(np.float32)
    p /= p.sum(1, keepdims=True)
    targets = {TEACHER_PROB: p, TEACHER_LOGP: np.log(p)}
    whole = LossGradient(student, names, {"x": (8, 2, 8, 8)}, loss="kl")
    params = {k: v.astype(np.float64) for k, v in whole.initial.items()}
    loss, grads = whole({"x": x}, targets, params)
    parent = LossGradient(student, names, {"x": (3, 2, 8, 8)}, loss="kl")
    split = sharded(parent, student, {"x": (2, 8, 8)}, "kl", "logits", False, 1.0, InProcessExecutor(), 8, 3)
    assert isinstance(split, ShardedGradient) and [len(r) for r in split.ranges] == [3, 2, 3]
    shard_loss, shard_grads = split({"x": x}, targets, params)
    assert shard_loss == pytest.approx(loss, rel=1e-5)
    for name in names:
        assert shard_grads[name].dtype == np.float64
        assert np.abs(shard_grads[name] - grads[name]).max() <= 1e-5 * np.abs(grads[name]).max(), name
    assert sharded(whole, student, {"x": (2, 8, 8)}, "kl", "logits", False, 1.0, InProcessExecutor(), 8, 1) is whole


def test_pool_gives_the_same_model_as_local_for_the_same_shards(pool):
    """End-to-end (conv net, every weight trained, images augmented) and blocks + end-to-end
    (deep MLP low-rank factors): shards on 2 worker processes give the bytes of the same shards
    run one after the other in this process."""
    teacher = _conv_net()
    student = _perturbed(teacher)
    config = RecoverConfig(steps=6, lr=3e-3, batch=8, eval_every=3, patience=None, trainable="all", shards=2)
    local = recover_at_level(student, teacher, _images(), config)
    pooled = recover_at_level(student, teacher, _images(), config, executor=pool)
    assert local.report.best_step > 0 and local.report.augment == "image"
    assert local.model.SerializeToString() == pooled.model.SerializeToString()
    assert local.report.curve == pooled.report.curve

    from test_recover_blocks import _data, _deep_mlp
    deep = _deep_mlp()
    small = onnx_lrsd.compress(deep, calibration=_data(64, seed=7), keep=0.25, verify=False, calib_samples=64,
                               calib_batch=16).model
    small = _perturbed(small, scale=0.2)
    blocks = RecoverConfig(steps=12, lr=3e-3, batch=6, eval_every=3, patience=None, level="blocks+end-to-end",
                           block_size=4, shards=4, warmup=2)
    local = recover_at_level(small, deep, _data(), blocks)
    pooled = recover_at_level(small, deep, _data(), blocks, executor=pool)
    assert local.report.level.startswith("block-wise (") and local.report.error_after < local.report.error_before
    assert local.model.SerializeToString() == pooled.model.SerializeToString()


def test_workers_in_the_config_shard_on_a_pool():
    """`workers=2` opens a process pool and cuts each batch into one shard per worker: the
    model of `shards=2` in this process."""
    teacher = _conv_net()
    student = _perturbed(teacher)
    config = RecoverConfig(steps=4, lr=3e-3, batch=8, eval_every=2, patience=None, trainable="all", augment="none")
    assert shard_count(config.replace(workers=2), PoolExecutor(2)) == 2
    assert shard_count(config.replace(shards=20), InProcessExecutor()) == 8  # at most one sample per shard
    on_pool = recover_at_level(student, teacher, _images(), config.replace(workers=2)).model
    local = recover_at_level(student, teacher, _images(), config.replace(shards=2)).model
    whole = recover_at_level(student, teacher, _images(), config).model
    assert on_pool.SerializeToString() == local.SerializeToString()
    assert on_pool.SerializeToString() != whole.SerializeToString()  # another summation order
    a, b = ({t.name: numpy_helper.to_array(t) for t in m.graph.initializer} for m in (on_pool, whole))
    assert all(np.abs(a[k] - b[k]).max() <= 1e-3 * np.abs(b[k]).max() for k in a)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_warmup_rises_linearly_then_follows_the_schedule(schedule):
    config = RecoverConfig(steps=8, lr=1e-2, warmup=4, schedule=schedule)
    sizes = [step_size(config, k, 0.0) for k in range(1, 9)]
    decay = [1.0] * 8 if schedule == "constant" else [0.5 * (1 + np.cos(np.pi * (k - 1) / 8)) for k in range(1, 9)]
    warm = [0.25, 0.5, 0.75, 1, 1, 1, 1, 1]
    assert sizes == pytest.approx([1e-2 * w * d for w, d in zip(warm, decay)], rel=1e-12)
    assert [step_size(config.replace(warmup=0), k, 0.0) for k in range(1, 9)] == \
        pytest.approx([1e-2 * d for d in decay], rel=1e-12)
    with pytest.raises(LrsdError, match="warmup"):
        RecoverConfig(warmup=-1)


def test_warmup_changes_the_first_steps_only_as_scheduled():
    """Warm-up 3 at a constant rate: the first step moves the weights a third as far (Adam's
    first step is lr·sign(g) up to ε), and the run differs from one without warm-up."""
    teacher = _conv_net()
    student = _perturbed(teacher)
    config = RecoverConfig(steps=1, lr=1e-3, batch=8, eval_every=1, patience=None, trainable="all", augment="none",
                           schedule="constant", holdout=0.5, warmup=0, level="end-to-end")
    weights = lambda m: {t.name: numpy_helper.to_array(t).astype(np.float64) for t in m.graph.initializer}  # noqa: E731
    start = weights(student)
    plain = weights(recover_at_level(student, teacher, _images(), config).model)
    warm = weights(recover_at_level(student, teacher, _images(), config.replace(warmup=3)).model)
    for name in start:
        moved, moved_warm = np.abs(plain[name] - start[name]), np.abs(warm[name] - start[name])
        big = moved > 0.5e-3  # entries not lost to float32 rounding
        assert big.any() and np.allclose(moved_warm[big], moved[big] / 3, rtol=0.02), name


def test_levels_and_defaults_have_one_source():
    assert LEVEL_CHOICES == RECOVER_LEVELS
    defaults, recover = CompressConfig(), RecoverConfig()
    assert (defaults.recover_level, defaults.recover_block_size, defaults.recover_warmup) == \
        (recover.level, recover.block_size, recover.warmup)
    with pytest.raises(UsageError, match="recover_level"):
        CompressConfig(recover_level="layers")
    with pytest.raises(UsageError, match="recover_warmup"):
        CompressConfig(recover_warmup=-2)


def test_config_file_sets_the_recovery_level(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"recover": 5, "recover_level": "blocks", "recover_block_size": 2,
                                "recover_warmup": 3}))
    config = load_config_file(path)
    assert (config.recover, config.recover_level, config.recover_block_size, config.recover_warmup) == \
        (5, "blocks", 2, 3)


def test_compress_recover_level_block_size_and_warmup_reach_the_recovery(tmp_path):
    out = tmp_path / "small.onnx"
    result = CliRunner().invoke(main, ["compress", str(DIGITS), "-o", str(out), "--calib", str(CALIB), "--rank",
                                       "fc1=3", "--accept-error", "--recover", "8", "--recover-level",
                                       "blocks+end-to-end", "--recover-block-size", "2", "--recover-warmup", "2",
                                       "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["config"]["recover_level"] == "blocks+end-to-end" and report["config"]["recover_warmup"] == 2
    assert report["recovery"]["level"].startswith("block-wise (") and report["recovery"]["level"].endswith("end-to-end")
    assert 0 < report["recovery"]["steps"] <= 8 and out.is_file()
    bad = CliRunner().invoke(main, ["compress", str(DIGITS), "-o", str(tmp_path / "b.onnx"), "--calib", str(CALIB),
                                    "--recover", "8", "--recover-level", "layers"])
    assert bad.exit_code == 2 and not (tmp_path / "b.onnx").exists()


def test_recover_command_on_two_workers_writes_the_bytes_of_two_local_shards(tmp_path):
    small = tmp_path / "small.onnx"
    assert CliRunner().invoke(main, ["compress", str(DIGITS), "-o", str(small), "--calib", str(CALIB), "--rank",
                                     "fc1=3", "--no-verify", "-q"]).exit_code == 0
    outputs = {}
    for name, args in (("pool", ["--workers", "2"]), ("local", ["--shards", "2"])):
        outputs[name] = tmp_path / f"{name}.onnx"
        result = CliRunner().invoke(main, ["recover", str(small), "--teacher", str(DIGITS), "--calib", str(CALIB), "-o",
                                           str(outputs[name]), "--steps", "4", "--warmup", "2", "--samples", "64",
                                           "-q", *args])
        assert result.exit_code == 0, result.output
    assert outputs["pool"].read_bytes() == outputs["local"].read_bytes()
    bad = CliRunner().invoke(main, ["recover", str(small), "--teacher", str(DIGITS), "--calib", str(CALIB), "-o",
                                    str(tmp_path / "x.onnx"), "--executor", "ray", "--ray-address", ""])
    assert bad.exit_code == 2 and not (tmp_path / "x.onnx").exists()


def test_recover_command_takes_the_executor_options_of_the_config():
    from onnx_lrsd.cli import recover as recover_command
    from onnx_lrsd.config import EXECUTORS

    params = {p.name: p for p in recover_command.params}
    assert list(params["executor"].type.choices) == list(EXECUTORS) and params["workers"].default is None
    assert "ray_address" in params and params["warmup"].help.endswith(f"[{RecoverConfig.warmup}]")
