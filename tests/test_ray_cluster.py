"""Compression on a two-node Ray cluster started on loopback (`ray start --head` plus a second
`ray start --address`, one CPU each, torn down after): the result equals the local one, task
errors come back as they are, and a worker killed mid-run is retried without corrupting the
output."""
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'onnx_lrsd[ray]')")

import onnx_lrsd  # noqa: E402
from onnx_lrsd.parallel import executor as executor_module  # noqa: E402
from onnx_lrsd.errors import LrsdError  # noqa: E402
from onnx_lrsd.parallel.executor import RayExecutor, Task, run_task  # noqa: E402
from onnx_lrsd.runtime.latency import LatencyModel  # noqa: E402
from onnx_lrsd.parallel.tasks import latency_tasks  # noqa: E402

from helpers.graphs import assert_same_compression  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DIGITS, DIGITS_CALIB = str(ROOT / "models" / "digits_cnn.onnx"), str(ROOT / "models" / "digits_calib.npz")
GLOBAL = dict(calibration=DIGITS_CALIB, target_params=0.3)
SEQUENTIAL = dict(calibration=DIGITS_CALIB, keep=0.3, mode="sequential")

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers do not import this module


@pytest.fixture(scope="module")
def cluster():
    from benchmarks.ray_cluster import LoopbackCluster

    with LoopbackCluster(worker_nodes=1, cpus_per_node=1, head_cpus=1, object_store_mb=96) as running:
        yield running


@pytest.fixture(scope="module")
def local_global():
    return onnx_lrsd.compress(DIGITS, **GLOBAL)


def test_global_allocation_on_the_cluster_equals_local(cluster, local_global):
    """Calibration shards on both nodes, error curves, sensitivity probes' fits, per-layer fits."""
    remote = onnx_lrsd.compress(DIGITS, executor="ray", ray_address=cluster.address, **GLOBAL)
    assert_same_compression(remote, local_global)
    assert remote.report.output_errors == pytest.approx(local_global.report.output_errors, rel=1e-4, abs=1e-7)
    assert not ray.is_initialized()  # the run's connection is closed, the cluster keeps running


def test_sequential_reconstruction_on_the_cluster_equals_local(cluster):
    local = onnx_lrsd.compress(DIGITS, **SEQUENTIAL)
    remote = onnx_lrsd.compress(DIGITS, executor="ray", ray_address=cluster.address, **SEQUENTIAL)
    assert_same_compression(remote, local)


def node_of(seconds):
    time.sleep(seconds)
    return ray.get_runtime_context().get_node_id()


def test_tasks_run_on_both_nodes_in_order(cluster):
    with RayExecutor(cluster.address) as executor:
        assert executor.slots == 2
        nodes = executor.map(node_of, [Task((0.5,)) for _ in range(4)])
        assert len(nodes) == 4 and len(set(nodes)) == 2
        assert executor.map(pow, [Task((2, k)) for k in range(6)]) == [1, 2, 4, 8, 16, 32]
        # a layer estimated above any node's memory still runs (its request is capped), and a
        # timing asking for more CPUs than a node has runs with all of one node's
        assert executor.map(pow, [Task((3, 2), memory=2 ** 50, cpus=8)]) == [9]


def test_a_task_error_comes_back_as_a_one_line_lrsd_error(cluster):
    with pytest.raises(LrsdError, match="mask input 'nope' is not among the calibration inputs"):
        onnx_lrsd.compress(DIGITS, executor="ray", ray_address=cluster.address, calibration=DIGITS_CALIB,
                           mask_input="nope")


def test_latency_microbenchmarks_run_as_tasks_and_fill_the_driver_cache(cluster, tmp_path):
    from onnx_lrsd.model.layers import LayerTarget

    weight = np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32)
    target = LayerTarget("fc", "MatMul", weight, "W", "x", "y", None, 64, 48, rows=1)
    model = LatencyModel(threads=1, cache_path=tmp_path / "latency.json", runs=5, warmup=1)
    with RayExecutor(cluster.address) as executor:
        (dense, chain), = latency_tasks(executor, measure_two, model, [(target, (4, 64), [])])
    assert dense > 0 and chain > 0
    assert len(model.times) == 2  # measured on a worker, recorded by the driver
    assert len(LatencyModel(threads=1, cache_path=tmp_path / "latency.json").times) == 2


def measure_two(model, target, shape, _candidates):
    return model.measure(target, shape, [("dense", ()), ("svd", (8,))])


def dying_once(marker, fn, blas_threads, *args):
    """`run_task`, but the first fit kills its worker process (as an OOM kill or a lost node would)."""
    if fn.__name__ == "best_fit" and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)
    return run_task(fn, blas_threads, *args)


def test_a_worker_killed_mid_run_is_retried_and_the_output_is_unchanged(cluster, local_global, tmp_path,
                                                                        monkeypatch):
    marker = str(tmp_path / "killed")

    def remote_function(self, fn):
        remote = ray.remote(dying_once)

        class Bound:
            def options(self, **options):
                bound = remote.options(**options)
                return type("Call", (), {"remote": staticmethod(lambda *args: bound.remote(marker, *args))})

        return Bound()

    monkeypatch.setattr(executor_module.RayExecutor, "remote_function", remote_function)
    remote = onnx_lrsd.compress(DIGITS, executor="ray", ray_address=cluster.address, **GLOBAL)
    assert os.path.exists(marker)  # a worker did die
    assert_same_compression(remote, local_global)


def test_recovery_gradient_shards_on_the_cluster_equal_local(cluster):
    """A batch's gradient cut into 2 shards, each a Ray task (on either node), summed in shard
    order: the recovered model has the bytes of the same shards run in this process."""
    from onnx_lrsd.recover import RecoverConfig, recover

    small = onnx_lrsd.compress(DIGITS, calibration=DIGITS_CALIB, keep=0.02, min_rank=2, verify=False).model
    config = RecoverConfig(steps=4, lr=1e-3, batch=8, eval_every=2, patience=None, samples=64, shards=2)
    local = recover(small, DIGITS, DIGITS_CALIB, config)
    remote = recover(small, DIGITS, DIGITS_CALIB, config.replace(executor="ray", ray_address=cluster.address))
    assert local.report.best_step > 0 and remote.report.curve == local.report.curve
    assert remote.model.SerializeToString() == local.model.SerializeToString()
    assert not ray.is_initialized()
