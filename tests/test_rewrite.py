"""The rewrite of Gemm / MatMul / Conv into low-rank chains, checked in onnxruntime.

At full rank every factorization is exact, so the compressed model must reproduce the
original outputs (fp32: relative error <= 1e-5, fp16: <= 5e-3) for every target kind,
attribute combination, weight storage, opset and IR style; the model must stay a valid,
loadable ONNX model with the same interface, opsets, metadata and an IR version onnxruntime
accepts. At reduced rank the emitted factors must be what the report says.
"""
import itertools

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from helpers.graphs import (
    Builder,
    as_ir3,
    cnn_model,
    conv_model,
    gemm_model,
    initializer_arrays,
    matmul_model,
    max_rel_error,
    producers,
    session,
)
from onnx_lrsd.api import compress
from onnx_lrsd.config import LayerOverride
from onnx_lrsd.model.io import max_runtime_ir_version, runtime_ir_version

FP32_TOL = 1e-5
FP16_TOL = 5e-3
METADATA = {"author": "tests", "character": "abc\ndef"}
EXTRA_OPSET = ("com.example.tests", 3)


def _decorated(model):
    """The model with metadata_props and an extra (unused) opset domain, which must survive."""
    helper.set_model_props(model, METADATA)
    model.opset_import.append(helper.make_opsetid(*EXTRA_OPSET))
    return model


def _full(model, method=None, **options):
    return compress(model, overrides=(LayerOverride("*", rank="full", method=method),), **options)


def _value_infos(infos):
    return [(i.name, i.type.SerializeToString()) for i in infos]


def _real_inputs(model):
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _check_interface(source, out):
    """Names and types of inputs/outputs, opsets, metadata and IR version are kept."""
    assert _value_infos(_real_inputs(out)) == _value_infos(_real_inputs(source))
    assert _value_infos(out.graph.output) == _value_infos(source.graph.output)
    assert [(o.domain, o.version) for o in out.opset_import] == [(o.domain, o.version) for o in source.opset_import]
    assert {p.key: p.value for p in out.metadata_props} == {p.key: p.value for p in source.metadata_props}
    assert out.ir_version == min(source.ir_version, max_runtime_ir_version())
    assert out.producer_name == source.producer_name


def _check_full_rank(model, method=None, tol=FP32_TOL, layer="layer", **options):
    """Compress `model` at full rank with `method`; returns the result after the checks."""
    model = _decorated(model)
    before = model.SerializeToString()
    result = _full(model, method, **options)
    assert model.SerializeToString() == before, "compress modified its input ModelProto"

    (report,) = [entry for entry in result.report.layers if entry.name == layer]
    assert report.method != "dense", report.reason
    if method is not None:
        assert report.method == method
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    _check_interface(model, out)
    session(out)  # onnxruntime loads it
    assert max_rel_error(model, out) <= tol
    assert all(error <= tol for error in result.report.output_errors.values()), result.report.output_errors

    # the dense layers are gone, replaced by nodes and tensors named {layer}/lrsd/{role}
    factorized = [entry.name for entry in result.report.layers if entry.method != "dense"]
    assert not set(factorized) & {n.name for n in out.graph.node}
    prefixes = tuple(f"{name}/lrsd/" for name in factorized)
    source_tensors = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output} \
        | {i.name for i in model.graph.input}
    new_tensors = ({t.name for t in out.graph.initializer} | {o for n in out.graph.node for o in n.output}) \
        - source_tensors
    assert all(t.startswith(prefixes) for t in new_tensors), new_tensors
    assert any(t.startswith(f"{layer}/lrsd/") for t in new_tensors), new_tensors
    new_nodes = [n.name for n in out.graph.node if n.name not in {m.name for m in model.graph.node}]
    assert new_nodes and all(n.startswith(prefixes) for n in new_nodes), new_nodes
    assert len({n.name for n in out.graph.node}) == len(out.graph.node)
    return result


# --------------------------------------------------------------------------------------------
# Full rank reproduces the original: Gemm
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trans_a,trans_b", list(itertools.product((0, 1), (0, 1))))
@pytest.mark.parametrize("bias", ["n", "1n", "mn", "m1", "scalar", None])
def test_gemm_full_rank_is_exact(trans_a, trans_b, bias):
    model = gemm_model(trans_a=trans_a, trans_b=trans_b, alpha=0.75, beta=1.5, bias=bias)
    result = _check_full_rank(model, "svd")
    assert result.report.layers[0].ranks == (10,)


