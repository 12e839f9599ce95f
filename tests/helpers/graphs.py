"""Small synthetic ONNX models for the tests, built with onnx.helper.

Every builder is seeded and returns a `ModelProto` whose layer of interest is named
`layer` (few-layer builders name theirs explicitly). A weight can be stored in several ways
(`via`):

- "initializer": a plain initializer;
- "constant": the output of a `Constant` node;
- "identity": an initializer seen through two `Identity` nodes;
- "cast_fp16": an fp16 initializer `Cast` to the model's dtype;
- "transpose": the transposed initializer through a `Transpose` node;
- "constant_of_shape": a `ConstantOfShape` filled with one value (a rank-1 matrix).

Helpers to run models in onnxruntime and compare outputs are at the end.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT
FLOAT16 = TensorProto.FLOAT16

def make_model(nodes, inputs, outputs, inits=None, opset=13):
    """A one-graph model at IR 8. inputs / outputs: [(name, elem_type, shape or None)]; inits: {name: array}."""
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


WEIGHT_VIAS = ("initializer", "constant", "identity", "cast_fp16", "transpose", "constant_of_shape")

DEFAULT_IR = 8
"""IR version of the built models (onnx 1.23 would write one onnxruntime 1.31 refuses)."""


def elem_type(dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


class Builder:
    """Collects nodes, initializers and value infos of one graph."""

    def __init__(self, dtype=np.float32, seed: int = 0):
        self.dtype = np.dtype(dtype)
        self.rng = np.random.default_rng(seed)
        self.nodes: List[onnx.NodeProto] = []
        self.initializers: List[onnx.TensorProto] = []
        self.inputs: List[onnx.ValueInfoProto] = []
        self.outputs: List[onnx.ValueInfoProto] = []

    # -- values ------------------------------------------------------------------------------
    def randn(self, *shape, scale: float = 1.0) -> np.ndarray:
        return (self.rng.standard_normal(shape) * scale).astype(self.dtype)

    def input(self, name: str, shape, dtype=None) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type(dtype or self.dtype), list(shape)))
        return name

    def output(self, name: str, shape=None, dtype=None) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type(dtype or self.dtype), shape))
        return name

    def init(self, name: str, values: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(values), name))
        return name

    def node(self, op: str, inputs: Sequence[str], outputs: Sequence[str], name: Optional[str] = None,
             domain: Optional[str] = None, **attrs) -> onnx.NodeProto:
        node = helper.make_node(op, list(inputs), list(outputs), name=name, domain=domain, **attrs)
        self.nodes.append(node)
        return node

    def weight(self, name: str, values: np.ndarray, via: str = "initializer") -> str:
        """Store `values` (in the model dtype) as a weight reached through `via`; returns the
        name of the tensor the layer consumes."""
        values = np.asarray(values, dtype=self.dtype)
        if via == "initializer":
            return self.init(name, values)
        if via == "constant":
            self.node("Constant", [], [name], name=f"{name}_const",
                      value=numpy_helper.from_array(values, f"{name}_value"))
            return name
        if via == "identity":
            self.init(f"{name}_raw", values)
            self.node("Identity", [f"{name}_raw"], [f"{name}_id1"], name=f"{name}_identity1")
            self.node("Identity", [f"{name}_id1"], [name], name=f"{name}_identity2")
            return name
        if via == "cast_fp16":
            self.init(f"{name}_fp16", values.astype(np.float16))
            self.node("Cast", [f"{name}_fp16"], [name], name=f"{name}_cast", to=elem_type(self.dtype))
            return name
        if via == "transpose":
            self.init(f"{name}_t", np.ascontiguousarray(values.T))
            self.node("Transpose", [f"{name}_t"], [name], name=f"{name}_transpose", perm=[1, 0])
            return name
        if via == "constant_of_shape":
            fill = values.reshape(-1)[:1]
            self.init(f"{name}_shape", np.asarray(values.shape, dtype=np.int64))
            self.node("ConstantOfShape", [f"{name}_shape"], [name], name=f"{name}_fill",
                      value=numpy_helper.from_array(fill, f"{name}_fill_value"))
            return name
        raise ValueError(f"unknown weight storage {via!r}")

    # -- model -------------------------------------------------------------------------------
    def model(self, opset: int = 13, ir_version: int = DEFAULT_IR, name: str = "test",
              metadata: Optional[Dict[str, str]] = None) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                  producer_name="onnx_lrsd-tests")
        model.ir_version = ir_version
        if metadata:
            helper.set_model_props(model, metadata)
        return model


def constant_of_shape_values(values: np.ndarray) -> np.ndarray:
    """What a weight stored as "constant_of_shape" really holds (its first value everywhere)."""
    return np.full(values.shape, values.reshape(-1)[0], dtype=values.dtype)


# --------------------------------------------------------------------------------------------
# One-layer builders
# --------------------------------------------------------------------------------------------
GEMM_BIASES = ("n", "1n", "mn", "m1", "scalar", None)


def gemm_model(m: int = 4, k: int = 12, n: int = 10, trans_a: int = 0, trans_b: int = 0,
               alpha: float = 1.0, beta: float = 1.0, bias: Optional[str] = "n", via: str = "initializer",
               opset: int = 13, dtype=np.float32, seed: int = 0, ir_version: int = DEFAULT_IR,
               metadata: Optional[Dict[str, str]] = None, name: str = "layer") -> onnx.ModelProto:
    """Y = alpha·A'·B' + beta·C with A the input ([m, k], or [k, m] with transA) and B the
    weight ([k, n], or [n, k] with transB). `bias` is C's shape: "n" → [n], "1n" → [1, n],
    "mn" → [m, n], "m1" → [m, 1], "scalar" → [], None → no C (opset ≥ 11)."""
    if bias is None and opset < 11:
        raise ValueError("Gemm without C needs opset >= 11")
    b = Builder(dtype, seed)
    x = b.input("x", [k, m] if trans_a else [m, k])
    w = b.randn(n, k) if trans_b else b.randn(k, n)
    inputs = [x, b.weight("W", w, via)]
    if bias is not None:
        shape = {"n": (n,), "1n": (1, n), "mn": (m, n), "m1": (m, 1), "scalar": ()}[bias]
        inputs.append(b.init("C", b.randn(*shape)))
    b.node("Gemm", inputs, ["y"], name=name, alpha=float(alpha), beta=float(beta), transA=trans_a, transB=trans_b)
    b.output("y", [m, n])
    return b.model(opset, ir_version, metadata=metadata)


def matmul_model(x_shape: Sequence = (4, 12), n: int = 10, side: str = "right", via: str = "initializer",
                 opset: int = 13, dtype=np.float32, seed: int = 0, ir_version: int = DEFAULT_IR,
                 name: str = "layer") -> onnx.ModelProto:
    """y = x @ W (side "right", W [x_shape[-1], n]) or y = W @ x (side "left",
    W [n, x_shape[-2]]). Leading dims of x may be symbolic strings."""
    b = Builder(dtype, seed)
    x = b.input("x", list(x_shape))
    if side == "right":
        w = b.randn(int(x_shape[-1]), n)
        b.node("MatMul", [x, b.weight("W", w, via)], ["y"], name=name)
        out = list(x_shape[:-1]) + [n]
    else:
        w = b.randn(n, int(x_shape[-2]))
        b.node("MatMul", [b.weight("W", w, via), x], ["y"], name=name)
        out = list(x_shape[:-2]) + [n, x_shape[-1]]
    b.output("y", out)
    return b.model(opset, ir_version)


def conv_model(cin: int = 6, cout: int = 8, kernel: Sequence[int] = (3, 3), spatial: Sequence[int] = (9, 10),
               strides: Optional[Sequence[int]] = None, pads: Optional[Sequence[int]] = None,
               dilations: Optional[Sequence[int]] = None, auto_pad: Optional[str] = None, bias: bool = True,
               group: int = 1, via: str = "initializer", opset: int = 13, dtype=np.float32, seed: int = 0,
               ir_version: int = DEFAULT_IR, batch=1, name: str = "layer") -> onnx.ModelProto:
    """A Conv (1-D, 2-D or 3-D by the length of `kernel`) on a [batch, cin, *spatial] input;
    attributes are written only when given."""
    b = Builder(dtype, seed)
    x = b.input("x", [batch, cin, *spatial])
    fan_in = cin // group * int(np.prod(kernel))
    inputs = [x, b.weight("W", b.randn(cout, cin // group, *kernel, scale=fan_in ** -0.5), via)]
    if bias:
        inputs.append(b.init("B", b.randn(cout)))
    attrs = {"kernel_shape": list(kernel)}
    for key, value in (("strides", strides), ("pads", pads), ("dilations", dilations)):
        if value is not None:
            attrs[key] = list(value)
    if auto_pad is not None:
        attrs["auto_pad"] = auto_pad
    if group != 1:
        attrs["group"] = group
    b.node("Conv", inputs, ["y"], name=name, **attrs)
    b.output("y", [batch, cout, *conv_output_spatial(spatial, kernel, strides, pads, dilations, auto_pad)])
    return b.model(opset, ir_version)


def conv_output_spatial(spatial, kernel, strides=None, pads=None, dilations=None, auto_pad=None) -> List[int]:
    """Output sizes of a Conv by the ONNX formulas (SAME_*: ceil(in / stride))."""
    n = len(kernel)
    strides = list(strides or [1] * n)
    pads = list(pads or [0] * 2 * n)
    dilations = list(dilations or [1] * n)
    out = []
    for i in range(n):
        extent = (kernel[i] - 1) * dilations[i] + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out.append(-(-spatial[i] // strides[i]))
        elif auto_pad == "VALID":
            out.append((spatial[i] - extent) // strides[i] + 1)
        else:
            out.append((spatial[i] + pads[i] + pads[i + n] - extent) // strides[i] + 1)
    return out


def mlp_model(sizes: Sequence[int] = (16, 32, 24, 8), names: Sequence[str] = ("enc/fc1", "enc/fc2", "dec/fc"),
              batch="batch", dtype=np.float32, seed: int = 0, opset: int = 13,
              metadata: Optional[Dict[str, str]] = None) -> onnx.ModelProto:
    """MatMul → Add → Relu layers (the last without Relu), weights [sizes[i], sizes[i+1]]."""
    assert len(names) == len(sizes) - 1
    b = Builder(dtype, seed)
    h = b.input("x", [batch, sizes[0]])
    for i, name in enumerate(names):
        w = b.init(f"{name}.weight", b.randn(sizes[i], sizes[i + 1], scale=sizes[i] ** -0.5))
        bias = b.init(f"{name}.bias", b.randn(sizes[i + 1], scale=0.1))
        b.node("MatMul", [h, w], [f"{name}.mm"], name=name)
        b.node("Add", [f"{name}.mm", bias], [f"{name}.out"], name=f"{name}/add")
        h = f"{name}.out"
        if i < len(names) - 1:
            b.node("Relu", [h], [f"{name}.relu"], name=f"{name}/relu")
            h = f"{name}.relu"
    b.node("Identity", [h], ["y"], name="out")
    b.output("y", [batch, sizes[-1]])
    return b.model(opset, metadata=metadata)


def cnn_model(seed: int = 0, opset: int = 13, dtype=np.float32) -> onnx.ModelProto:
    """conv1 (3×3, stride 2, pad 1) → Relu → conv2 (1×1) → Relu → GlobalAveragePool →
    Flatten → fc (Gemm, transB): a few layers of every kind, input [1, 4, 12, 12]."""
    b = Builder(dtype, seed)
    b.input("x", [1, 4, 12, 12])
    b.node("Conv", ["x", b.init("conv1.w", b.randn(32, 4, 3, 3, scale=1 / 6)), b.init("conv1.b", b.randn(32))],
           ["c1"], name="conv1", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    b.node("Relu", ["c1"], ["r1"], name="relu1")
    b.node("Conv", ["r1", b.init("conv2.w", b.randn(48, 32, 1, 1, scale=32 ** -0.5))], ["c2"], name="conv2",
           kernel_shape=[1, 1])
    b.node("Relu", ["c2"], ["r2"], name="relu2")
    b.node("GlobalAveragePool", ["r2"], ["p"], name="pool")
    b.node("Flatten", ["p"], ["f"], name="flatten", axis=1)
    b.node("Gemm", ["f", b.init("fc.w", b.randn(10, 48, scale=48 ** -0.5)), b.init("fc.b", b.randn(10))], ["y"],
           name="fc", transB=1)
    b.output("y", [1, 10])
    return b.model(opset)


def as_ir3(model: onnx.ModelProto) -> onnx.ModelProto:
    """The IR 3 style of old model-zoo files: IR version 3, every initializer also listed
    among the graph inputs."""
    old = onnx.ModelProto()
    old.CopyFrom(model)
    old.ir_version = 3
    listed = {i.name for i in old.graph.input}
    old.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                           for t in old.graph.initializer if t.name not in listed)
    return old


# --------------------------------------------------------------------------------------------
# Running models
# --------------------------------------------------------------------------------------------
def session(model: onnx.ModelProto, optimized_path: Optional[str] = None,
            level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = level
    options.log_severity_level = 3
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    return ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])


def real_inputs(model: onnx.ModelProto) -> List[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def feeds_for(model: onnx.ModelProto, seed: int = 1, batch: int = 2) -> Dict[str, np.ndarray]:
    """Seeded standard-normal inputs; symbolic dims take `batch`."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in real_inputs(model):
        t = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in t.shape.dim]
        feeds[inp.name] = rng.standard_normal(shape).astype(helper.tensor_dtype_to_np_dtype(t.elem_type))
    return feeds


