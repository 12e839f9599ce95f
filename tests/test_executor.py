"""The executor seam (onnx_lrsd.parallel.executor, onnx_lrsd.parallel.tasks) without Ray: sharded calibration
sums to the one-pass statistics, the process pool keeps task order, retries dead workers and
passes task errors through, and a pooled compression equals the in-process one."""
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

import onnx_lrsd
from onnx_lrsd.runtime.activations import collect_paired_statistics, collect_statistics
from onnx_lrsd.cli import main
from onnx_lrsd.config import CompressConfig
from onnx_lrsd.errors import LrsdError
from onnx_lrsd.parallel.executor import InProcessExecutor, PoolExecutor, Task, open_executor
from onnx_lrsd.model.graph import import_graph, model_template
from onnx_lrsd.parallel.tasks import shard_ranges, sharded_paired_statistics, sharded_statistics
from onnx_lrsd.passes import FindTargetsPass, NameNodesPass, PassContext, PassManager

from helpers.graphs import assert_same_compression, make_model

ROOT = Path(__file__).resolve().parents[1]
DIGITS, DIGITS_CALIB = ROOT / "models" / "digits_cnn.onnx", ROOT / "models" / "digits_calib.npz"
F = TensorProto.FLOAT


class ShardedInProcess(InProcessExecutor):
    """Runs in this process but cuts work into `slots` shards, as a cluster would."""

    def __init__(self, slots: int):
        self.slots = slots


def _conv_matmul_model(rng):
    """x [N, 2, 8, 8] -> Conv 3x3 -> Relu -> Flatten -> MatMul."""
    nodes = [helper.make_node("Conv", ["x", "cw"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "mw"], ["y"], name="matmul")]
    inits = {"cw": rng.standard_normal((4, 2, 3, 3)).astype(np.float32),
             "mw": (0.1 * rng.standard_normal((256, 5))).astype(np.float32)}
    return make_model(nodes, [("x", F, ["n", 2, 8, 8])], [("y", F, None)], inits)


def _targets(model):
    ctx = PassContext(config=CompressConfig(verify=False), source=model, template=model_template(model))
    PassManager([NameNodesPass(), FindTargetsPass()]).run(import_graph(model), ctx)
    return list(ctx.targets.values())


def _assert_same_statistics(a, b, rtol=1e-12):
    assert a.keys() == b.keys()
    for name in a:
        for part in ("fit", "holdout"):
            x, y = getattr(a[name], part), getattr(b[name], part)
            assert (x is None) == (y is None)
            if x is None:
                continue
            assert x.count == y.count > 0
            np.testing.assert_allclose(x.gram, y.gram, rtol=rtol, atol=rtol * np.abs(y.gram).max())
            np.testing.assert_allclose(x.mean, y.mean, rtol=rtol, atol=1e-15)
            if x.track_cross:
                np.testing.assert_allclose(x.cross, y.cross, rtol=rtol, atol=rtol * np.abs(y.cross).max())


def test_shard_ranges_cover_every_item_once_in_order():
    for count, parts in [(8, 2), (7, 3), (2, 5), (1, 1), (10, 10)]:
        shards = shard_ranges(count, parts)
        assert len(shards) == min(count, parts)
        assert [i for s in shards for i in s] == list(range(count))
        assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1


@pytest.mark.parametrize("slots", [1, 2, 3, 7])
def test_sharded_statistics_sum_to_the_one_pass_statistics(slots):
    """Held-out batches, subsampled conv positions and the padding-free MatMul rows are the
    same whichever shard a batch lands in."""
    rng = np.random.default_rng(3)
    model = _conv_matmul_model(rng)
    targets = _targets(model)
    batches = [{"x": rng.standard_normal((3, 2, 8, 8)).astype(np.float32)} for _ in range(7)]
    options = dict(holdout_every=3, max_positions=50, seed=4)
    whole = collect_statistics(model, targets, batches, **options)
    sharded = sharded_statistics(ShardedInProcess(slots), model, targets, batches, **options)
    _assert_same_statistics(sharded, whole)
    assert sharded["conv"].fit.count == 5 * 50 and sharded["conv"].holdout.count == 2 * 50
    if slots == 1:  # one shard is the same computation: bit for bit
        assert np.array_equal(sharded["matmul"].fit.gram, whole["matmul"].fit.gram)


