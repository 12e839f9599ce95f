"""Which layers are targets, why the others are skipped, and what `inspect_model` lists
(shapes, parameters and MACs checked by hand on small cases)."""
import numpy as np
import onnx
import pytest
from onnx import helper

from helpers.graphs import Builder, conv_model, gemm_model, matmul_model, max_rel_error, mlp_model, run
from onnx_lrsd.api import compress, inspect_model
from onnx_lrsd.config import LayerOverride
from onnx_lrsd.model.layers import WEIGHT_OPS_NOT_SUPPORTED

FULL = (LayerOverride("*", rank="full"),)


def _skipped(model):
    report = inspect_model(model)
    return {s.name: (s.op, s.reason) for s in report.skipped}, report


def _assert_left_dense(model):
    """Compressing at full rank (every target forced) leaves the model's outputs unchanged,
    and the skipped layers keep their op."""
    skipped, report = _skipped(model)
    result = compress(model, keep=0.5, overrides=FULL if report.targets else ())
    onnx.checker.check_model(result.model)
    ops = {n.name: n.op_type for n in result.model.graph.node}
    for name, (op, _) in skipped.items():
        if name in {n.name for n in model.graph.node}:  # top-level layers
            assert ops[name] == op
    assert {s.name for s in result.report.skipped} == set(skipped)
    return result


# --------------------------------------------------------------------------------------------
# Skip reasons
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cin,cout,group", [(6, 8, 2), (6, 6, 6), (6, 12, 3)], ids=["grouped", "depthwise", "mult"])
def test_grouped_and_depthwise_conv_are_skipped(cin, cout, group):
    model = conv_model(cin=cin, cout=cout, group=group, pads=(1, 1, 1, 1))
    skipped, report = _skipped(model)
    assert report.targets == ()
    assert skipped == {"layer": ("Conv", f"grouped conv (group={group})")}
    result = _assert_left_dense(model)
    assert max_rel_error(model, result.model) == 0.0


def test_conv3d_is_skipped():
    model = conv_model(kernel=(3, 3, 3), spatial=(5, 6, 7), pads=(1,) * 6)
    skipped, report = _skipped(model)
    assert report.targets == ()
    assert skipped == {"layer": ("Conv", "3-D conv is not factorized (1-D and 2-D are)")}
    _assert_left_dense(model)


def _conv_transpose_model():
    b = Builder(seed=1)
    b.input("x", [1, 6, 5, 5])
    b.node("ConvTranspose", ["x", b.init("W", b.randn(6, 4, 3, 3))], ["y"], name="deconv")
    b.output("y", [1, 4, 7, 7])
    return b.model()


def test_conv_transpose_is_skipped():
    model = _conv_transpose_model()
    skipped, report = _skipped(model)
    assert report.targets == ()
    assert skipped == {"deconv": ("ConvTranspose", "ConvTranspose is not factorized")}
    _assert_left_dense(model)


def _shared_weight_model():
    b = Builder(seed=2)
    b.input("x", [4, 8])
    w = b.init("W", b.randn(8, 8))
    b.node("MatMul", ["x", w], ["h"], name="mm1")
    b.node("MatMul", ["h", w], ["h2"], name="mm2")
    b.node("Gemm", ["h2", b.init("G", b.randn(8, 6))], ["y"], name="own")
    b.output("y", [4, 6])
    return b.model()


def test_weight_shared_by_two_nodes_is_skipped_and_the_other_layer_is_not():
    model = _shared_weight_model()
    skipped, report = _skipped(model)
    assert [t.name for t in report.targets] == ["own"]
    assert skipped == {"mm1": ("MatMul", "weight is shared with other nodes"),
                       "mm2": ("MatMul", "weight is shared with other nodes")}
    result = _assert_left_dense(model)
    assert max_rel_error(model, result.model) <= 1e-5
    assert "W" in {t.name for t in result.model.graph.initializer}


def test_weight_shared_through_identity_chains_is_skipped():
    b = Builder(seed=2)
    b.input("x", [4, 8])
    b.init("W", b.randn(8, 8))
    b.node("Identity", ["W"], ["W1"], name="id1")
    b.node("Identity", ["W"], ["W2"], name="id2")
    b.node("MatMul", ["x", "W1"], ["h"], name="mm1")
    b.node("MatMul", ["h", "W2"], ["y"], name="mm2")
    b.output("y", [4, 8])
    skipped, report = _skipped(b.model())
    assert report.targets == ()
    assert skipped == {"mm1": ("MatMul", "weight is shared with other nodes"),
                       "mm2": ("MatMul", "weight is shared with other nodes")}


