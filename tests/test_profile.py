"""Per-layer profiles: onnxruntime's kernels mapped back to the model's nodes through its
fusions and renames, compressed chains to the layer they replace, times that add up."""
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_lrsd
from onnx_lrsd.runtime.bench import cold_start
from onnx_lrsd.runtime.feeds import random_feeds
from onnx_lrsd.passes import NameNodesPass
from onnx_lrsd.runtime.profile import (
    ExecutedNode,
    compare_profiles,
    layer_of,
    map_kernels,
    name_nodes,
    profile_layers,
    profile_models,
    summarize_profile,
)
from onnx_lrsd.testing.zoo import zoo_model

WEIGHT_OPS = ("Conv", "Gemm", "MatMul")


def _fused_cnn(seed: int = 0) -> onnx.ModelProto:
    """Unnamed and duplicate-named nodes; Conv + BatchNormalization + Relu, a residual Add, a
    weight behind a Constant node and a Transpose (folded), MatMul + bias Add, an Identity."""
    rng = np.random.default_rng(seed)

    def init(name, *shape, scale=0.2):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    c = 32
    inits = [init("w1", c, 8, 3, 3), init("b1", c, scale=0.1), init("w2", c, c, 1, 1),
             numpy_helper.from_array(np.ones(c, np.float32), "bn_scale"), init("bn_bias", c),
             init("bn_mean", c, scale=0.05), numpy_helper.from_array(np.ones(c, np.float32), "bn_var"),
             init("fc_wt", 10, c), init("fc_b", 10)]
    w3 = numpy_helper.from_array((rng.standard_normal((c, c, 3, 3)) * 0.05).astype(np.float32), "w3v")
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["n1"]),
        helper.make_node("Relu", ["n1"], ["r1"], name="act"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="branch"),
        helper.make_node("Relu", ["c2"], ["r2"], name="act"),  # a duplicate name
        helper.make_node("Constant", [], ["w3"], value=w3),
        helper.make_node("Conv", ["r2", "w3"], ["c3"], name="conv3", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c3", "r1"], ["s"], name="residual"),
        helper.make_node("Relu", ["s"], ["r3"]),
        helper.make_node("GlobalAveragePool", ["r3"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Transpose", ["fc_wt"], ["fc_w"], perm=[1, 0]),
        helper.make_node("MatMul", ["f", "fc_w"], ["mm"], name="fc"),
        helper.make_node("Add", ["mm", "fc_b"], ["logits"], name="fc/bias"),
        helper.make_node("Identity", ["logits"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "fused_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                 ["batch", 8, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    name_nodes(copy)
    return copy


def _accounted(profile, model) -> None:
    """Every node of `model` is a profiled layer's node or listed as not executed, every weight
    layer has time of its own, and the layers' times add up to the kernel time."""
    names = [n.name for n in _named(model).graph.node]
    covered = [n for layer in profile.layers for n in layer.nodes] + list(profile.unexecuted)
    assert sorted(covered) == sorted(names)  # each node exactly once
    for node in _named(model).graph.node:
        if node.op_type in WEIGHT_OPS:
            layer = profile.layer(layer_of(node.name))
            assert layer is not None and layer.ms > 0, node.name
    assert sum(layer.ms for layer in profile.layers) == pytest.approx(profile.op_ms, rel=1e-9)
    assert sum(layer.share for layer in profile.layers) == pytest.approx(1.0, rel=1e-9)
    assert 0 < profile.op_ms and 0 < profile.run_op_ms <= profile.run_ms
    assert sum(profile.ms_by_op.values()) == pytest.approx(profile.op_ms, rel=1e-9)
    assert all(layer.name in [layer_of(n) for n in names] for layer in profile.layers)


def test_name_nodes_matches_the_compressor_names():
    model = _fused_cnn()
    expected = NameNodesPass().call(gs.import_onnx(model), None).graph
    named = _named(model)
    assert [n.name for n in named.graph.node] == [n.name for n in expected.nodes]
    assert [n.name for n in named.graph.node][:5] == ["Conv_0", "BatchNormalization_1", "act", "branch", "act_1"]
    assert len({n.name for n in named.graph.node}) == len(named.graph.node)


def test_synthetic_profile_maps_every_node():
    model = _fused_cnn()
    feeds = random_feeds(model, batch=2)
    profile = profile_layers(model, feeds, threads=1, runs=5, warmup=2)
    _accounted(profile, model)
    assert profile.runs == 5 and profile.batch == 2 and profile.arena_peak_bytes > 0
    first = profile.layer("Conv_0")  # BatchNormalization and Relu run inside the conv's kernel
    assert {"BatchNormalization_1", "act"} <= set(first.nodes)
    assert set(profile.unexecuted) == {"Constant_5", "Transpose_11"}  # folded at session creation
    fc = profile.layer("fc")
    assert "fc/bias" in fc.nodes and profile.layer("fc/bias") is None
    assert model.graph.node[0].name == ""  # the input is not modified


def test_zoo_profile_maps_every_node():
    model = zoo_model("resnet50")
    profile = profile_layers(model, random_feeds(model), threads=2, runs=3, warmup=1)
    _accounted(profile, model)
    convs = [n for n in _named(model).graph.node if n.op_type == "Conv"]
    assert len([layer for layer in profile.layers if layer.op == "Conv"]) == len(convs)
    assert 0.5 < profile.op_ms / profile.run_op_ms < 2  # kernels' medians: about the median run's kernel time


def test_compressed_chains_map_to_the_layers_they_replace():
    model = _fused_cnn()
    result = onnx_lrsd.compress(model, keep=0.5, min_layer_share=0.0, verify=False)
    factorized = [layer.name for layer in result.report.layers if layer.method != "dense"]
    assert len(factorized) >= 2
    feeds = random_feeds(model, batch=2)
    base, small = profile_models([model, result.model], feeds, threads=1, runs=3, warmup=1,
                                 labels=["original", "compressed"])
    assert (base.model, small.model, base.runs, small.runs) == ("original", "compressed", 3, 3)
    _accounted(small, result.model)
    assert not any("/lrsd/" in layer.name for layer in small.layers)
    for name in factorized:
        layer = small.layer(name)
        assert layer is not None and any("/lrsd/" in n for n in layer.nodes) and len(layer.kernels) >= 2
    rows = {row.name: row for row in compare_profiles(base, small)}
    assert set(factorized) <= set(rows)
    assert all(rows[name].baseline_ms and rows[name].candidate_ms for name in factorized)


def _graph(nodes):
    return helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                             [numpy_helper.from_array(np.ones((2, 2), np.float32), n) for n in ("w", "w2", "b")])


def test_map_kernels_follows_onnxruntime_renames():
    graph = _graph([
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["m"], name="fc"),
        helper.make_node("Add", ["m", "b"], ["a"], name="fc_add"),
        helper.make_node("Mul", ["a", "b"], ["y"], name="scale"),
    ])
    executed = [
        ExecutedNode("ReorderInput", "ReorderInput", ("x",), ("t0",)),
        ExecutedNode("r_nchwc", "Conv", ("t0", "w"), ("t1",)),  # named after the Relu's output tensor
        ExecutedNode("ReorderOutput", "ReorderOutput", ("t1",), ("r",)),
        ExecutedNode("fc/MatMulAddFusion", "Gemm", ("r", "w2", "b"), ("a",)),
        ExecutedNode("scale/MulFusion/", "FusedMul", ("a", "b"), ("y2",)),  # found by its name's prefix
    ]
    mapping = map_kernels(graph, executed)
    assert mapping.layer == {"ReorderInput": "conv", "r_nchwc": "conv", "ReorderOutput": "conv",
                             "fc/MatMulAddFusion": "fc", "scale/MulFusion/": "scale"}
    assert mapping.covered["r_nchwc"] == ("conv", "relu")
    assert mapping.covered["fc/MatMulAddFusion"] == ("fc", "fc_add")
    assert mapping.unexecuted == ()


def test_summary_medians_over_runs_after_warmup():
    graph = _graph([helper.make_node("MatMul", ["x", "w"], ["h"], name="a/lrsd/u"),
                    helper.make_node("MatMul", ["h", "w2"], ["y"], name="a/lrsd/v")])
    executed = [ExecutedNode("a/lrsd/u", "MatMul", ("x", "w"), ("h",)),
                ExecutedNode("a/lrsd/v", "MatMul", ("h", "w2"), ("y",))]

    def kernel(name, ts, dur):
        return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur,
                "args": {"op_name": "MatMul", "mem_in_use_peak": "4096"}}

    events = [{"name": "model_run", "ts": 0, "dur": 1000}, kernel("a/lrsd/u", 10, 900),  # warm-up
              {"name": "model_run", "ts": 2000, "dur": 100}, kernel("a/lrsd/u", 2010, 30), kernel("a/lrsd/v", 2050, 40),
              {"name": "model_run", "ts": 3000, "dur": 120}, kernel("a/lrsd/u", 3010, 50), kernel("a/lrsd/v", 3060, 40),
              {"name": "model_run", "ts": 4000, "dur": 90}, kernel("a/lrsd/u", 4010, 40), kernel("a/lrsd/v", 4060, 35)]
    profile = summarize_profile(graph, executed, events, warmup=1, threads=1, batch=1)
    assert profile.runs == 3 and [layer.name for layer in profile.layers] == ["a"]
    assert profile.layers[0].ms == pytest.approx(0.040 + 0.040) and profile.op_ms == pytest.approx(0.080)
    assert profile.run_op_ms == pytest.approx(0.075)  # runs of 70, 90 and 75 µs
    assert profile.run_ms == pytest.approx(0.100) and profile.arena_peak_bytes == 4096
    assert profile.layers[0].kernels == ("MatMul", "MatMul")
    by_name = summarize_profile(graph, [], events, warmup=1, threads=1, batch=1)  # no executed graph saved
    assert by_name.layers == profile.layers


def test_cold_start_in_a_fresh_process(tmp_path):
    model = _named(_fused_cnn())  # onnxruntime refuses duplicate node names
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    cold = cold_start(path, random_feeds(model), threads=1, runs=2)
    assert cold.session_ms > 0 and cold.first_run_ms > 0 and cold.repeats == 1
    if Path("/proc/self/status").is_file():  # Linux reports resident memory
        assert cold.peak_rss_bytes > 0 and cold.rss_bytes is not None


def test_map_kernels_claims_the_activation_a_kernel_writes():
    """A FusedConv keeps the conv's name but writes the Relu's output: the Relu is its node."""
    graph = _graph([helper.make_node("Conv", ["x", "w"], ["c"], name="conv/lrsd/v"),
                    helper.make_node("Relu", ["c"], ["y"], name="relu")])
    mapping = map_kernels(graph, [ExecutedNode("conv/lrsd/v", "FusedConv", ("x", "w"), ("y",))])
    assert mapping.covered["conv/lrsd/v"] == ("conv/lrsd/v", "relu") and mapping.unexecuted == ()
    assert layer_of(mapping.layer["conv/lrsd/v"]) == "conv"