@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (2.5, 0.0), (-0.5, -3.0), (0.0, 1.0)])
def test_gemm_alpha_beta(alpha, beta):
    _check_full_rank(gemm_model(trans_b=1, alpha=alpha, beta=beta, bias="1n", seed=3))


@pytest.mark.parametrize("opset", [9, 11, 13, 17])
def test_gemm_opsets(opset):
    model = gemm_model(trans_b=1, opset=opset, bias="n")
    result = _check_full_rank(model)
    assert result.model.opset_import[0].version == opset


@pytest.mark.parametrize("via", ["initializer", "constant", "identity", "cast_fp16", "transpose", "constant_of_shape"])
def test_gemm_weight_storage(via):
    _check_full_rank(gemm_model(trans_b=0, via=via, seed=5))


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_fp16(trans_b):
    model = gemm_model(trans_b=trans_b, alpha=0.5, beta=2.0, dtype=np.float16)
    result = _check_full_rank(model, tol=FP16_TOL)
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in result.model.graph.initializer)


# --------------------------------------------------------------------------------------------
# MatMul
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("x_shape", [(4, 12), (2, 3, 12), ("batch", 2, 3, 12), ("batch", "seq", 12)],
                         ids=["2d", "3d", "4d", "symbolic"])
def test_matmul_right_full_rank_is_exact(x_shape):
    _check_full_rank(matmul_model(x_shape, n=10), "svd", dims=(("seq", 3),) if "seq" in x_shape else ())


@pytest.mark.parametrize("x_shape", [(12, 5), (2, 12, 5), ("batch", 3, 12, 7)], ids=["2d", "3d", "4d"])
def test_matmul_left_full_rank_is_exact(x_shape):
    _check_full_rank(matmul_model(x_shape, n=10, side="left"), "svd")


@pytest.mark.parametrize("via", ["initializer", "constant", "identity", "cast_fp16", "transpose", "constant_of_shape"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_matmul_weight_storage(via, side):
    model = matmul_model((3, 12, 12), n=10, side=side, via=via)
    _check_full_rank(model)


def test_cast_from_fp16_weight_is_written_in_the_cast_type():
    result = _check_full_rank(matmul_model(via="cast_fp16"))
    assert {t.data_type for t in result.model.graph.initializer} == {onnx.TensorProto.FLOAT}
    assert not [n for n in result.model.graph.node if n.op_type == "Cast"]


@pytest.mark.parametrize("via", ["constant", "identity", "constant_of_shape"])
def test_weight_chain_nodes_are_removed(via):
    result = _check_full_rank(matmul_model(via=via))
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "MatMul"]


@pytest.mark.parametrize("opset", [9, 11, 13, 17])
def test_matmul_opsets(opset):
    _check_full_rank(matmul_model(("batch", 12), opset=opset))


@pytest.mark.parametrize("side", ["right", "left"])
def test_matmul_fp16(side):
    result = _check_full_rank(matmul_model((2, 12, 12), side=side, dtype=np.float16), tol=FP16_TOL)
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in result.model.graph.initializer)


# --------------------------------------------------------------------------------------------
# Conv
# --------------------------------------------------------------------------------------------
CONV_2D = {
    "3x3": dict(kernel=(3, 3)),
    "3x3_stride2_pad1": dict(kernel=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1)),
    "asym_pads_dilation": dict(kernel=(3, 3), pads=(2, 1, 0, 3), dilations=(2, 1), strides=(1, 2)),
    "5x3_same_upper": dict(kernel=(5, 3), strides=(2, 2), auto_pad="SAME_UPPER"),
    "5x3_same_lower": dict(kernel=(5, 3), strides=(2, 3), auto_pad="SAME_LOWER"),
    "same_upper_odd_total_pad": dict(kernel=(4, 2), strides=(2, 2), spatial=(9, 10), auto_pad="SAME_UPPER"),
    "1x5_valid_dilated": dict(kernel=(1, 5), auto_pad="VALID", dilations=(1, 2)),
    "3x1_pads_stride": dict(kernel=(3, 1), pads=(1, 0, 2, 0), strides=(1, 2)),
    "no_bias": dict(kernel=(3, 3), pads=(1, 1, 1, 1), bias=False),
    "no_attributes_but_kernel": dict(kernel=(2, 2)),
}
CONV_1D = {
    "k3": dict(kernel=(3,), spatial=(11,)),
    "k3_stride2_pads": dict(kernel=(3,), spatial=(11,), strides=(2,), pads=(1, 2)),
    "k4_same_lower_stride3": dict(kernel=(4,), spatial=(13,), strides=(3,), auto_pad="SAME_LOWER"),
    "k3_dilated": dict(kernel=(3,), spatial=(13,), dilations=(3,), pads=(2, 0)),
    "k4_valid": dict(kernel=(4,), spatial=(12,), auto_pad="VALID", bias=False),
}