def test_weight_that_is_also_a_graph_output_is_skipped():
    b = Builder(seed=3)
    b.input("x", [4, 8])
    b.init("W0", b.randn(8, 6))
    b.node("Identity", ["W0"], ["W"], name="id")
    b.node("MatMul", ["x", "W"], ["y"], name="layer")
    b.output("y", [4, 6])
    b.output("W", [8, 6])
    model = b.model()
    skipped, report = _skipped(model)
    assert report.targets == () and skipped == {"layer": ("MatMul", "weight is shared with other nodes")}
    _assert_left_dense(model)


@pytest.mark.parametrize("op", ["Gemm", "Conv"])
def test_weight_as_a_graph_input_is_skipped(op):
    b = Builder(seed=4)
    if op == "Gemm":
        b.input("x", [4, 8])
        b.input("W", [8, 6])
        b.node("Gemm", ["x", "W"], ["y"], name="layer")
        b.output("y", [4, 6])
    else:
        b.input("x", [1, 3, 6, 6])
        b.input("W", [4, 3, 3, 3])
        b.node("Conv", ["x", "W"], ["y"], name="layer", kernel_shape=[3, 3])
        b.output("y", [1, 4, 4, 4])
    model = b.model()
    skipped, report = _skipped(model)
    assert report.targets == () and skipped == {"layer": (op, "weight is a graph input")}
    result = _assert_left_dense(model)
    assert [i.name for i in result.model.graph.input] == [i.name for i in model.graph.input]


def test_matmul_of_two_graph_inputs_is_skipped():
    b = Builder(seed=4)
    b.input("x", [4, 8])
    b.input("W", [8, 6])
    b.node("MatMul", ["x", "W"], ["y"], name="layer")
    b.output("y", [4, 6])
    skipped, report = _skipped(b.model())
    assert report.targets == () and skipped == {"layer": ("MatMul", "no constant operand")}


def _overridable_initializer_model():
    """IR >= 4: an initializer also listed as a graph input is a default the caller may
    override at run time; it is not a constant."""
    b = Builder(seed=5)
    b.input("x", [4, 8])
    b.input("W", [8, 6])
    b.init("W", b.randn(8, 6))
    b.node("MatMul", ["x", "W"], ["y"], name="layer")
    b.output("y", [4, 6])
    return b.model(ir_version=8)


def test_overridable_initializer_keeps_its_graph_input():
    model = _overridable_initializer_model()
    result = compress(model, keep=0.5, overrides=FULL)
    assert [i.name for i in result.model.graph.input] == ["x", "W"]


def test_overridable_initializer_source_is_not_modified():
    model = _overridable_initializer_model()
    before = model.SerializeToString()
    compress(model, keep=0.5)
    assert model.SerializeToString() == before


@pytest.mark.parametrize("op", ["Gemm", "Conv"])
def test_weight_computed_at_run_time_is_skipped(op):
    b = Builder(seed=6)
    if op == "Gemm":
        b.input("x", [4, 8])
        b.init("W0", b.randn(8, 6))
        b.node("Relu", ["W0"], ["W"], name="relu")
        b.node("Gemm", ["x", "W"], ["y"], name="layer")
        b.output("y", [4, 6])
    else:
        b.input("x", [1, 3, 6, 6])
        b.input("s", [1])
        b.init("W0", b.randn(4, 3, 3, 3))
        b.node("Mul", ["W0", "s"], ["W"], name="scale")
        b.node("Conv", ["x", "W"], ["y"], name="layer", kernel_shape=[3, 3])
        b.output("y", [1, 4, 4, 4])
    model = b.model()
    skipped, report = _skipped(model)
    producer = "Relu" if op == "Gemm" else "Mul"
    assert report.targets == ()
    assert skipped == {"layer": (op, f"weight is computed at run time (by {producer})")}
    _assert_left_dense(model)


