"""Layer-input statistics from calibration data run through onnxruntime (onnx_lrsd.runtime.activations).

Every expectation is checked against what onnxruntime (or the ONNX reference evaluator, where
onnxruntime refuses an attribute combination) actually computes, never against the code under
test.
"""
import logging
import tracemalloc

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnx_lrsd.runtime.activations import (
    ActivationRunner,
    collect_paired_statistics,
    collect_statistics,
    explicit_pads,
    gram_bytes,
    layer_rows,
    memory_groups,
    prefetched,
    pruned_to,
)
from onnx_lrsd.runtime.calibrate import is_held_out, split_holdout
from onnx_lrsd.config import CompressConfig
from onnx_lrsd.errors import LrsdError
from onnx_lrsd.model.graph import import_graph, model_template
from onnx_lrsd.passes import FindTargetsPass, NameNodesPass, PassContext, PassManager

from helpers.graphs import make_model

F = TensorProto.FLOAT


# ---------------------------------------------------------------------------------------------
# graph builders and helpers


def run_ort(model, feeds, names=None):
    """Run in onnxruntime (optimisations off); `names` may be intermediate tensors (appended
    to the graph outputs of a copy, independently of the code under test)."""
    if names is not None:
        extended = onnx.ModelProto()
        extended.CopyFrom(model)
        listed = {o.name for o in extended.graph.output}
        extended.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in listed)
        model = extended
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(names, feeds)


def find_targets(model):
    """{node name: LayerTarget} as the pipeline finds them."""
    ctx = PassContext(config=CompressConfig(verify=False), source=model, template=model_template(model))
    PassManager([NameNodesPass(), FindTargetsPass()]).run(import_graph(model), ctx)
    return ctx.targets


def randn(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def conv_model(x_shape, cout, kernel, strides, dilations, auto_pad=None, pads=None, seed=0):
    rng = np.random.default_rng(seed)
    attrs = {"kernel_shape": list(kernel), "strides": list(strides), "dilations": list(dilations)}
    if auto_pad is not None:
        attrs["auto_pad"] = auto_pad
    if pads is not None:
        attrs["pads"] = list(pads)
    w = randn(rng, cout, x_shape[1], *kernel)
    return make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attrs)],
                      [("x", F, list(x_shape))], [("y", F, None)], {"w": w})


# ---------------------------------------------------------------------------------------------
# 1. explicit_pads: auto_pad resolved exactly as onnxruntime resolves it


PAD_CASES = [  # x shape, kernel, strides, dilations
    ((1, 2, 7, 8), (3, 2), (2, 3), (1, 1)),
    ((1, 2, 5, 6), (4, 3), (1, 2), (1, 1)),    # even kernel: the odd pad goes to one side
    ((1, 2, 9, 10), (3, 3), (2, 2), (1, 1)),
    ((1, 2, 8), (1,), (3,), (1,)),             # stride > kernel: needed pad is negative -> 0
    ((1, 2, 11), (4,), (3,), (1,)),
    ((2, 3, 6, 5), (2, 4), (3, 1), (1, 1)),
]
DILATED_CASES = [
    ((1, 2, 7, 8), (3, 2), (2, 3), (1, 2)),
    ((1, 2, 9, 10), (3, 3), (2, 2), (2, 3)),
    ((1, 2, 6, 5), (2, 4), (3, 1), (2, 1)),
    ((1, 2, 12), (3,), (2,), (3,)),
]