@pytest.mark.parametrize("method", ["channel", "spatial", "tucker2"])
@pytest.mark.parametrize("case", list(CONV_2D))
def test_conv2d_full_rank_is_exact(case, method):
    result = _check_full_rank(conv_model(**CONV_2D[case]), method)
    layer = result.report.layers[0]
    kh, kw = CONV_2D[case]["kernel"]
    assert layer.ranks == {"channel": (8,), "spatial": (min(6 * kh, 8 * kw),), "tucker2": (6, 8)}[method]


@pytest.mark.parametrize("method", ["channel", "tucker2"])
@pytest.mark.parametrize("case", list(CONV_1D))
def test_conv1d_full_rank_is_exact(case, method):
    _check_full_rank(conv_model(**CONV_1D[case]), method)


def test_spatial_does_not_apply_to_conv1d():
    result = _full(conv_model(kernel=(3,), spatial=(11,)), "spatial")
    (layer,) = result.report.layers
    assert layer.method == "dense" and "spatial" in layer.reason


@pytest.mark.parametrize("kernel", [(1, 1), (1,)])
def test_pointwise_conv_full_rank_is_exact(kernel):
    model = conv_model(cin=12, cout=8, kernel=kernel, spatial=(5, 6)[: len(kernel)], strides=(2,) * len(kernel))
    _check_full_rank(model, "channel")
    for method in ("spatial", "tucker2"):
        (layer,) = _full(model, method).report.layers
        assert layer.method == "dense"


@pytest.mark.parametrize("via", ["constant", "identity", "cast_fp16", "constant_of_shape"])
def test_conv_weight_storage(via):
    _check_full_rank(conv_model(via=via, pads=(1, 1, 1, 1)), "tucker2")


@pytest.mark.parametrize("opset", [9, 11, 13, 17])
def test_conv_opsets(opset):
    _check_full_rank(conv_model(opset=opset, kernel=(3, 3), strides=(2, 1), pads=(0, 1, 1, 0)), "spatial")


@pytest.mark.parametrize("method", ["channel", "spatial", "tucker2"])
def test_conv_fp16(method):
    result = _check_full_rank(conv_model(dtype=np.float16, pads=(1, 1, 1, 1)), method, tol=FP16_TOL)
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in result.model.graph.initializer)


