"""Property tests (hypothesis) on random small graphs of Gemm / MatMul / Conv with random
shapes, attributes and weight storage:

- at full rank, compression reproduces the original outputs in onnxruntime;
- at any keep, the result is a valid model that runs, whose parameters and MACs, counted
  here independently from the written graph, are the report's, and which never costs more
  MACs than the original.

Examples are derandomized (the same ones every run) and not stored.
"""
import numpy as np
import onnx
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import onnx_lrsd
from helpers.graphs import GEMM_BIASES, WEIGHT_VIAS, Builder, conv_model, feeds_for, gemm_model, matmul_model, mlp_model, run
from onnx_lrsd.config import FULL_RANK, CompressConfig, LayerOverride

SETTINGS = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
FP32_TOL = 1e-4

dims = st.integers(2, 24)
CONV_VIAS = tuple(v for v in WEIGHT_VIAS if v != "transpose")  # the builder transposes 2-D weights only


@st.composite
def gemms(draw):
    return gemm_model(m=draw(st.integers(1, 6)), k=draw(dims), n=draw(dims), trans_a=int(draw(st.booleans())),
                      trans_b=int(draw(st.booleans())), alpha=draw(st.sampled_from([1.0, 0.5, -2.0])),
                      beta=draw(st.sampled_from([1.0, 0.0, 3.0])), bias=draw(st.sampled_from(GEMM_BIASES)),
                      via=draw(st.sampled_from(WEIGHT_VIAS)), seed=draw(st.integers(0, 999)))


@st.composite
def matmuls(draw):
    side = draw(st.sampled_from(["right", "left"]))
    lead = draw(st.lists(st.sampled_from([1, 2, 3, "batch"]), max_size=2, unique=True))
    rows, k = draw(st.integers(1, 5)), draw(dims)
    x_shape = lead + ([rows, k] if side == "right" else [k, rows])
    return matmul_model(x_shape, n=draw(dims), side=side, via=draw(st.sampled_from(WEIGHT_VIAS)),
                        seed=draw(st.integers(0, 999)))


@st.composite
def convs(draw):
    n = draw(st.sampled_from([1, 2]))
    kernel = draw(st.lists(st.integers(1, 3), min_size=n, max_size=n))
    dilations = draw(st.none() | st.lists(st.integers(1, 2), min_size=n, max_size=n))
    extent = [(k - 1) * (dilations[i] if dilations else 1) + 1 for i, k in enumerate(kernel)]
    spatial = [draw(st.integers(e, e + 6)) for e in extent]
    same = [] if dilations else ["SAME_UPPER", "SAME_LOWER"]  # onnxruntime: no dilation with SAME
    auto_pad = draw(st.sampled_from([None, None, "VALID"] + same))
    pads = None
    if auto_pad is None and draw(st.booleans()):
        pads = [draw(st.integers(0, k - 1)) for k in kernel + kernel]
    return conv_model(cin=draw(st.integers(1, 12)), cout=draw(st.integers(1, 12)), kernel=kernel, spatial=spatial,
                      strides=draw(st.none() | st.lists(st.integers(1, 2), min_size=n, max_size=n)), pads=pads,
                      dilations=dilations, auto_pad=auto_pad, bias=draw(st.booleans()),
                      via=draw(st.sampled_from(CONV_VIAS)), batch=draw(st.sampled_from([1, 2])),
                      seed=draw(st.integers(0, 999)))


@st.composite
def mlps(draw):
    sizes = draw(st.lists(st.integers(2, 32), min_size=3, max_size=4))
    names = [f"layer{i}" for i in range(len(sizes) - 1)]
    return mlp_model(sizes, names=names, batch=draw(st.sampled_from([1, 3, "batch"])), seed=draw(st.integers(0, 999)))


