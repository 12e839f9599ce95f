"""Measured latency of layer candidates (`onnx_lrsd.runtime.latency`): the timed chains are the ones
the compressor writes, the disk cache avoids re-timing, bad requests are refused, and the
rank interpolation is piecewise linear. Every cache lives in tmp_path."""
import json
import logging

import numpy as np
import onnx
import pytest

import onnx_lrsd.runtime.latency as latency
from helpers.graphs import conv_model, gemm_model, matmul_model, session
from onnx_lrsd.runtime.bench import LatencyStats
from onnx_lrsd.plan.cost import dense_cost, factorized_cost
from onnx_lrsd.plan.factorize import factorize_data_free
from onnx_lrsd.model.graph import export_model, import_graph, model_template
from onnx_lrsd.runtime.latency import LatencyModel, interpolate_latency
from onnx_lrsd.plan.rank_select import LayerPlan
from onnx_lrsd.model.rewrite import rewrite_layers
from onnx_lrsd.model.layers import classify


def _target(model):
    graph = import_graph(model)
    return classify(next(n for n in graph.nodes if n.name == "layer"), graph)


def _production(model, method, ranks):
    """`model` compressed the way the pipeline does: data-free factors, rewrite, export."""
    graph = import_graph(model)
    target = classify(next(n for n in graph.nodes if n.name == "layer"), graph)
    plan = LayerPlan("layer", target.op, method, ranks, factorized_cost(target, method, ranks), dense_cost(target))
    rewrite_layers(graph, {"layer": target}, [factorize_data_free(target, plan)])
    return export_model(graph, model_template(model))


def _signature(model):
    """Per node: op, name, attributes and the shapes of its constant inputs."""
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return [(n.op_type, n.name, [onnx.helper.get_attribute_value(a) for a in n.attribute],
             [shapes.get(i) for i in n.input]) for n in model.graph.node]


@pytest.fixture
def recorded(monkeypatch):
    """The models LatencyModel opens sessions on, in order."""
    models = []

    def make_session(model, threads):
        models.append(model)
        return latency_make_session(model, threads)

    latency_make_session = latency.make_session
    monkeypatch.setattr(latency, "make_session", make_session)
    return models


CASES = [  # (model, input shape, candidate, expected ops)
    (matmul_model((4, 48), 40), (3, 5, 48), ("svd", (6,)), ["MatMul", "MatMul"]),
    (matmul_model((4, 48, 5), 40, side="left"), (2, 48, 7), ("svd", (6,)), ["MatMul", "MatMul"]),
    (gemm_model(4, 48, 40, trans_b=1, alpha=0.5, beta=2.0), (9, 48), ("svd", (6,)), ["MatMul", "Gemm"]),
    (gemm_model(4, 48, 40, trans_a=1, bias=None), (48, 9), ("svd", (6,)), ["Transpose", "MatMul", "MatMul"]),
    (conv_model(8, 12, (3, 3), (10, 10), strides=(2, 1), pads=(1, 0, 1, 2)), (2, 8, 14, 11), ("channel", (5,)),
     ["Conv", "Conv"]),
    (conv_model(8, 12, (3, 3), (10, 10), strides=(2, 1), pads=(1, 0, 1, 2)), (2, 8, 14, 11), ("spatial", (5,)),
     ["Conv", "Conv"]),
    (conv_model(8, 12, (3, 3), (10, 10), auto_pad="SAME_UPPER", bias=False), (1, 8, 9, 13), ("tucker2", (3, 4)),
     ["Conv", "Conv", "Conv"]),
    (conv_model(8, 12, (1, 1), (10, 10)), (1, 8, 6, 6), ("channel", (4,)), ["Conv", "Conv"]),
]


@pytest.mark.parametrize("model, shape, candidate, ops", CASES)
def test_timed_model_is_the_production_chain(tmp_path, recorded, model, shape, candidate, ops):
    times = LatencyModel(cache_path=tmp_path / "latency.json", runs=2, warmup=0).measure(
        _target(model), shape, [("dense", ()), candidate])
    assert len(times) == 2 and all(isinstance(t, float) and t > 0 for t in times)
    dense, chain = recorded
    assert [n.op_type for n in dense.graph.node] == [model.graph.node[-1].op_type]
    assert [n.op_type for n in chain.graph.node] == ops
    assert _signature(chain) == _signature(_production(model, *candidate))
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    (y_dense,), (y_chain,) = (session(m).run(None, {"x": x}) for m in (dense, chain))
    assert y_chain.shape == y_dense.shape and np.all(np.isfinite(y_chain))