def test_conv_symbolic_batch_and_spatial():
    b = Builder(seed=2)
    b.input("x", ["n", 5, "h", "w"])
    b.node("Conv", ["x", b.init("W", b.randn(7, 5, 3, 3)), b.init("B", b.randn(7))], ["y"], name="layer",
           kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    b.output("y", ["n", 7, "h", "w"])
    model = b.model()
    for method in ("channel", "spatial", "tucker2"):
        _check_full_rank(model, method, dims=(("h", 7), ("w", 9)))


# --------------------------------------------------------------------------------------------
# Interface, IR versions, several layers
# --------------------------------------------------------------------------------------------
def test_ir3_model_keeps_ir3_and_lists_initializers_as_inputs():
    source = as_ir3(matmul_model((4, 12), opset=9))
    assert len(source.graph.input) == 2
    result = _check_full_rank(source)
    out = result.model
    assert out.ir_version == 3
    assert [i.name for i in _real_inputs(out)] == ["x"]
    inputs = {i.name for i in out.graph.input}
    assert {t.name for t in out.graph.initializer} <= inputs
    assert "W" not in inputs  # the replaced weight is not left behind as a dangling input


def test_ir3_conv_model():
    _check_full_rank(as_ir3(conv_model(opset=9, pads=(1, 1, 1, 1))), "tucker2")


def test_newest_ir_version_is_capped_to_what_onnxruntime_accepts():
    model = matmul_model(ir_version=onnx.IR_VERSION)
    out = _full(model, verify=False).model
    assert out.ir_version == runtime_ir_version(onnx.IR_VERSION) == min(onnx.IR_VERSION, max_runtime_ir_version())
    session(out)


def test_newest_ir_version_source_can_be_verified():
    model = matmul_model(ir_version=onnx.IR_VERSION)
    if model.ir_version <= max_runtime_ir_version():
        pytest.skip("the installed onnxruntime runs the installed onnx's newest IR version")
    result = _full(model)
    assert result.report.output_errors["y"] <= FP32_TOL


@pytest.mark.parametrize("ir_version", [4, 7, 9])
def test_older_ir_version_is_kept(ir_version):
    out = _full(matmul_model(ir_version=ir_version)).model
    assert out.ir_version == ir_version
    onnx.checker.check_model(out)


def test_several_layers_full_rank_with_auto_method():
    model = cnn_model()
    result = _check_full_rank(model, layer="conv1")
    methods = {layer.name: layer.method for layer in result.report.layers}
    assert methods == {"conv1": "channel", "conv2": "channel", "fc": "svd"}


@pytest.mark.parametrize("method", ["channel", "spatial", "tucker2"])
def test_several_layers_full_rank_per_conv_method(method):
    model = cnn_model(seed=4)
    result = compress(model, overrides=(LayerOverride("conv1", rank="full", method=method),
                                        LayerOverride("*", rank="full")))
    assert max_rel_error(model, result.model) <= FP32_TOL
    assert [layer.method for layer in result.report.layers] == [method, "channel", "svd"]


def test_unnamed_nodes_get_names_and_prefix_new_tensors():
    model = matmul_model()
    model.graph.node[0].name = ""
    out = _full(model).model
    assert max_rel_error(model, out) <= FP32_TOL
    new = [t.name for t in out.graph.initializer]
    assert new and all(name.startswith("MatMul_0/lrsd/") for name in new), new


def test_duplicate_node_names_are_made_unique():
    b = Builder(seed=8)
    b.input("x", [4, 12])
    b.node("MatMul", ["x", b.init("W1", b.randn(12, 10))], ["h"], name="layer")
    b.node("MatMul", ["h", b.init("W2", b.randn(10, 9))], ["y"], name="layer")
    b.output("y", [4, 9])
    model = b.model()  # onnxruntime refuses it (two nodes named "layer")
    result = _full(model, verify=False)
    assert [layer.name for layer in result.report.layers] == ["layer", "layer_1"]
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    reference.graph.node[1].name = "layer_1"
    assert max_rel_error(reference, out) <= FP32_TOL
    names = [o for n in out.graph.node for o in n.output] + [t.name for t in out.graph.initializer]
    assert len(names) == len(set(names))
    assert any(t.startswith("layer_1/lrsd/") for t in names)


def test_unused_graph_inputs_are_kept():
    b = Builder(seed=9)
    b.input("x", [4, 12])
    b.input("unused_mask", [4], np.int64)
    b.node("MatMul", ["x", b.init("W", b.randn(12, 10))], ["y"], name="layer")
    b.output("y", [4, 10])
    result = _check_full_rank(b.model())
    assert [i.name for i in result.model.graph.input] == ["x", "unused_mask"]


def test_new_names_do_not_collide_with_existing_tensors():
    b = Builder(seed=1)
    b.input("x", [4, 12])
    b.node("MatMul", ["x", b.init("W", b.randn(12, 10))], ["h"], name="layer")
    # tensors already named like the ones the rewrite would create
    b.node("Add", ["h", b.init("layer/lrsd/U", b.randn(10))], ["layer/lrsd/u"], name="add")
    b.node("Mul", ["layer/lrsd/u", b.init("layer/lrsd/V", b.randn(10))], ["y"], name="mul")
    b.output("y", [4, 10])
    model = b.model()
    out = _full(model).model
    onnx.checker.check_model(out, full_check=True)
    assert max_rel_error(model, out) <= FP32_TOL
    arrays = initializer_arrays(out)
    np.testing.assert_array_equal(arrays["layer/lrsd/U"], numpy_helper.to_array(model.graph.initializer[1]))
    names = [t.name for t in out.graph.initializer] + [o for n in out.graph.node for o in n.output]
    assert len(names) == len(set(names))


def test_graph_output_feeding_other_nodes_is_kept():
    """The layer's output is both a graph output and the input of another node."""
    b = Builder(seed=6)
    b.input("x", [4, 12])
    b.node("MatMul", ["x", b.init("W", b.randn(12, 10))], ["h"], name="layer")
    b.node("Relu", ["h"], ["y"], name="relu")
    b.output("h", [4, 10])
    b.output("y", [4, 10])
    model = b.model()
    _check_full_rank(model)


def test_shared_activation_is_left_intact_for_other_consumers():
    """Two layers read the same input; rewriting one must not disconnect the other."""
    b = Builder(seed=7)
    b.input("x", [4, 12])
    b.node("MatMul", ["x", b.init("W1", b.randn(12, 10))], ["y1"], name="a")
    b.node("Gemm", ["x", b.init("W2", b.randn(9, 12)), b.init("C", b.randn(9))], ["y2"], name="b", transB=1)
    b.output("y1", [4, 10])
    b.output("y2", [4, 9])
    model = b.model()
    _check_full_rank(model, layer="a")


# --------------------------------------------------------------------------------------------
# The emitted chain: (x·U)·V, which onnxruntime cannot fold back
# --------------------------------------------------------------------------------------------
def _rank(model, rank, method=None):
    return compress(model, overrides=(LayerOverride("*", rank=rank, method=method),))


@pytest.mark.parametrize("x_shape", [(4, 24), ("b", 3, 24)])
def test_matmul_chain_is_x_times_u_then_v(x_shape):
    model = matmul_model(x_shape, n=20)
    out = _rank(model, 3).model
    inits = initializer_arrays(out)
    made_by = producers(out)
    last = made_by["y"]
    assert last.op_type == "MatMul"
    h, v = last.input
    assert inits[v].shape == (3, 20)
    first = made_by[h]
    assert first.op_type == "MatMul" and first.input[0] == "x"
    assert inits[first.input[1]].shape == (24, 3)


def test_left_matmul_chain_is_v_times_u_times_x():
    model = matmul_model((2, 24, 5), n=20, side="left")
    out = _rank(model, 3).model
    inits = initializer_arrays(out)
    made_by = producers(out)
    last = made_by["y"]
    v, h = last.input
    assert last.op_type == "MatMul" and inits[v].shape == (20, 3)
    first = made_by[h]
    assert first.op_type == "MatMul" and first.input[1] == "x" and inits[first.input[0]].shape == (3, 24)


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("bias", ["n", None])
def test_gemm_chain_starts_with_the_activation(trans_a, bias):
    model = gemm_model(m=4, k=24, n=20, trans_a=trans_a, trans_b=1, alpha=2.0, bias=bias)
    out = _rank(model, 3).model
    inits = initializer_arrays(out)
    made_by = producers(out)
    last = made_by["y"]
    assert last.op_type in ("Gemm", "MatMul") and inits[last.input[1]].shape == (3, 20)
    first = made_by[last.input[0]]
    assert first.op_type == "MatMul" and inits[first.input[1]].shape == (24, 3)
    source = first.input[0]
    if trans_a:
        assert made_by[source].op_type == "Transpose" and made_by[source].input[0] == "x"
    else:
        assert source == "x"


@pytest.mark.parametrize("build", [
    lambda: matmul_model((4, 24), n=20),
    lambda: matmul_model((2, 24, 5), n=20, side="left"),
    lambda: gemm_model(m=4, k=24, n=20, trans_b=1, bias="n"),
    lambda: conv_model(cin=64, cout=64, kernel=(1, 1), spatial=(6, 6)),
], ids=["matmul", "matmul_left", "gemm", "conv1x1"])
def test_onnxruntime_does_not_fold_the_chain_back(build, tmp_path):
    """In the graph onnxruntime actually runs (ORT_ENABLE_ALL, saved), no initializer has
    the dense weight's size and at least two weight ops remain."""
    model = build()
    out = _rank(model, 3).model
    dense = initializer_arrays(model)["W"].size
    path = tmp_path / "optimized.onnx"
    session(out, optimized_path=str(path))
    optimized = onnx.load(str(path))
    sizes = [int(np.prod(t.dims)) for t in optimized.graph.initializer]
    assert max(sizes) < dense, sizes
    weight_ops = [n for n in optimized.graph.node
                  if n.op_type in ("MatMul", "Gemm", "FusedMatMul", "Conv", "FusedConv", "FusedGemm")]
    assert len(weight_ops) >= 2, [n.op_type for n in optimized.graph.node]


# --------------------------------------------------------------------------------------------
# Reduced rank: valid models whose parameters are what the report says
# --------------------------------------------------------------------------------------------
def _float_params(model):
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer
               if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16))