@st.composite
def stacks(draw):
    """Convs (3×3 or 1×1, stride 1 or 2) → Relu … → Flatten → Gemm / MatMul layers: chains
    of every kind, some repeated with equal shapes (joint groups)."""
    b = Builder(seed=draw(st.integers(0, 999)))
    channels, size = draw(st.integers(1, 8)), draw(st.integers(4, 9))
    h = b.input("x", [1, channels, size, size])
    for i in range(draw(st.integers(0, 3))):
        k, stride = draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 1, 2]))
        out = draw(st.sampled_from([channels, 16, 24]))
        w = b.init(f"conv{i}.w", b.randn(out, channels, k, k, scale=(channels * k * k) ** -0.5))
        b.node("Conv", [h, w], [f"c{i}"], name=f"conv{i}", kernel_shape=[k, k], strides=[stride, stride],
               pads=[k // 2] * 4)
        b.node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")
        h, channels, size = f"r{i}", out, (size + 2 * (k // 2) - k) // stride + 1
    b.node("Flatten", [h], ["flat"], name="flatten", axis=1)
    h, width = "flat", channels * size * size
    for i in range(draw(st.integers(1, 3))):
        out = draw(st.sampled_from([width, 12, 20]))
        w = b.randn(width, out, scale=width ** -0.5)
        if draw(st.booleans()):
            b.node("Gemm", [h, b.init(f"fc{i}.w", w.T.copy()), b.init(f"fc{i}.b", b.randn(out))], [f"f{i}"],
                   name=f"fc{i}", transB=1)
        else:
            b.node("MatMul", [h, b.init(f"fc{i}.w", w)], [f"f{i}"], name=f"fc{i}")
        b.node("Tanh", [f"f{i}"], [f"t{i}"], name=f"tanh{i}")
        h, width = f"t{i}", out
    b.node("Identity", [h], ["y"], name="out")
    b.output("y", [1, width])
    return b.model()


models = st.one_of(gemms(), matmuls(), convs(), mlps(), stacks())


def _has_targets(model: onnx.ModelProto) -> bool:
    return bool(onnx_lrsd.inspect_model(model).targets)


@SETTINGS
@given(model=models)
def test_full_rank_reproduces_the_outputs(model):
    assume(_has_targets(model))
    config = CompressConfig(overrides=(LayerOverride("*", rank=FULL_RANK),), verify=False)
    result = onnx_lrsd.compress(model, config)
    assert all(layer.method != "dense" for layer in result.report.layers)
    feeds = feeds_for(model, seed=1)
    for want, got in zip(run(model, feeds), run(result.model, feeds)):  # outputs may be all zero (Relu)
        assert np.linalg.norm(got - want) <= FP32_TOL * max(np.linalg.norm(want), 1e-3 * np.sqrt(want.size))


FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}


def _count_params(model: onnx.ModelProto) -> int:
    tensors = list(model.graph.initializer) + [s.values for s in model.graph.sparse_initializer]
    tensors += [a.t for n in model.graph.node for a in n.attribute if a.HasField("t")]
    return sum(int(np.prod(t.dims, dtype=np.int64)) for t in tensors if t.data_type in FLOATS)


def _count_macs(model: onnx.ModelProto) -> int:
    """Multiply-accumulates at batch 1 from the shapes onnx infers: symbolic dims count 1,
    Conv output batch excluded; nodes of constants only are folded away (not counted)."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    shapes = {v.name: [d.dim_value or 1 for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output)}
    constants = {t.name for t in model.graph.initializer} | {s.values.name for s in model.graph.sparse_initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    shapes.update({t.name: list(t.dims) for t in model.graph.initializer})
    total = 0
    for node in model.graph.node:
        if node.op_type not in ("Gemm", "MatMul", "Conv") or all(i in constants for i in node.input if i):
            continue
        out, a, b = shapes[node.output[0]], shapes[node.input[0]], shapes[node.input[1]]
        if node.op_type == "Conv":
            total += int(np.prod(out[1:])) * int(np.prod(b[1:]))
        elif node.op_type == "MatMul":
            total += int(np.prod(out)) * a[-1]
        else:
            trans_b = any(attr.name == "transB" and attr.i for attr in node.attribute)
            total += int(np.prod(out)) * (b[1] if trans_b else b[0])
    return total


@settings(SETTINGS, max_examples=200)
@given(model=models, keep=st.floats(0.05, 1.0), sparse_share=st.sampled_from([0.0, 0.0, 0.2]),
       mode=st.sampled_from(["independent", "sequential"]), calibrated=st.booleans(),
       joint=st.sampled_from(["off", "off", "auto"]), stages=st.sampled_from([1, 1, 2]))
def test_any_keep_gives_a_valid_model_whose_costs_are_the_reports(model, keep, sparse_share, mode, calibrated,
                                                                   joint, stages):
    calibration = [feeds_for(model, seed=s, batch=2) for s in range(4)] if calibrated else None
    if joint != "off" and (mode != "independent" or not calibrated):
        joint = "off"  # joint fits need calibration statistics of the original model
    config = CompressConfig(keep=keep, sparse_share=sparse_share, mode=mode, joint=joint, stages=stages, verify=False)
    result = onnx_lrsd.compress(model, config, calibration=calibration)
    out, report = result.model, result.report
    onnx.checker.check_model(out, full_check=True)
    feeds = feeds_for(model, seed=9)
    before, after = run(model, feeds), run(out, feeds)
    assert [a.shape for a in after] == [b.shape for b in before]
    assert all(np.isfinite(a).all() for a in after)
    assert report.after.params == _count_params(out)
    assert report.before.params == _count_params(model)
    if not calibrated:  # with calibration, MACs are counted at its symbolic dims, not at 1 as _count_macs does
        assert report.after.macs == _count_macs(out) and report.before.macs == _count_macs(model)
    assert report.after.macs <= report.before.macs
    factorized = [layer for layer in report.layers if layer.method != "dense"]
    assert all(layer.params_after < layer.params_before and layer.macs_after < layer.macs_before
               for layer in factorized)
    assert {i.name for i in out.graph.input} == {i.name for i in model.graph.input}
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
