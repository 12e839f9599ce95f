"""Hard swish fusion: every spelling exporters write becomes HardSwish (opset >= 14) or
HardSigmoid·Mul, with the same outputs in onnxruntime; anything else is left alone."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_lrsd.model.fuse import fold_affines, fuse_elementwise, fuse_hard_swish
from onnx_lrsd.model.graph import export_model, import_graph, model_template


def _const(name, value):
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def _model(nodes, initializers, opset, outputs=("y",)):
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv")] + nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 5, 5])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 4, 1, 1)).astype(np.float32), "w")]
        + initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


def _clip(opset, src="s", dst="r", low=0.0, high=6.0):
    if opset < 11:
        return helper.make_node("Clip", [src], [dst], name="clip", min=low, max=high), []
    return helper.make_node("Clip", [src, "lo", "hi"], [dst], name="clip"), [_const("lo", low), _const("hi", high)]


def product_then_div(opset, three=3.0):
    """x·relu6(x + 3) / 6 (Paddle's export)."""
    clip, consts = _clip(opset)
    nodes = [helper.make_node("Add", ["c", "three"], ["s"], name="add"), clip,
             helper.make_node("Mul", ["c", "r"], ["p"], name="mul"),
             helper.make_node("Div", ["p", "six"], ["y"], name="div")]
    return nodes, consts + [_const("three", three), _const("six", 6.0)]


def gate_times_sixth(opset):
    """x·(relu6(3 + x)·(1/6)) (the gate scaled first, the constants on the left)."""
    clip, consts = _clip(opset)
    nodes = [helper.make_node("Add", ["three", "c"], ["s"], name="add"), clip,
             helper.make_node("Mul", ["sixth", "r"], ["g"], name="scale"),
             helper.make_node("Mul", ["g", "c"], ["y"], name="mul")]
    return nodes, consts + [_const("three", 3.0), _const("sixth", 1.0 / 6.0)]


def hard_sigmoid_gate(opset):
    """x·HardSigmoid(x; 1/6, 1/2)."""
    return [helper.make_node("HardSigmoid", ["c"], ["g"], name="hsig", alpha=1.0 / 6.0, beta=0.5),
            helper.make_node("Mul", ["c", "g"], ["y"], name="mul")], []


def _run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def _fused(model):
    graph = import_graph(model)
    count = fuse_hard_swish(graph, model.opset_import[0].version)
    return export_model(graph, model_template(model)), count


X = (np.random.default_rng(1).standard_normal((2, 4, 5, 5)) * 4).astype(np.float32)


@pytest.mark.parametrize("opset", [7, 11, 13, 14, 21])
@pytest.mark.parametrize("spelling", [product_then_div, gate_times_sixth])
def test_spellings_fuse_and_keep_outputs(spelling, opset):
    model = _model(*spelling(opset), opset)
    fused, count = _fused(model)
    ops = [n.op_type for n in fused.graph.node]
    assert count == 1
    assert ops == (["Conv", "HardSwish"] if opset >= 14 else ["Conv", "HardSigmoid", "Mul"])
    onnx.checker.check_model(fused, full_check=True)
    np.testing.assert_allclose(_run(fused, X)[0], _run(model, X)[0], rtol=1e-6, atol=1e-6)
    assert [o.name for o in fused.graph.output] == ["y"]


def test_hard_sigmoid_gate_becomes_hard_swish_from_opset_14_only():
    for opset, expected in ((13, 0), (14, 1)):
        model = _model(*hard_sigmoid_gate(opset), opset)
        fused, count = _fused(model)
        assert count == expected
        np.testing.assert_allclose(_run(fused, X)[0], _run(model, X)[0], rtol=1e-6, atol=1e-6)


def test_other_constants_are_not_fused():
    model = _model(*product_then_div(14, three=2.0), 14)
    assert _fused(model)[1] == 0


def test_an_intermediate_read_elsewhere_blocks_the_fusion():
    nodes, consts = product_then_div(14)
    model = _model(nodes, consts, 14, outputs=("y", "r"))  # the clipped tensor is also a graph output
    fused, count = _fused(model)
    assert count == 0
    for got, want in zip(_run(fused, X), _run(model, X)):
        np.testing.assert_array_equal(got, want)
    nodes, consts = product_then_div(14)
    nodes.append(helper.make_node("Relu", ["p"], ["z"], name="reader"))  # the product read by another node
    model = _model(nodes, consts, 14, outputs=("y", "z"))
    assert _fused(model)[1] == 0


def _hswish_net(opset: int) -> onnx.ModelProto:
    """x → Conv(16→32) → x·relu6(x + 3)/6 → Conv(32→16) → y, seeded weights."""
    rng = np.random.default_rng(2)
    clip, consts = _clip(opset)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1"),
             helper.make_node("Add", ["c", "three"], ["s"], name="add"), clip,
             helper.make_node("Mul", ["c", "r"], ["p"], name="mul"),
             helper.make_node("Div", ["p", "six"], ["h"], name="div"),
             helper.make_node("Conv", ["h", "w2"], ["y"], name="conv2")]
    weights = [numpy_helper.from_array((rng.standard_normal(shape) / 4).astype(np.float32), name)
               for name, shape in (("w1", (32, 16, 1, 1)), ("w2", (16, 32, 1, 1)))]
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              weights + consts + [_const("three", 3.0), _const("six", 6.0)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


@pytest.mark.parametrize("method", ["svd", "prune"])
@pytest.mark.parametrize("fuse", [True, False])
def test_compress_fuses_by_default_and_reports_it(method, fuse):
    from onnx_lrsd import compress

    model = _hswish_net(14)
    calibration = [{"x": np.random.default_rng(i).standard_normal((8, 16, 6, 6)).astype(np.float32)} for i in range(4)]
    result = compress(model, calibration=calibration, keep=0.5, method=method, fuse_elementwise=fuse)
    ops = [n.op_type for n in result.model.graph.node]
    assert ("HardSwish" in ops) == fuse and ("Clip" in ops) != fuse
    report = result.report
    assert report.before.ops == 6 and report.after.ops == len(ops)
    assert "ops " in report.to_text()
    unfused = compress(model, calibration=calibration, keep=0.5, method=method, fuse_elementwise=False)
    x = calibration[0]["x"]
    np.testing.assert_allclose(_run(result.model, x)[0], _run(unfused.model, x)[0], rtol=1e-5, atol=1e-5)


def _affine_net(ops, pads=(0, 0, 0, 0), group=1, bias=True, shape=(1, 8, 1, 1), outputs=("y",)):
    """x → [ops before] → Conv(8→8, 3×3, `pads`, `group`) → [ops after] → y; `ops` is a list of
    (op, "before" | "after", constant first?) with seeded per-channel or scalar constants."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 8 // group, 3, 3)) / 3).astype(np.float32), "w")]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b"))
    nodes, current = [], "x"
    for k, (op, where, first) in enumerate([o for o in ops if o[1] == "before"]):
        inits.append(numpy_helper.from_array((rng.uniform(0.5, 2.0, shape)).astype(np.float32), f"c{k}"))
        nodes.append(helper.make_node(op, [f"c{k}", current] if first else [current, f"c{k}"], [f"t{k}"], name=f"pre{k}"))
        current = f"t{k}"
    nodes.append(helper.make_node("Conv", [current, "w", "b"] if bias else [current, "w"], ["conv_out"], name="conv",
                                  pads=list(pads), group=group))
    current = "conv_out"
    after = [o for o in ops if o[1] == "after"]
    for k, (op, where, first) in enumerate(after):
        inits.append(numpy_helper.from_array((rng.uniform(0.5, 2.0, shape)).astype(np.float32), f"d{k}"))
        out = "y" if k == len(after) - 1 else f"u{k}"
        nodes.append(helper.make_node(op, [f"d{k}", current] if first else [current, f"d{k}"], [out], name=f"post{k}"))
        current = out
    if not after:
        nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, "affine", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 6, 6])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)


AFFINE_X = np.random.default_rng(4).standard_normal((2, 8, 6, 6)).astype(np.float32)


def _folded(model):
    graph = import_graph(model)
    count = fold_affines(graph)
    return export_model(graph, model_template(model)), count


@pytest.mark.parametrize("group", [1, 2, 8])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 8, 1, 1), (8, 1, 1), (1,), ()])
def test_scales_and_shifts_around_an_unpadded_conv_fold_exactly(group, bias, shape):
    ops = [("Mul", "before", True), ("Add", "before", False), ("Div", "after", False), ("Sub", "after", False),
           ("Mul", "after", True), ("Add", "after", True)]
    model = _affine_net(ops, group=group, bias=bias, shape=shape)
    folded, count = _folded(model)
    assert count == 6 and [n.op_type for n in folded.graph.node] == ["Conv"]
    onnx.checker.check_model(folded, full_check=True)
    np.testing.assert_allclose(_run(folded, AFFINE_X)[0], _run(model, AFFINE_X)[0], rtol=1e-5, atol=1e-5)


def test_a_padded_conv_takes_a_scale_but_not_a_shift():
    model = _affine_net([("Add", "before", False), ("Mul", "before", False), ("Mul", "after", False)],
                        pads=(1, 1, 1, 1), group=8)
    folded, count = _folded(model)
    assert count == 2 and [n.op_type for n in folded.graph.node] == ["Add", "Conv"]
    np.testing.assert_allclose(_run(folded, AFFINE_X)[0], _run(model, AFFINE_X)[0], rtol=1e-5, atol=1e-5)


def test_what_is_read_elsewhere_or_not_per_channel_stays():
    model = _affine_net([("Mul", "after", False)], outputs=("y", "conv_out"))  # the conv output is a graph output
    assert _folded(model)[1] == 0
    model = _affine_net([("Mul", "after", False)], shape=(1, 1, 6, 1))  # varies along a spatial axis
    assert _folded(model)[1] == 0
    model = _affine_net([("Div", "before", True)])  # c / x is not affine in x
    assert _folded(model)[1] == 0


def test_elementwise_fusion_of_a_real_export_keeps_its_outputs():
    """PP-OCRv4 rec (Paddle export): hard swishes and the learnable affine blocks around its convs."""
    from benchmarks.tasks.ocr import rec_model_path

    path = rec_model_path()
    model = onnx.load(str(path))
    fused = fuse_elementwise(model)
    before = sum(n.op_type != "Constant" for n in model.graph.node)
    after = sum(n.op_type != "Constant" for n in fused.graph.node)
    assert after < 0.8 * before
    x = np.random.default_rng(5).uniform(-1, 1, (2, 3, 48, 320)).astype(np.float32)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    want = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(fused.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