def _explicit_for(model, x_shape):
    (target,) = find_targets(model).values()
    return explicit_pads(target.conv, x_shape[2:])


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize("x_shape, kernel, strides, dilations", PAD_CASES)
def test_explicit_pads_match_onnxruntime(auto_pad, x_shape, kernel, strides, dilations):
    x = np.random.default_rng(1).standard_normal(x_shape).astype(np.float32)
    auto = conv_model(x_shape, 3, kernel, strides, dilations, auto_pad=auto_pad)
    pads = _explicit_for(auto, x_shape)
    assert len(pads) == 2 * len(kernel) and all(p >= 0 for p in pads)
    explicit = conv_model(x_shape, 3, kernel, strides, dilations, pads=pads)
    (y_auto,), (y_explicit,) = run_ort(auto, {"x": x}), run_ort(explicit, {"x": x})
    assert y_auto.shape == y_explicit.shape
    np.testing.assert_array_equal(y_auto, y_explicit)
    if auto_pad != "VALID":  # SAME keeps ceil(in / stride) positions
        assert y_auto.shape[2:] == tuple(-(-n // s) for n, s in zip(x_shape[2:], strides))


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize("x_shape, kernel, strides, dilations", DILATED_CASES)
def test_explicit_pads_with_dilations_match_the_onnx_reference(auto_pad, x_shape, kernel, strides, dilations):
    """onnxruntime rejects SAME_* with dilations ("Dilation not supported"), so the ONNX
    reference evaluator is the judge for those; VALID also runs in onnxruntime."""
    x = np.random.default_rng(2).standard_normal(x_shape).astype(np.float32)
    auto = conv_model(x_shape, 3, kernel, strides, dilations, auto_pad=auto_pad)
    pads = _explicit_for(auto, x_shape)
    explicit = conv_model(x_shape, 3, kernel, strides, dilations, pads=pads)
    y_auto = ReferenceEvaluator(auto).run(None, {"x": x})[0]
    y_explicit = ReferenceEvaluator(explicit).run(None, {"x": x})[0]
    assert y_auto.shape == y_explicit.shape
    np.testing.assert_allclose(y_auto, y_explicit, rtol=1e-5, atol=1e-5)
    (y_ort,) = run_ort(explicit, {"x": x})
    np.testing.assert_allclose(y_ort, y_explicit, rtol=1e-4, atol=1e-4)


def test_explicit_pads_known_values_and_notset():
    """SAME_UPPER puts the odd pad at the end, SAME_LOWER at the beginning; NOTSET keeps the
    attribute pads; VALID pads nothing."""
    upper = _explicit_for(conv_model((1, 1, 5, 5), 1, (4, 4), (1, 1), (1, 1), auto_pad="SAME_UPPER"), (1, 1, 5, 5))
    lower = _explicit_for(conv_model((1, 1, 5, 5), 1, (4, 4), (1, 1), (1, 1), auto_pad="SAME_LOWER"), (1, 1, 5, 5))
    assert upper == (1, 1, 2, 2) and lower == (2, 2, 1, 1)
    notset = conv_model((1, 2, 6, 7), 3, (3, 3), (2, 1), (1, 2), pads=(0, 2, 1, 3))
    assert _explicit_for(notset, (1, 2, 6, 7)) == (0, 2, 1, 3)
    x = np.random.default_rng(3).standard_normal((1, 2, 6, 7)).astype(np.float32)
    (y,) = run_ort(notset, {"x": x})
    assert y.shape == (1, 3, 3, 8)  # H: (6+0+1-3)//2+1, W: (7+2+3-5)//1+1 (dilated span 5)
    valid = conv_model((1, 2, 6, 7), 3, (3, 2), (2, 2), (1, 1), auto_pad="VALID")
    assert _explicit_for(valid, (1, 2, 6, 7)) == (0, 0, 0, 0)
    # pads resolve for the size actually fed, not the declared one
    same = conv_model((1, 2, 6, 7), 3, (4, 4), (1, 1), (1, 1), auto_pad="SAME_UPPER")
    (target,) = find_targets(same).values()
    assert explicit_pads(target.conv, (6, 7)) == (1, 1, 2, 2)
    assert explicit_pads(target.conv, (1, 1)) == (1, 1, 2, 2)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(size=st.integers(1, 12), kernel=st.integers(1, 5), stride=st.integers(1, 4),
       upper=st.booleans())
def test_explicit_pads_property_against_onnxruntime_1d(size, kernel, stride, upper):
    auto_pad = "SAME_UPPER" if upper else "SAME_LOWER"
    x_shape = (1, 1, size + kernel - 1)  # every kernel fits
    x = np.random.default_rng(size).standard_normal(x_shape).astype(np.float32)
    auto = conv_model(x_shape, 2, (kernel,), (stride,), (1,), auto_pad=auto_pad)
    pads = _explicit_for(auto, x_shape)
    explicit = conv_model(x_shape, 2, (kernel,), (stride,), (1,), pads=pads)
    np.testing.assert_array_equal(run_ort(auto, {"x": x})[0], run_ort(explicit, {"x": x})[0])


# ---------------------------------------------------------------------------------------------
# 2. layer_rows: rows @ target.matrix() is the layer's output (before bias) in onnxruntime


def _rows_case(model, feeds, layer, pre_bias_output, mask=None, max_positions=10**9):
    """(rows, row mask, target, onnxruntime's output of the layer before bias)."""
    target = find_targets(model)[layer]
    x, y = run_ort(model, feeds, [target.activation, pre_bias_output])
    rows, row_mask = layer_rows(target, x, mask, max_positions, np.random.default_rng(0))
    return rows, row_mask, target, y


@pytest.mark.parametrize("trans_a, trans_b", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_layer_rows_gemm(trans_a, trans_b):
    rng = np.random.default_rng(4)
    n, k, m = 7, 6, 5
    a = randn(rng, *((k, n) if trans_a else (n, k)))
    w = randn(rng, *((m, k) if trans_b else (k, m)))
    model = make_model([helper.make_node("Gemm", ["a", "w"], ["y"], name="gemm", transA=trans_a, transB=trans_b)],
                       [("a", F, list(a.shape))], [("y", F, None)], {"w": w})
    rows, row_mask, target, y = _rows_case(model, {"a": a}, "gemm", "y")
    assert row_mask is None and rows.shape == (n, k)
    assert target.matrix().shape == (k, m)
    np.testing.assert_allclose(rows @ target.matrix(), y, rtol=1e-5, atol=1e-5)


def test_layer_rows_gemm_with_bias_alpha_beta():
    """Gemm output = alpha · rows @ W + beta · C."""
    rng = np.random.default_rng(5)
    a, w, c = randn(rng, 4, 6), randn(rng, 5, 6), randn(rng, 5)
    model = make_model([helper.make_node("Gemm", ["a", "w", "c"], ["y"], name="gemm", transB=1, alpha=0.5, beta=2.0)],
                       [("a", F, [4, 6])], [("y", F, None)], {"w": w, "c": c})
    rows, _, target, y = _rows_case(model, {"a": a}, "gemm", "y")
    np.testing.assert_allclose(0.5 * rows @ target.matrix(), y - 2.0 * c, rtol=1e-5, atol=1e-5)


def _masked_matmul_model(rng, b=3, s=5, h=6, o=4):
    """x [B, S, H] -> MatMul(x, w) + bias -> y; also Transpose(x) -> MatMul(wl, xt) (weight on
    the left) -> yl [B, O, S]; a mask [B, S] input."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"], name="right"),
             helper.make_node("Add", ["xw", "bias"], ["y"], name="bias_add"),
             helper.make_node("Transpose", ["x"], ["xt"], name="transpose", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["wl", "xt"], ["yl"], name="left"),
             helper.make_node("Cast", ["mask"], ["mask_f"], name="cast", to=F)]
    return make_model(nodes, [("x", F, ["b", s, h]), ("mask", TensorProto.INT64, ["b", s])],
                      [("y", F, None), ("yl", F, None), ("mask_f", F, None)],
                      {"w": randn(rng, h, o), "bias": randn(rng, o), "wl": randn(rng, o, h)})


def test_layer_rows_matmul_right_3d_with_mask():
    rng = np.random.default_rng(6)
    model = _masked_matmul_model(rng)
    x = randn(rng, 3, 5, 6)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=np.int64)
    rows, row_mask, target, xw = _rows_case(model, {"x": x, "mask": mask}, "right", "xw", mask=mask != 0)
    assert target.weight_side == "right" and rows.shape == (3, 5, 6)
    np.testing.assert_array_equal(row_mask, mask != 0)
    np.testing.assert_allclose(rows @ target.matrix(), xw, rtol=1e-5, atol=1e-5)
    # a mask that does not fit the rows is not applied
    _, no_mask, _, _ = _rows_case(model, {"x": x, "mask": mask}, "right", "xw", mask=np.ones((3, 4), bool))
    assert no_mask is None


def test_layer_rows_matmul_left():
    """y = W @ x: the rows are x's last two axes swapped; the [B, S] mask applies to them."""
    rng = np.random.default_rng(7)
    model = _masked_matmul_model(rng)
    x = randn(rng, 3, 5, 6)
    mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=np.int64)
    rows, row_mask, target, yl = _rows_case(model, {"x": x, "mask": mask}, "left", "yl", mask=mask != 0)
    assert target.weight_side == "left" and target.activation == "xt"
    assert rows.shape == (3, 5, 6)  # [B, S, in]
    np.testing.assert_array_equal(row_mask, mask != 0)
    np.testing.assert_allclose(rows @ target.matrix(), np.swapaxes(yl, -1, -2), rtol=1e-5, atol=1e-5)


CONV_ROW_CASES = [  # x shape, kernel, strides, dilations, pads or auto_pad
    ((2, 3, 8, 9), (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)),
    ((2, 3, 9, 8), (3, 2), (2, 3), (2, 1), (0, 2, 1, 0)),
    ((1, 4, 7, 7), (4, 3), (2, 2), (1, 1), "SAME_UPPER"),
    ((1, 4, 7, 6), (2, 3), (3, 2), (1, 1), "SAME_LOWER"),
    ((2, 3, 7, 8), (3, 3), (1, 2), (2, 1), "VALID"),
    ((3, 2, 11), (3,), (2,), (2,), (2, 1)),
    ((2, 5, 6, 6), (1, 1), (1, 1), (1, 1), (0, 0, 0, 0)),
]


@pytest.mark.parametrize("x_shape, kernel, strides, dilations, padding", CONV_ROW_CASES)
def test_layer_rows_conv_im2col(x_shape, kernel, strides, dilations, padding):
    rng = np.random.default_rng(8)
    auto_pad, pads = (padding, None) if isinstance(padding, str) else (None, padding)
    model = conv_model(x_shape, 5, kernel, strides, dilations, auto_pad=auto_pad, pads=pads, seed=9)
    x = randn(rng, *x_shape)
    rows, row_mask, target, y = _rows_case(model, {"x": x}, "conv", "y")
    assert row_mask is None
    cout = y.shape[1]
    expected = np.moveaxis(y, 1, -1).reshape(-1, cout)  # (n, output position) rows
    assert rows.shape == (expected.shape[0], target.in_features)
    np.testing.assert_allclose(rows @ target.matrix(), expected, rtol=1e-4, atol=1e-4)


def test_layer_rows_conv_subsamples_positions():
    """With max_positions, the rows are a subset (in order, without repeats) of the full rows."""
    rng = np.random.default_rng(10)
    model = conv_model((2, 3, 8, 8), 4, (3, 3), (1, 1), (1, 1), pads=(1, 1, 1, 1))
    x = randn(rng, 2, 3, 8, 8)
    full, _, target, y = _rows_case(model, {"x": x}, "conv", "y")
    sub, _, _, _ = _rows_case(model, {"x": x}, "conv", "y", max_positions=20)
    assert sub.shape == (20, target.in_features)
    index = [int(np.flatnonzero((full == row).all(axis=1))[0]) for row in sub]
    assert index == sorted(set(index))
    expected = np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])[index]
    np.testing.assert_allclose(sub @ target.matrix(), expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# 3. pruned_to and ActivationRunner


def _branchy_model(rng):
    """x -> a (MatMul) -> b (Relu) -> y1 (MatMul);  x -> c (Tanh) -> y2;  z -> d (Neg) -> y3."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="n_a"),
             helper.make_node("Relu", ["a"], ["b"], name="n_b"),
             helper.make_node("MatMul", ["b", "w2"], ["y1"], name="n_y1"),
             helper.make_node("Tanh", ["x"], ["c"], name="n_c"),
             helper.make_node("Mul", ["c", "c"], ["y2"], name="n_y2"),
             helper.make_node("Neg", ["z"], ["y3"], name="n_y3")]
    return make_model(nodes, [("x", F, ["n", 4]), ("z", F, ["n", 2])],
                      [("y1", F, None), ("y2", F, None), ("y3", F, None)],
                      {"w1": randn(rng, 4, 5), "w2": randn(rng, 5, 3)})


@pytest.mark.parametrize("names, kept", [
    (["b"], ["n_a", "n_b"]),
    (["a"], ["n_a"]),
    (["y1"], ["n_a", "n_b", "n_y1"]),
    (["c", "a"], ["n_a", "n_c"]),
    (["y2", "y3"], ["n_c", "n_y2", "n_y3"]),
    (["x"], []),
])
def test_pruned_to_keeps_exactly_the_needed_nodes(names, kept):
    model = _branchy_model(np.random.default_rng(11))
    before = model.SerializeToString()
    pruned = pruned_to(model, names)
    assert sorted(n.name for n in pruned.graph.node) == sorted(kept)
    assert [o.name for o in pruned.graph.output] == names
    assert model.SerializeToString() == before  # the source is not modified
    rng = np.random.default_rng(0)
    feeds = {"x": randn(rng, 3, 4), "z": randn(rng, 3, 2)}
    for got, want in zip(run_ort(pruned, feeds), run_ort(model, feeds, names)):
        np.testing.assert_array_equal(got, want)


def test_pruned_to_keeps_every_node_of_models_with_subgraphs():
    """An If body may read any outer tensor implicitly: nothing is pruned."""
    then = helper.make_graph([helper.make_node("Identity", ["c"], ["t"])], "then", [], [helper.make_tensor_value_info("t", F, None)])
    other = helper.make_graph([helper.make_node("Neg", ["c"], ["e"])], "else", [], [helper.make_tensor_value_info("e", F, None)])
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"),
             helper.make_node("Tanh", ["x"], ["c"], name="tanh"),
             helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["cond"], name="gt"),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then, else_branch=other)]
    model = make_model(nodes, [("x", F, [3])], [("y", F, None)], {"zero": np.zeros((), np.float32)})
    pruned = pruned_to(model, ["a"])
    assert [n.name for n in pruned.graph.node] == [n.name for n in model.graph.node]
    values = ActivationRunner(model, ["a", "c"]).run({"x": np.array([-1.0, 0.5, 2.0], np.float32)})
    np.testing.assert_allclose(values["a"], [0.0, 0.5, 2.0])
    np.testing.assert_allclose(values["c"], np.tanh([-1.0, 0.5, 2.0]), rtol=1e-6)


def test_activation_runner_returns_intermediate_tensors():
    rng = np.random.default_rng(12)
    model = _branchy_model(rng)
    w1, w2 = (numpy_helper.to_array(t) for t in model.graph.initializer)
    x, z = randn(rng, 6, 4), randn(rng, 6, 2)
    runner = ActivationRunner(model, ["a", "b", "c", "x"])
    # extra feeds (inputs the pruned model does not read) are ignored
    values = runner.run({"x": x, "z": z, "unused": np.zeros(1)})
    assert set(values) == {"a", "b", "c", "x"}
    np.testing.assert_allclose(values["a"], x @ w1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(values["b"], np.maximum(x @ w1, 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(values["c"], np.tanh(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(values["x"], x)


def test_activation_runner_sees_tensors_that_fusion_would_hide():
    """MatMul + Add is fused into Gemm when optimisations are on: the runner must still give
    the MatMul's own output (before the bias)."""
    rng = np.random.default_rng(13)
    w, b = randn(rng, 4, 3), randn(rng, 3)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                        helper.make_node("Add", ["h", "b"], ["y"], name="add")],
                       [("x", F, ["n", 4])], [("y", F, None)], {"w": w, "b": b})
    x = randn(rng, 5, 4)
    values = ActivationRunner(model, ["h", "y"]).run({"x": x})
    np.testing.assert_allclose(values["h"], x @ w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(values["y"], x @ w + b, rtol=1e-5, atol=1e-6)


def test_activation_runner_reports_bad_feeds_and_bad_models():
    model = _branchy_model(np.random.default_rng(14))
    runner = ActivationRunner(model, ["a"])
    with pytest.raises(LrsdError, match="calibration batch"):
        runner.run({"x": np.zeros((2, 7), np.float32)})
    with pytest.raises(LrsdError, match="calibration batch"):
        runner.run({"x": np.zeros((2, 4), np.float64)})
    with pytest.raises(LrsdError, match="cannot run the model"):
        ActivationRunner(model, ["no_such_tensor"])


# ---------------------------------------------------------------------------------------------
# 4. collect_statistics


def _mlp_gemm_conv_model(rng):
    """x [N, 2, 6, 6] -> Conv 3x3 (pads 1) -> Relu -> Flatten -> Gemm (transB) -> Tanh -> MatMul."""
    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "gw", "gb"], ["g"], name="gemm", transB=1),
             helper.make_node("Tanh", ["g"], ["t"], name="tanh"),
             helper.make_node("MatMul", ["t", "mw"], ["y"], name="matmul")]
    inits = {"cw": randn(rng, 3, 2, 3, 3), "cb": randn(rng, 3), "gw": randn(rng, 10, 108, scale=0.1),
             "gb": randn(rng, 10), "mw": randn(rng, 10, 4)}
    return make_model(nodes, [("x", F, ["n", 2, 6, 6])], [("y", F, None)], inits)