def test_measure_returns_times_in_candidate_order(tmp_path, monkeypatch):
    """Fake timing: each session's "median" is its model's parameter count."""
    monkeypatch.setattr(latency, "make_session", lambda model, threads: model)
    monkeypatch.setattr(latency, "time_sessions", lambda models, feeds, runs, warmup: [
        LatencyStats(float(sum(np.prod(t.dims) for t in m.graph.initializer)), 0.0, 0.0, runs) for m in models])
    target = _target(matmul_model((4, 48), 40))
    times = LatencyModel(cache_path=tmp_path / "c.json").measure(
        target, (8, 48), [("svd", (8,)), ("dense", ()), ("svd", (3,))])
    assert times == [8 * 88, 48 * 40, 3 * 88]


def test_cache_skips_timed_candidates_and_times_only_new_ones(tmp_path, monkeypatch):
    calls = []
    real = latency.time_sessions

    def counting(sessions, feeds, runs, warmup):
        calls.append(len(sessions))
        return real(sessions, feeds, runs=runs, warmup=warmup)

    monkeypatch.setattr(latency, "time_sessions", counting)
    path, target = tmp_path / "cache" / "latency.json", _target(conv_model(8, 12, (3, 3), (10, 10)))
    first = LatencyModel(cache_path=path, runs=2).measure(target, (1, 8, 12, 12), [("dense", ()), ("tucker2", (2, 3))])
    assert calls == [2] and path.is_file()
    assert LatencyModel(cache_path=path, runs=2).measure(target, (1, 8, 12, 12), [("dense", ()), ("tucker2", (2, 3))]) \
        == first and calls == [2]  # read back from disk, not re-timed
    model = LatencyModel(cache_path=path, runs=2)
    again = model.measure(target, (1, 8, 12, 12), [("spatial", (4,)), ("dense", ()), ("spatial", (4,))])
    assert calls == [2, 1] and again[1] == first[0] and again[0] == again[2]
    model.measure(target, (1, 8, 12, 16), [("dense", ())])  # another input shape is another key
    assert calls == [2, 1, 1]
    assert len(json.loads(path.read_text())["times"]) == 4
    assert [p.name for p in path.parent.iterdir()] == ["latency.json"]  # no temp file left


def test_key_covers_threads_shape_and_attributes(tmp_path):
    conv = _target(conv_model(8, 12, (3, 3), (10, 10)))
    strided = _target(conv_model(8, 12, (3, 3), (10, 10), strides=(2, 2)))
    one, two = LatencyModel(1, cache_path=None), LatencyModel(2, cache_path=None)
    keys = {one.key(conv, (1, 8, 9, 9), ("dense", ())).text, two.key(conv, (1, 8, 9, 9), ("dense", ())).text,
            one.key(strided, (1, 8, 9, 9), ("dense", ())).text, one.key(conv, (2, 8, 9, 9), ("dense", ())).text,
            one.key(conv, (1, 8, 9, 9), ("channel", (3,))).text, one.key(conv, (1, 8, 9, 9), ("channel", (4,))).text}
    assert len(keys) == 6
    assert json.loads(one.key(conv, (1, 8, 9, 9), ("dense", ())).text)["cpu"]


def test_corrupt_cache_warns_once_and_is_overwritten(tmp_path, caplog):
    path = tmp_path / "latency.json"
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="onnx_lrsd.runtime.latency"):
        model = LatencyModel(cache_path=path, runs=2)
        times = model.measure(_target(matmul_model((4, 16), 8)), (4, 16), [("dense", ()), ("svd", (2,))])
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert "corrupt" in caplog.text and all(t > 0 for t in times)
    assert len(json.loads(path.read_text())["times"]) == 2


def test_uncreatable_cache_directory_runs_without_cache(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="onnx_lrsd.runtime.latency"):
        model = LatencyModel(cache_path=blocker / "sub" / "latency.json", runs=2)
    assert model.cache_path is None and "without cache" in caplog.text
    assert model.measure(_target(matmul_model((4, 16), 8)), (4, 16), [("svd", (2,))])[0] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_default_cache_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ONNX_LRSD_CACHE_DIR", raising=False)
    assert LatencyModel().cache_path == tmp_path / "home" / ".cache" / "onnx_lrsd" / "latency.json"
    monkeypatch.setenv("ONNX_LRSD_CACHE_DIR", str(tmp_path / "env"))
    assert LatencyModel().cache_path == tmp_path / "env" / "latency.json"
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing written before a measure