def _layer_params(model, layer):
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.name.startswith(f"{layer}/lrsd/"))


REDUCED = {
    "gemm": (lambda: gemm_model(m=4, k=24, n=20, trans_b=1, bias="n"), None, 4, lambda r: r * (24 + 20)),
    "gemm_transA_scalar_bias": (lambda: gemm_model(m=4, k=24, n=20, trans_a=1, bias="scalar", beta=0.5), None, 4,
                                lambda r: r * (24 + 20)),
    "matmul": (lambda: matmul_model(("b", 3, 24), n=20), None, 4, lambda r: r * 44),
    "matmul_left": (lambda: matmul_model((2, 24, 5), n=20, side="left"), None, 4, lambda r: r * 44),
    "conv_channel": (lambda: conv_model(cin=8, cout=16, kernel=(3, 3), pads=(1, 1, 1, 1)), "channel", 5,
                     lambda r: r * (8 * 9 + 16)),
    "conv_spatial": (lambda: conv_model(cin=8, cout=16, kernel=(3, 5), strides=(2, 1)), "spatial", 5,
                     lambda r: r * (8 * 3 + 16 * 5)),
    "conv_tucker2": (lambda: conv_model(cin=8, cout=16, kernel=(3, 3), auto_pad="SAME_UPPER"), "tucker2", 5,
                     lambda r: 8 * 5 + 5 * 5 * 9 + 5 * 16),
    "conv1d_channel": (lambda: conv_model(cin=8, cout=16, kernel=(5,), spatial=(20,)), "channel", 5,
                       lambda r: r * (8 * 5 + 16)),
}


