"""Session settings, interleaved timing and output error maths."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_lrsd.runtime.bench import (
    Comparison,
    LatencyStats,
    compare_latency,
    make_session,
    relative_output_errors,
    run_outputs,
    time_sessions,
)
from onnx_lrsd.errors import LrsdError


def _mlp(seed=0, width=128):
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((width, 10)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])],
        initializer=[w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def mlp():
    return _mlp()


@pytest.fixture(scope="module")
def feeds():
    return {"x": np.random.default_rng(1).standard_normal((8, 128)).astype(np.float32)}


def _reference(model, x):
    w1, w2 = (numpy_helper.to_array(t) for t in model.graph.initializer)
    return np.maximum(x @ w1, 0) @ w2


@pytest.mark.parametrize("source", ["proto", "bytes", "path"])
def test_make_session_sources_and_settings(mlp, feeds, tmp_path, source):
    if source == "path":
        path = tmp_path / "mlp.onnx"
        onnx.save(mlp, str(path))
        model = path
    else:
        model = mlp if source == "proto" else mlp.SerializeToString()
    session = make_session(model, threads=3)
    options = session.get_session_options()
    assert options.intra_op_num_threads == 3
    assert options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session.get_providers() == ["CPUExecutionProvider"]
    (y,) = run_outputs(session, feeds)
    np.testing.assert_allclose(y, _reference(mlp, feeds["x"]), rtol=1e-4, atol=1e-3)


def test_make_session_optimization_levels(mlp):
    import onnxruntime as ort

    level = make_session(mlp, 1, optimization="disable").get_session_options().graph_optimization_level
    assert level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    level = make_session(mlp, 1).get_session_options().graph_optimization_level
    assert level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with pytest.raises(LrsdError, match="unknown optimization level 'max'"):
        make_session(mlp, 1, optimization="max")
    with pytest.raises(LrsdError, match="threads must be >= 1"):
        make_session(mlp, 0)


def test_make_session_reports_unloadable_models_as_lrsd_errors():
    with pytest.raises(LrsdError, match="onnxruntime cannot load the model"):
        make_session(b"not a model", 1)


def test_compare_latency_of_a_model_with_itself(mlp, feeds):
    result = compare_latency(mlp, mlp.SerializeToString(), feeds, threads=1, runs=30, warmup=3)
    assert isinstance(result, Comparison)
    assert (result.threads, result.batch) == (1, 8)
    for stats in (result.baseline, result.candidate):
        assert stats.runs == 30
        assert 0 < stats.median_ms <= stats.p90_ms
        assert stats.mean_ms > 0
    assert result.speedup == pytest.approx(result.baseline.median_ms / result.candidate.median_ms)
    assert 0.5 < result.speedup < 2.0


def test_compare_latency_accepts_sessions_and_reports_their_threads(mlp, feeds):
    sessions = [make_session(mlp, 2), make_session(_mlp(seed=1), 2)]
    result = compare_latency(*sessions, feeds, threads=7, runs=5, warmup=1)
    assert result.threads == 2
    assert result.baseline.runs == result.candidate.runs == 5


class _Recorder:
    """Stands in for a session: records the order of runs."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def run(self, output_names, feeds):
        self.log.append(self.name)
        return []


def test_time_sessions_interleaves_with_alternating_order(feeds):
    log = []
    stats = time_sessions([_Recorder(n, log) for n in "ABC"], feeds, runs=4, warmup=1)
    assert log == list("ABC" "ABC" "CBA" "ABC" "CBA")  # warm-up, then rounds alternate
    assert [s.runs for s in stats] == [4, 4, 4]


@pytest.mark.parametrize("kwargs, message", [
    ({"runs": 0}, "runs must be >= 1"),
    ({"warmup": -1}, "warmup must be >= 0"),
])
def test_time_sessions_rejects_bad_counts(mlp, feeds, kwargs, message):
    with pytest.raises(LrsdError, match=message):
        time_sessions([make_session(mlp, 1)], feeds, **kwargs)
    with pytest.raises(LrsdError, match="no sessions"):
        time_sessions([], feeds)


def test_latency_stats_from_samples():
    stats = LatencyStats.from_samples([0.001, 0.002, 0.003, 0.004, 0.010])
    assert stats.runs == 5
    assert stats.median_ms == pytest.approx(3.0)
    assert stats.mean_ms == pytest.approx(4.0)
    assert stats.p90_ms == pytest.approx(7.6)  # linear interpolation between 4 and 10 ms


def test_relative_output_errors_maths():
    ref = [np.array([[3.0, 4.0]], np.float32), np.zeros((2, 2), np.float32), np.arange(4, dtype=np.int64)]
    out = [np.array([[3.3, 4.4]], np.float32), np.full((2, 2), 0.5, np.float32), np.arange(4, dtype=np.int64)]
    errors = relative_output_errors(ref, out, ["a", "zero", "ids"])
    assert errors["a"] == pytest.approx(0.1, rel=1e-6)  # ‖(0.3, 0.4)‖ / ‖(3, 4)‖
    assert errors["zero"] == pytest.approx(1.0)  # ‖y‖ = 0: absolute error, ‖0.5·1₂ₓ₂‖ = 1
    assert errors["ids"] == 0.0


def test_relative_output_errors_uses_float64():
    ref = [np.full(10, 60000.0, np.float16)]  # float16 norms would overflow
    out = [np.full(10, 60000.0, np.float16) * np.float16(0.5)]
    assert relative_output_errors(ref, out, ["y"])["y"] == pytest.approx(0.5)


def test_relative_output_errors_rejects_mismatches():
    with pytest.raises(LrsdError, match="output count mismatch"):
        relative_output_errors([np.zeros(2)], [np.zeros(2), np.zeros(2)], ["a"])
    with pytest.raises(LrsdError, match=r"output 'a' shape changed: \(2,\) -> \(3,\)"):
        relative_output_errors([np.zeros(2)], [np.zeros(3)], ["a"])