def test_gemm_with_constant_first_operand_is_skipped():
    b = Builder(seed=6)
    b.input("x", [8, 4])
    b.node("Gemm", [b.init("A", b.randn(6, 8)), "x"], ["y"], name="layer")
    b.output("y", [6, 4])
    skipped, report = _skipped(b.model())
    assert report.targets == ()
    assert skipped == {"layer": ("Gemm", "first operand is constant (weight on the left of a Gemm)")}


def _dequantized_weight_model(op):
    b = Builder(seed=7)
    b.input("x", [4, 8])
    b.init("Wq", np.ones((8, 6), np.int8))
    b.init("scale", np.array(0.1, np.float32))
    b.init("zero", np.array(0, np.int8))
    b.node("DequantizeLinear", ["Wq", "scale", "zero"], ["W"], name="dq")
    b.node(op, ["x", "W"], ["y"], name="layer")
    b.output("y", [4, 6])
    return b.model()


def test_dequantized_gemm_weight_is_skipped_as_quantized():
    skipped, report = _skipped(_dequantized_weight_model("Gemm"))
    assert report.targets == () and skipped == {"layer": ("Gemm", "weight is quantized (DequantizeLinear)")}


def test_dequantized_matmul_weight_is_skipped_as_quantized():
    skipped, report = _skipped(_dequantized_weight_model("MatMul"))
    assert report.targets == () and skipped == {"layer": ("MatMul", "weight is quantized (DequantizeLinear)")}


def test_integer_matmul_is_skipped():
    rng = np.random.default_rng(8)
    b = Builder()
    b.input("x", [4, 8], np.uint8)
    b.init("W", rng.integers(0, 255, (8, 6)).astype(np.uint8))
    b.node("MatMulInteger", ["x", "W"], ["y"], name="layer")
    b.output("y", [4, 6], np.int32)
    model = b.model()
    skipped, report = _skipped(model)
    assert report.targets == ()
    assert skipped == {"layer": ("MatMulInteger", WEIGHT_OPS_NOT_SUPPORTED["MatMulInteger"])}
    assert "integer" in skipped["layer"][1]
    result = compress(model)
    assert result.report.layers == () and len(result.report.skipped) == 1


def test_integer_weights_of_a_plain_matmul_are_skipped():
    b = Builder()
    b.input("x", [4, 8], np.int32)
    b.init("W", np.arange(48, dtype=np.int32).reshape(8, 6))
    b.node("MatMul", ["x", "W"], ["y"], name="layer")
    b.output("y", [4, 6], np.int32)
    skipped, report = _skipped(b.model())
    assert report.targets == () and skipped == {"layer": ("MatMul", "int32 weights are not factorized")}


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # verify: inf - inf
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_skipped(bad):
    b = Builder(seed=9)
    b.input("x", [4, 8])
    w = b.randn(8, 6)
    w[2, 3] = bad
    b.init("W", w)
    b.node("MatMul", ["x", "W"], ["y"], name="layer")
    b.output("y", [4, 6])
    model = b.model()
    skipped, report = _skipped(model)
    assert report.targets == () and skipped == {"layer": ("MatMul", "weight has NaN or inf values")}
    _assert_left_dense(model)


def _body(node_name, weight, out):
    """A subgraph computing x @ weight (outer-scope x and weight)."""
    b = Builder()
    b.node("MatMul", ["x", weight], [out], name=node_name)
    b.output(out, [4, 6])
    return helper.make_graph(b.nodes, f"{node_name}_body", [], b.outputs, b.initializers)


def _if_model(share_with_top=False):
    b = Builder(seed=10)
    b.input("x", [4, 8])
    b.input("cond", [], np.bool_)
    b.init("Wt", b.randn(8, 6))
    b.init("We", b.randn(8, 6))
    b.init("Wtop", b.randn(8, 6))
    b.node("MatMul", ["x", "Wt" if share_with_top else "Wtop"], ["top"], name="top_mm")
    b.node("If", ["cond"], ["branch"], name="if", then_branch=_body("then_mm", "Wt", "t"),
           else_branch=_body("else_mm", "We", "e"))
    b.node("Add", ["top", "branch"], ["y"], name="add")
    b.output("y", [4, 6])
    return b.model()


def test_layers_inside_if_bodies_are_listed_as_skipped():
    model = _if_model()
    skipped, report = _skipped(model)
    assert [t.name for t in report.targets] == ["top_mm"]
    reason = "inside an If body (subgraphs are not rewritten)"
    assert skipped == {"then_mm": ("MatMul", reason), "else_mm": ("MatMul", reason)}
    result = _assert_left_dense(model)
    for cond in (True, False):
        feeds = {"x": np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32), "cond": np.array(cond)}
        np.testing.assert_allclose(run(result.model, feeds)[0], run(model, feeds)[0], rtol=1e-4, atol=1e-5)