def test_no_cache_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ONNX_LRSD_CACHE_DIR", str(tmp_path / "env"))
    model = LatencyModel(cache_path=None, runs=2)
    target = _target(matmul_model((4, 16), 8))
    first = model.measure(target, (4, 16), [("dense", ())])
    assert first[0] > 0 and model.measure(target, (4, 16), [("dense", ())]) == first  # kept in memory
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs", [{"threads": 0}, {"runs": 0}, {"warmup": -1}, {"threads": 1.5}])
def test_bad_settings(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        LatencyModel(cache_path=None, **kwargs)


@pytest.mark.parametrize("model, shape, candidates, match", [
    (matmul_model((4, 48), 40), (4, 47), [("dense", ())], "takes 48"),
    (matmul_model((4, 48), 40), (48,), [("dense", ())], "dims"),
    (matmul_model((4, 48, 5), 40, side="left"), (2, 5, 48), [("dense", ())], "takes 48"),
    (gemm_model(4, 48, 40, trans_a=1), (4, 48), [("dense", ())], "takes 48"),
    (gemm_model(4, 48, 40), (2, 4, 48), [("dense", ())], "2 dims"),
    (conv_model(8, 12), (1, 6, 9, 10), [("dense", ())], "channels"),
    (conv_model(8, 12), (8, 9, 10), [("dense", ())], "4 dims"),
    (conv_model(8, 12), (1, 8, 0, 10), [("dense", ())], "positive"),
    (conv_model(8, 12, (3, 3), (10, 10), dilations=(2, 1)), (1, 8, 4, 10), [("dense", ())], "kernel"),
    (conv_model(8, 12, (3, 3), (10, 10), auto_pad="VALID"), (1, 8, 9, 2), [("dense", ())], "kernel"),
    (gemm_model(4, 48, 40), (4, 48), [("spatial", (2,))], "does not apply"),
    (matmul_model((4, 48), 40), (4, 48), [("channel", (2,))], "does not apply"),
    (conv_model(8, 12), (1, 8, 9, 10), [("svd", (2,))], "does not apply"),
    (conv_model(8, 12, (3,), (10,)), (1, 8, 10), [("spatial", (2,))], "2-D"),
    (conv_model(8, 12), (1, 8, 9, 10), [("magic", ())], "does not apply"),
    (matmul_model((4, 48), 40), (4, 48), [("svd", (0,))], "ranks"),
    (matmul_model((4, 48), 40), (4, 48), [("svd", (41,))], "ranks"),
    (matmul_model((4, 48), 40), (4, 48), [("svd", 4)], "ranks"),
    (conv_model(8, 12), (1, 8, 9, 10), [("tucker2", (2,))], "ranks"),
    (conv_model(8, 12), (1, 8, 9, 10), [("dense", (1,))], "ranks"),
])
def test_bad_requests(tmp_path, model, shape, candidates, match):
    with pytest.raises(ValueError, match=match):
        LatencyModel(cache_path=tmp_path / "c.json").measure(_target(model), shape, candidates)
    assert not (tmp_path / "c.json").exists()


def test_interpolate_latency():
    ranks, times = [32, 8, 16], [3.0, 1.0, 1.5]
    for r, t in zip(ranks, times):
        assert interpolate_latency(ranks, times, r) == pytest.approx(t)
    assert interpolate_latency(ranks, times, 12) == pytest.approx(1.25)
    assert interpolate_latency(ranks, times, 24) == pytest.approx(2.25)
    assert interpolate_latency(ranks, times, 48) == pytest.approx(4.5)  # from (16, 1.5), (32, 3.0)
    assert interpolate_latency(ranks, times, 4) == pytest.approx(0.75)  # from (8, 1.0), (16, 1.5)
    assert interpolate_latency([8, 16], [0.5, 2.0], 1) == 0.0  # the line goes below 0
    assert interpolate_latency([8], [0.7], 100) == 0.7
    with pytest.raises(ValueError):
        interpolate_latency([1, 2], [1.0], 1)
    with pytest.raises(ValueError):
        interpolate_latency([2, 2], [1.0, 2.0], 1)


def test_thin_product_is_measurably_faster(tmp_path):
    """Rank 16 of a 1024×1024 MatMul is 1/32 of its FLOPs: far below 0.7× dense in any weather."""
    target = _target(matmul_model((64, 1024), 1024))
    dense, thin = LatencyModel(1, cache_path=tmp_path / "c.json", runs=20).measure(
        target, (64, 1024), [("dense", ()), ("svd", (16,))])
    assert thin < 0.7 * dense, (dense, thin)