def _reference_rows(model, targets, batches):
    """{layer: [rows of each batch]} from onnxruntime's activations, by hand (not layer_rows)."""
    out = {name: [] for name in targets}
    for feeds in batches:
        c_in, f, t = run_ort(model, feeds, ["x", "f", "t"])
        xp = np.pad(c_in, [(0, 0), (0, 0), (1, 1), (1, 1)])
        patches = np.stack([xp[:, :, i:i + 6, j:j + 6] for i in range(3) for j in range(3)], axis=2)  # N,C,9,6,6
        out["conv"].append(patches.transpose(0, 3, 4, 1, 2).reshape(-1, 18))
        out["gemm"].append(f)
        out["matmul"].append(t)
    return out


def test_collect_statistics_gram_is_xtx_of_fit_batches_and_holdout_is_separate():
    rng = np.random.default_rng(15)
    model = _mlp_gemm_conv_model(rng)
    targets = find_targets(model)
    batches = [{"x": randn(rng, 3, 2, 6, 6)} for _ in range(7)]
    stats = collect_statistics(model, list(targets.values()), batches, holdout_every=3, max_positions=10**6)
    held = [2, 5]
    assert [is_held_out(i, 7, 3) for i in range(7)] == [i in held for i in range(7)]
    rows = _reference_rows(model, targets, batches)
    for name, target in targets.items():
        layer = stats[name]
        fit_rows = np.concatenate([r for i, r in enumerate(rows[name]) if i not in held]).astype(np.float64)
        held_rows = np.concatenate([r for i, r in enumerate(rows[name]) if i in held]).astype(np.float64)
        assert layer.fit.dim == target.in_features
        assert layer.fit.count == len(fit_rows) and layer.holdout.count == len(held_rows)
        np.testing.assert_allclose(layer.fit.gram, fit_rows.T @ fit_rows, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(layer.holdout.gram, held_rows.T @ held_rows, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(layer.fit.mean, fit_rows.mean(axis=0), rtol=1e-5, atol=1e-6)
        assert layer.nbytes == 2 * gram_bytes(target.in_features)


def test_collect_statistics_without_holdout():
    """holdout_every = 0 (or a single batch): everything is fitted on; more than the number of
    batches: the last batch is held out all the same."""
    rng = np.random.default_rng(16)
    model = _mlp_gemm_conv_model(rng)
    targets = list(find_targets(model).values())
    batches = [{"x": randn(rng, 2, 2, 6, 6)} for _ in range(3)]
    for every, chosen in ((0, batches), (5, batches[:1])):
        stats = collect_statistics(model, targets, chosen, holdout_every=every)
        assert all(s.holdout is None for s in stats.values())
        assert stats["gemm"].fit.count == 2 * len(chosen) and stats["conv"].fit.count == 2 * len(chosen) * 36
        assert stats["gemm"].nbytes == gram_bytes(108)
    few = collect_statistics(model, targets, batches, holdout_every=4)
    assert few["gemm"].fit.count == 4 and few["gemm"].holdout.count == 2
    with_three = collect_statistics(model, targets, batches, holdout_every=3)
    assert with_three["gemm"].fit.count == 4 and with_three["gemm"].holdout.count == 2


def test_split_holdout_matches_is_held_out():
    batches = [{"i": i} for i in range(12)]
    fit, held = split_holdout(batches, 5)
    assert [b["i"] for b in held] == [4, 9]
    assert [b["i"] for b in fit] == [0, 1, 2, 3, 5, 6, 7, 8, 10, 11]
    assert split_holdout(batches, 0) == (batches, [])
    assert split_holdout(batches[:4], 5) == (batches[:3], [batches[3]])  # fewer: the last is held out
    assert split_holdout(batches[:1], 5) == (batches[:1], [])  # one batch cannot be split
    assert split_holdout(batches[:5], 5)[1] == [batches[4]]


def test_collect_statistics_mask_drops_padded_positions():
    rng = np.random.default_rng(17)
    model = _masked_matmul_model(rng, b=4, s=6, h=6, o=4)
    targets = find_targets(model)
    assert set(targets) == {"right", "left"}
    batches = []
    for _ in range(4):
        lengths = rng.integers(1, 7, size=4)
        mask = (np.arange(6)[None, :] < lengths[:, None]).astype(np.int64)
        x = randn(rng, 4, 6, 6) + 3.0  # padded positions carry large values: counting them shows
        batches.append({"x": x, "mask": mask})
    masked = collect_statistics(model, list(targets.values()), batches, mask_input="mask")
    plain = collect_statistics(model, list(targets.values()), batches)
    ones = sum(int(b["mask"].sum()) for b in batches)
    rows = np.concatenate([b["x"][b["mask"] != 0] for b in batches]).astype(np.float64)
    for name in ("right", "left"):  # both see x's rows [B, S, 6]
        assert masked[name].fit.count == ones
        assert plain[name].fit.count == 4 * 4 * 6
        np.testing.assert_allclose(masked[name].fit.gram, rows.T @ rows, rtol=1e-5)
        np.testing.assert_allclose(masked[name].fit.mean, rows.mean(axis=0), rtol=1e-5)
    assert not np.allclose(masked["right"].fit.gram, plain["right"].fit.gram, rtol=1e-2)
    with pytest.raises(LrsdError, match="mask input 'attention_mask'"):
        collect_statistics(model, list(targets.values()), batches, mask_input="attention_mask")


def test_collect_statistics_conv_positions_cap():
    rng = np.random.default_rng(18)
    model = _mlp_gemm_conv_model(rng)
    conv = find_targets(model)["conv"]
    batches = [{"x": randn(rng, 2, 2, 6, 6)} for _ in range(3)]
    stats = collect_statistics(model, [conv], batches, max_positions=10)
    assert stats["conv"].fit.count == 30  # at most max_positions rows per batch
    again = collect_statistics(model, [conv], batches, max_positions=10)
    np.testing.assert_array_equal(stats["conv"].fit.gram, again["conv"].fit.gram)  # seeded
    other = collect_statistics(model, [conv], batches, max_positions=10, seed=1)
    assert not np.array_equal(stats["conv"].fit.gram, other["conv"].fit.gram)


def _arrays_bytes(stats):
    return sum(v.nbytes for s in stats.values() for acc in (s.fit, s.holdout) if acc is not None
               for v in vars(acc).values() if isinstance(v, np.ndarray))


def test_statistics_size_and_peak_memory_do_not_grow_with_batches():
    rng = np.random.default_rng(19)
    width = 32
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["h"], name="fc1"),
                        helper.make_node("Relu", ["h"], ["r"], name="relu"),
                        helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")],
                       [("x", F, ["n", width])], [("y", F, None)],
                       {"w": randn(rng, width, width), "w2": randn(rng, width, 4)})
    targets = list(find_targets(model).values())

    def peak_and_stats(n_batches):
        batches = [{"x": randn(np.random.default_rng(i), 2048, width)} for i in range(n_batches)]
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        stats = collect_statistics(model, targets, batches, holdout_every=4)
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        return peak, stats

    peak_few, few = peak_and_stats(4)
    peak_many, many = peak_and_stats(24)
    assert many["fc1"].fit.count == 6 * few["fc1"].fit.count
    assert _arrays_bytes(few) == _arrays_bytes(many)
    assert {k: s.nbytes for k, s in few.items()} == {k: s.nbytes for k, s in many.items()}
    one_batch = 2048 * width * 8  # one batch's rows in float64
    # storing the activations of 20 more batches would add ≥ 20 × 2 × one_batch / 2 bytes
    assert peak_many < peak_few + 2 * one_batch, (peak_few, peak_many)