def test_weight_shared_with_an_if_body_is_not_rewritten():
    """An outer-scope weight read inside a subgraph is shared: factorizing the top-level
    layer would delete the tensor the body still needs."""
    model = _if_model(share_with_top=True)
    skipped, report = _skipped(model)
    assert report.targets == ()
    assert skipped["top_mm"] == ("MatMul", "weight is shared with other nodes")
    result = _assert_left_dense(model)
    assert max_rel_error(model, result.model) == 0.0


def test_unnamed_layers_inside_subgraphs_are_listed_with_names():
    b = Builder(seed=10)
    b.input("x", [4, 8])
    b.input("cond", [], np.bool_)
    b.init("Wt", b.randn(8, 6))
    b.init("We", b.randn(8, 6))
    b.node("If", ["cond"], ["y"], name="if", then_branch=_body("", "Wt", "t"), else_branch=_body("", "We", "e"))
    b.output("y", [4, 6])
    names = [s.name for s in inspect_model(b.model()).skipped]
    assert len(names) == 2
    assert all(names) and len(set(names)) == 2, names


def test_layers_inside_loop_bodies_are_listed_as_skipped():
    body = Builder()
    body.input("i", [], np.int64)
    body.input("cond_in", [], np.bool_)
    body.input("h", [4, 8])
    body.node("Identity", ["cond_in"], ["cond_out"], name="loop_cond")
    body.node("MatMul", ["h", "LW"], ["h2"], name="loop_mm")
    body.node("Gemm", ["h2", "LG"], ["h3"], name="loop_gemm")
    body.output("cond_out", [], np.bool_)
    body.output("h3", [4, 8])
    graph = helper.make_graph(body.nodes, "loop_body", body.inputs, body.outputs)
    b = Builder(seed=11)
    b.input("x", [4, 8])
    b.init("LW", b.randn(8, 8, scale=0.3))
    b.init("LG", b.randn(8, 8, scale=0.3))
    b.init("trips", np.array(2, np.int64))
    b.init("go", np.array(True))
    b.node("Loop", ["trips", "go", "x"], ["y"], name="loop", body=graph)
    b.output("y", [4, 8])
    model = b.model()
    skipped, report = _skipped(model)
    reason = "inside a Loop body (subgraphs are not rewritten)"
    assert report.targets == ()
    assert skipped == {"loop_mm": ("MatMul", reason), "loop_gemm": ("Gemm", reason)}
    result = _assert_left_dense(model)
    assert max_rel_error(model, result.model) == 0.0


def test_an_override_can_name_a_skipped_layer():
    """A skipped layer's name is a known name: an override for it is not a misspelling."""
    model = _shared_weight_model()
    result = compress(model, overrides=(LayerOverride("mm1", skip=True),))
    assert [layer.name for layer in result.report.layers] == ["own"]


# --------------------------------------------------------------------------------------------
# inspect_model: shapes, params, MACs by hand
# --------------------------------------------------------------------------------------------
def _target(report, name):
    (info,) = [t for t in report.targets if t.name == name]
    return info


def test_inspect_gemm_shapes_params_macs():
    for trans_a, trans_b in [(0, 0), (1, 1)]:
        report = inspect_model(gemm_model(m=4, k=12, n=10, trans_a=trans_a, trans_b=trans_b, bias="n"))
        info = _target(report, "layer")
        assert info.op == "Gemm"
        assert info.weight_shape == ((10, 12) if trans_b else (12, 10))
        assert info.params == 120
        assert info.macs == 4 * 12 * 10
        assert report.params == 120 + 10  # weight + bias
        assert report.macs == 4 * 12 * 10
        assert info.share == pytest.approx(120 / 130)