def test_sharded_paired_statistics_sum_to_the_one_pass_statistics():
    rng = np.random.default_rng(5)
    model = _conv_matmul_model(rng)
    perturbed = onnx.ModelProto()
    perturbed.CopyFrom(model)
    w = onnx.numpy_helper.to_array(perturbed.graph.initializer[0])
    perturbed.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w * 1.1, perturbed.graph.initializer[0].name))
    targets = _targets(model)
    batches = [{"x": rng.standard_normal((2, 2, 8, 8)).astype(np.float32)} for _ in range(6)]
    whole = collect_paired_statistics(model, perturbed, targets, batches, holdout_every=3, max_positions=40)
    sharded = sharded_paired_statistics(ShardedInProcess(4), model, perturbed, targets, batches, holdout_every=3,
                                        max_positions=40)
    _assert_same_statistics(sharded, whole)


# ---------------------------------------------------------------------------------------------
# the process pool (task functions live at module level: spawned workers import them)

def square(x):
    return x * x


def fail_with_lrsd_error(x):
    raise LrsdError(f"bad item {x}")


def die_once(marker, x):
    """Kills its worker the first time (no marker yet); returns x afterwards."""
    if not os.path.exists(marker):
        Path(marker).touch()
        os._exit(3)
    return x


def always_die(x):
    os._exit(3)


@pytest.fixture(scope="module")
def pool():
    with PoolExecutor(2) as executor:
        yield executor


def test_pool_returns_results_in_task_order_whatever_finishes_first(pool):
    tasks = [Task((x,), memory=10 ** 6) for x in range(9)]
    assert pool.map(square, tasks) == [x * x for x in range(9)]


def test_pool_admits_tasks_within_its_memory_budget(pool):
    assert pool.memory_budget is None or pool.memory_budget > 0
    big = Task((3,), memory=2 ** 62)  # alone above any budget: still runs, alone
    assert pool.map(square, [big, Task((4,))]) == [9, 16]


def test_pool_task_errors_are_raised_as_they_are(pool):
    with pytest.raises(LrsdError, match="bad item 2"):
        pool.map(fail_with_lrsd_error, [Task((2,))])


def test_pool_reruns_tasks_whose_worker_died(pool, tmp_path):
    marker = str(tmp_path / "died")
    assert pool.map(die_once, [Task((marker, x)) for x in range(4)]) == [0, 1, 2, 3]
    assert os.path.exists(marker)


def test_pool_gives_up_on_a_task_that_always_kills_its_worker(tmp_path):
    with PoolExecutor(2, retries=1) as executor:
        with pytest.raises(LrsdError, match="died 2 times"):
            executor.map(always_die, [Task((1,))])


def test_pooled_compression_equals_in_process():
    options = dict(calibration=str(DIGITS_CALIB), target_params=0.3, verify=False)
    local = onnx_lrsd.compress(str(DIGITS), **options)
    pooled = onnx_lrsd.compress(str(DIGITS), workers=2, **options)
    assert_same_compression(pooled, local)


# ---------------------------------------------------------------------------------------------
# configuration

def test_executor_settings_are_checked():
    with pytest.raises(LrsdError, match="unknown executor 'dask'"):
        CompressConfig(executor="dask")
    with pytest.raises(LrsdError, match="workers must be a positive integer"):
        CompressConfig(workers=0)
    with pytest.raises(LrsdError, match="ray_address needs executor 'ray'"):
        CompressConfig(ray_address="127.0.0.1:6379")
    assert isinstance(open_executor("local", 1), InProcessExecutor)


def test_cli_ray_address_without_ray_executor_is_a_one_line_error(tmp_path):
    out = tmp_path / "small.onnx"
    result = CliRunner().invoke(main, ["compress", str(DIGITS), "-o", str(out), "--ray-address", "127.0.0.1:1", "-q"])
    assert result.exit_code == 2  # a usage error
    assert result.output.strip().splitlines() == ["error: ray_address needs executor 'ray' and a non-empty address"]
    assert not out.exists()