class _T:
    def __init__(self, name, size):
        self.name, self.size = name, size


def test_memory_groups_split_consecutively_and_drop_oversize(caplog):
    layers = [_T("a", 40), _T("b", 50), _T("c", 20), _T("huge", 101), _T("d", 100), _T("e", 1)]
    with caplog.at_level(logging.WARNING, logger="onnx_lrsd.runtime.activations"):
        groups = memory_groups(layers, 100, lambda t: t.size)
    assert [[t.name for t in g] for g in groups] == [["a", "b"], ["c"], ["d"], ["e"]]
    assert "huge" in caplog.text and "without data" in caplog.text
    for group in groups:
        assert sum(t.size for t in group) <= 100
    assert memory_groups([], 100, lambda t: t.size) == []
    assert memory_groups(layers[:3], 10**6, lambda t: t.size) == [layers[:3]]
    assert memory_groups([_T("x", 5)], 4, lambda t: t.size) == []


def test_memory_groups_with_real_gram_sizes():
    rng = np.random.default_rng(20)
    targets = list(find_targets(_mlp_gemm_conv_model(rng)).values())  # in: conv 18, gemm 108, matmul 10
    sizes = {t.name: gram_bytes(t.in_features) for t in targets}
    budget = sizes["gemm"] + sizes["matmul"]
    groups = memory_groups(targets, budget, lambda t: sizes[t.name])
    assert [[t.name for t in g] for g in groups] == [["conv"], ["gemm", "matmul"]]
    groups = memory_groups(targets, sizes["gemm"] - 1, lambda t: sizes[t.name])
    assert [[t.name for t in g] for g in groups] == [["conv", "matmul"]]