@pytest.mark.parametrize("x_shape,side,macs", [
    ((4, 12), "right", 4 * 12 * 10),
    ((2, 3, 12), "right", 6 * 12 * 10),
    ((2, 3, 5, 12), "right", 30 * 12 * 10),
    (("batch", 3, 12), "right", 3 * 12 * 10),  # symbolic dims count as 1
    ((12, 7), "left", 7 * 12 * 10),  # W [10, 12] @ x [12, 7]
    ((2, 12, 7), "left", 14 * 12 * 10),
])
def test_inspect_matmul_macs(x_shape, side, macs):
    report = inspect_model(matmul_model(x_shape, n=10, side=side))
    info = _target(report, "layer")
    assert info.weight_shape == ((12, 10) if side == "right" else (10, 12))
    assert info.params == 120 and info.macs == macs
    assert report.macs == macs and report.params == 120


@pytest.mark.parametrize("kwargs,out_positions", [
    (dict(kernel=(3, 3), spatial=(9, 10)), 7 * 8),
    (dict(kernel=(3, 3), spatial=(9, 10), strides=(2, 2), pads=(1, 1, 1, 1)), 5 * 5),
    (dict(kernel=(5, 3), spatial=(9, 10), strides=(2, 3), auto_pad="SAME_UPPER"), 5 * 4),
    (dict(kernel=(1, 5), spatial=(9, 10), auto_pad="VALID", dilations=(1, 2)), 9 * 2),
    (dict(kernel=(3,), spatial=(11,), strides=(2,), pads=(1, 2)), 6),
    (dict(kernel=(1, 1), spatial=(9, 10)), 90),
])
def test_inspect_conv_macs(kwargs, out_positions):
    report = inspect_model(conv_model(cin=6, cout=8, **kwargs))
    info = _target(report, "layer")
    k = int(np.prod(kwargs["kernel"]))
    assert info.weight_shape == (8, 6, *kwargs["kernel"])
    assert info.params == 8 * 6 * k
    assert info.macs == out_positions * 6 * k * 8
    assert report.macs == info.macs
    assert report.params == 8 * 6 * k + 8


def test_inspect_conv_with_weight_in_a_constant_node():
    report = inspect_model(conv_model(cin=6, cout=8, kernel=(3, 3), spatial=(9, 10), via="constant"))
    info = _target(report, "layer")
    assert info.params == 432 and info.macs == 7 * 8 * 432
    assert report.params == 432 + 8  # Constant nodes count as parameters
    assert report.macs == info.macs


def test_inspect_lists_targets_in_order_and_skipped_layers():
    b = Builder(seed=12)
    b.input("x", [1, 6, 8, 8])
    b.node("Conv", ["x", b.init("w1", b.randn(8, 6, 3, 3))], ["c1"], name="conv", kernel_shape=[3, 3],
           pads=[1, 1, 1, 1])
    b.node("Conv", ["c1", b.init("w2", b.randn(8, 4, 3, 3))], ["c2"], name="grouped", kernel_shape=[3, 3],
           pads=[1, 1, 1, 1], group=2)
    b.node("Flatten", ["c2"], ["f"], name="flatten")
    b.node("Gemm", ["f", b.init("fc", b.randn(10, 512))], ["y"], name="fc", transB=1)
    b.output("y", [1, 10])
    report = inspect_model(b.model())
    assert [(t.name, t.op) for t in report.targets] == [("conv", "Conv"), ("fc", "Gemm")]
    assert [(s.name, s.op, s.reason) for s in report.skipped] == [("grouped", "Conv", "grouped conv (group=2)")]
    conv, fc = report.targets
    assert conv.macs == 64 * 54 * 8 and fc.macs == 512 * 10
    grouped = 64 * 36 * 8  # a grouped conv still costs MACs: out positions × (Cin/g·k) × Cout
    assert report.macs == conv.macs + grouped + fc.macs
    assert report.params == 432 + 288 + 5120
    assert sum(t.share for t in report.targets) == pytest.approx((432 + 5120) / report.params)
    text = report.to_text()
    assert "grouped" in text and "grouped conv (group=2)" in text
    assert report.to_dict()["targets"][0]["name"] == "conv"


def test_inspect_does_not_modify_the_model_and_accepts_unnamed_nodes():
    model = mlp_model()
    for node in model.graph.node:
        node.name = ""
    before = model.SerializeToString()
    report = inspect_model(model)
    assert model.SerializeToString() == before
    assert [t.name for t in report.targets] == ["MatMul_0", "MatMul_3", "MatMul_6"]
    assert [t.macs for t in report.targets] == [16 * 32, 32 * 24, 24 * 8]  # symbolic batch counts as 1