def run(model: onnx.ModelProto, feeds: Dict[str, np.ndarray]) -> List[np.ndarray]:
    return session(model).run(None, feeds)


def rel_error(reference: np.ndarray, other: np.ndarray) -> float:
    ref, out = np.asarray(reference, np.float64), np.asarray(other, np.float64)
    assert ref.shape == out.shape, (ref.shape, out.shape)
    return float(np.linalg.norm(ref - out) / np.linalg.norm(ref))


def max_rel_error(a: onnx.ModelProto, b: onnx.ModelProto, seed: int = 1, batch: int = 2) -> float:
    """Largest relative output error of `b` against `a` on the same seeded inputs."""
    feeds = feeds_for(a, seed, batch)
    return max(rel_error(x, y) for x, y in zip(run(a, feeds), run(b, feeds)))


def initializer_arrays(model: onnx.ModelProto) -> Dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def assert_same_compression(got, want) -> None:
    """Two `compress` results agree: the same layers, kinds and ranks, initializers equal up
    to float rounding, outputs within 1e-5 relative."""
    assert [(l.name, l.method, l.ranks) for l in got.report.layers] == \
        [(l.name, l.method, l.ranks) for l in want.report.layers]
    a, b = initializer_arrays(want.model), initializer_arrays(got.model)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-6 * np.abs(a[name]).max())
    assert max_rel_error(want.model, got.model) < 1e-5


def producers(model: onnx.ModelProto) -> Dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}