@pytest.mark.parametrize("case", list(REDUCED))
def test_reduced_rank_params_match_the_report(case):
    build, method, rank, params = REDUCED[case]
    model = _decorated(build())
    result = _rank(model, rank, method)
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    _check_interface(model, out)
    (layer,) = result.report.layers
    assert layer.ranks == ((rank, rank) if method == "tucker2" else (rank,))
    assert layer.params_after == params(rank) == _layer_params(out, "layer")
    assert layer.params_before == initializer_arrays(model)["W"].size
    report = result.report
    assert report.after.params == _float_params(out)
    assert report.after.params == report.before.params - layer.params_before + layer.params_after
    assert report.before.macs == layer.macs_before and report.after.macs == layer.macs_after
    error = max_rel_error(model, out)
    assert 1e-4 < error < 1.0  # a random weight loses something at low rank, but not everything
    assert report.output_errors["y"] == pytest.approx(error, rel=0.5)


def test_reduced_rank_macs_by_hand():
    """conv 8→16, 3×5 kernel, stride (2, 1), input 9×10 → output 4×6; spatial rank r:
    vertical 3×1 at 4×10 positions (r·8·3 each), horizontal 1×5 at 4×6 (r·16·5 each)."""
    model = conv_model(cin=8, cout=16, kernel=(3, 5), strides=(2, 1))
    (layer,) = _rank(model, 5, "spatial").report.layers
    assert layer.macs_before == 4 * 6 * 8 * 15 * 16
    assert layer.macs_after == 4 * 10 * 5 * 8 * 3 + 4 * 6 * 5 * 16 * 5
    (layer,) = _rank(model, 5, "tucker2").report.layers
    assert layer.macs_after == 9 * 10 * 8 * 5 + 4 * 6 * (5 * 5 * 15 + 5 * 16)


def test_keep_half_gives_a_smaller_valid_model():
    model = _decorated(cnn_model(seed=1))
    result = compress(model, keep=0.5, conv_rank_multiple=1)
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    _check_interface(model, out)
    factorized = [layer for layer in result.report.layers if layer.method != "dense"]
    assert factorized
    for layer in factorized:
        assert layer.params_after <= 0.5 * layer.params_before
        assert layer.params_after == _layer_params(out, layer.name)
    assert result.report.after.params == _float_params(out) < result.report.before.params
    assert np.isfinite(max_rel_error(model, out))