# ---------------------------------------------------------------------------------------------
# collect_paired_statistics (sequential reconstruction)


def test_paired_statistics_of_a_model_with_itself():
    """X̂ = X: the cross term equals the Gram, including subsampled conv positions (the same
    positions must be drawn in both models)."""
    rng = np.random.default_rng(21)
    model = _mlp_gemm_conv_model(rng)
    targets = list(find_targets(model).values())
    batches = [{"x": randn(rng, 2, 2, 6, 6)} for _ in range(3)]
    paired = collect_paired_statistics(model, model, targets, batches, max_positions=13)
    for name, stats in paired.items():
        acc = stats.fit
        assert acc.track_cross
        np.testing.assert_allclose(acc.cross, acc.gram, rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(acc.target_mean, acc.mean, rtol=1e-12, atol=1e-12)
    assert paired["conv"].fit.count == 3 * 13


def test_paired_statistics_cross_term():
    """X̂ᵀX with X from the original model and X̂ from a perturbed one."""
    rng = np.random.default_rng(22)
    model = _mlp_gemm_conv_model(rng)
    perturbed = onnx.ModelProto()
    perturbed.CopyFrom(model)
    for init in perturbed.graph.initializer:
        if init.name == "gw":
            values = numpy_helper.to_array(init) * 0.5
            init.CopyFrom(numpy_helper.from_array(values, "gw"))
    target = find_targets(model)["matmul"]
    batches = [{"x": randn(rng, 4, 2, 6, 6)} for _ in range(3)]
    paired = collect_paired_statistics(model, perturbed, [target], batches)["matmul"].fit
    x = np.concatenate([run_ort(model, b, ["t"])[0] for b in batches]).astype(np.float64)
    x_hat = np.concatenate([run_ort(perturbed, b, ["t"])[0] for b in batches]).astype(np.float64)
    assert not np.allclose(x, x_hat)
    np.testing.assert_allclose(paired.gram, x_hat.T @ x_hat, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(paired.cross, x_hat.T @ x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(paired.mean, x_hat.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(paired.target_mean, x.mean(axis=0), rtol=1e-5, atol=1e-6)


def test_prefetched_keeps_order_and_runs_one_batch_ahead():
    """Each batch comes back with its own result, in order; batch i + 1 is computing on the
    second thread while the caller holds batch i (never two ahead)."""
    import threading

    started, release = [], threading.Event()

    def run(feeds):
        started.append(int(feeds["i"]))
        if int(feeds["i"]) == 1:
            release.wait(5)
        return {"twice": 2 * feeds["i"]}

    batches = [{"i": np.array(i)} for i in range(4)]
    results = prefetched(run, batches)
    feeds, result = next(results)
    assert int(feeds["i"]) == 0 and int(result["twice"]) == 0
    for _ in range(100):  # batch 1 starts without the caller asking for it
        if started == [0, 1]:
            break
        threading.Event().wait(0.01)
    assert started == [0, 1]
    release.set()
    assert [int(r["twice"]) for _, r in results] == [2, 4, 6]
    assert started == [0, 1, 2, 3]
    assert list(prefetched(run, [])) == []
