"""Per-op adapters that turn a Gemm / MatMul / Conv / Gather node into a `LayerTarget`, or say why not.

Orientation: every target exposes its weight as a matrix `W` of shape [in, out] with
``y = x @ W`` (ONNX MatMul's B). Gemm with transB, MatMul with the weight on the left and Conv
(through im2col) are converted by their adapter. A lookup Gather(E, ids) on a constant table
E [V, d] (an embedding) is ``y = onehot(ids) @ E``: W = E, in = V, out = d.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

import numpy as np
import onnx_graphsurgeon as gs

from .graph import ResolvedConstant, resolve_constant, sole_consumer
from .mapped import release_pages

WEIGHT_OPS_NOT_SUPPORTED = {
    "ConvTranspose": "ConvTranspose is not factorized",
    "ConvInteger": "integer conv (quantized model)",
    "MatMulInteger": "integer matmul (quantized model)",
    "QLinearConv": "quantized conv",
    "QLinearMatMul": "quantized matmul",
}


@dataclass(frozen=True)
class ConvGeometry:
    """Attributes and spatial sizes of a Conv (1-D or 2-D); pads in ONNX order
    (begin..., end...). Spatial sizes are None when shape inference could not tell."""

    kernel_shape: Tuple[int, ...]
    strides: Tuple[int, ...]
    pads: Tuple[int, ...]
    dilations: Tuple[int, ...]
    auto_pad: str
    in_spatial: Optional[Tuple[int, ...]]
    out_spatial: Optional[Tuple[int, ...]]

    @property
    def in_positions(self) -> int:
        return int(np.prod(self.in_spatial)) if self.in_spatial else 1

    @property
    def out_positions(self) -> int:
        return int(np.prod(self.out_spatial)) if self.out_spatial else 1

    @property
    def pointwise(self) -> bool:
        """A 1×1 conv with stride 1 and no padding: a matmul over channels at every position."""
        return (all(k == 1 for k in self.kernel_shape) and all(s == 1 for s in self.strides)
                and not any(self.pads) and self.auto_pad in ("NOTSET", ""))


@dataclass(frozen=True)
class GemmAttrs:
    alpha: float
    beta: float
    trans_a: bool
    trans_b: bool


@dataclass(frozen=True)
class LayerTarget:
    """A layer whose constant weight can be factorized.

    `rows` is the number of activation rows one inference (batch 1) multiplies by the weight
    (sequence positions of a MatMul, output positions of a Conv, indices of a Gather);
    `macs = rows · in · out`, except for a lookup (`lookup`: a Gather reads rows, 0 MACs).
    `weight_side` is "right" for ``x @ W`` and "left" for ``W @ x`` (MatMul only).

    A low-rank chain already in the graph (x·U then ·V; or a conv then a 1×1 conv) is one
    target named after its second node: `weight` is the product, `activation` the first
    node's input, `chain_first` the first node and `chain_rank` its inner width, so params and
    MACs are the chain's and a re-factorization can only lower the rank (fold, don't re-expand).
    """

    name: str
    op: str
    weight: np.ndarray
    weight_tensor: str
    activation: str
    output: str
    bias_tensor: Optional[str]
    in_features: int
    out_features: int
    rows: int
    weight_side: str = "right"
    gemm: Optional[GemmAttrs] = None
    conv: Optional[ConvGeometry] = None
    chain_first: Optional[str] = None
    chain_rank: Optional[int] = None

    @property
    def width(self) -> int:
        """Per activation row: in·out for a dense layer, r·(in + out) for a rank-r chain."""
        if self.chain_rank is not None:
            return self.chain_rank * (self.in_features + self.out_features)
        return self.in_features * self.out_features

    @property
    def params(self) -> int:
        return self.width if self.chain_rank is not None else int(self.weight.size)

    @property
    def lookup(self) -> bool:
        """A table read by index (Gather): its input is the one-hot token, its Gram diagonal."""
        return self.op == "Gather"

    @property
    def macs(self) -> int:
        return 0 if self.lookup else self.rows * self.width

    @property
    def dtype(self) -> np.dtype:
        return self.weight.dtype

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    def matrix(self) -> np.ndarray:
        """The weight as [in, out] in float64 (Conv: im2col order, channel then kernel)."""
        w = np.asarray(self.weight, dtype=np.float64)
        release_pages(self.weight)
        if self.conv is not None:
            return w.reshape(w.shape[0], -1).T
        if self.gemm is not None and self.gemm.trans_b:
            return w.T
        if self.weight_side == "left":
            return w.T
        return w


@dataclass(frozen=True)
class SkippedLayer:
    name: str
    op: str
    reason: str


class NotATarget(Exception):
    """Raised by an adapter with the reason a node is left dense."""


def _weight(node: gs.Node, index: int, graph: gs.Graph) -> ResolvedConstant:
    if len(node.inputs) <= index:
        raise NotATarget("has no weight input")
    tensor = node.inputs[index]
    if tensor in graph.inputs:
        raise NotATarget("weight is a graph input")
    resolved = resolve_constant(tensor)
    if resolved is None:
        producer = tensor.inputs[0].op if tensor.inputs else "?"
        if producer == "DequantizeLinear":
            raise NotATarget("weight is quantized (DequantizeLinear)")
        raise NotATarget(f"weight is computed at run time (by {producer})")
    if not np.issubdtype(resolved.values.dtype, np.floating):
        raise NotATarget(f"{resolved.values.dtype} weights are not factorized")
    if not sole_consumer(resolved, node, graph):
        raise NotATarget("weight is shared with other nodes")
    finite = bool(np.all(np.isfinite(resolved.values)))
    release_pages(resolved.values)
    if not finite:
        raise NotATarget("weight has NaN or inf values")
    return resolved


def _dequantized_constant(tensor: gs.Tensor) -> bool:
    """True for a constant seen through DequantizeLinear (a QDQ weight); a dequantized
    activation is not one."""
    producer = tensor.inputs[0] if tensor.inputs else None
    return (producer is not None and producer.op == "DequantizeLinear" and bool(producer.inputs)
            and resolve_constant(producer.inputs[0]) is not None)


def _shape(tensor: gs.Tensor) -> Optional[Tuple]:
    shape = getattr(tensor, "shape", None)
    return tuple(shape) if shape is not None else None


def _known_product(dims) -> int:
    """Product of the known dims; symbolic dims (batch, sequence) count as 1."""
    return int(np.prod([d for d in dims if isinstance(d, (int, np.integer)) and d > 0])) if dims else 1


def gemm_target(node: gs.Node, graph: gs.Graph) -> LayerTarget:
    """Y = alpha · A' B' + beta · C with B the constant weight."""
    if resolve_constant(node.inputs[0]) is not None:
        raise NotATarget("first operand is constant (weight on the left of a Gemm)")
    resolved = _weight(node, 1, graph)
    attrs = GemmAttrs(alpha=float(node.attrs.get("alpha", 1.0)), beta=float(node.attrs.get("beta", 1.0)),
                      trans_a=bool(node.attrs.get("transA", 0)), trans_b=bool(node.attrs.get("transB", 0)))
    w = resolved.values
    if w.ndim != 2:
        raise NotATarget(f"weight has rank {w.ndim}")
    n_in, n_out = (w.shape[1], w.shape[0]) if attrs.trans_b else w.shape
    x_shape = _shape(node.inputs[0])
    rows = x_shape[1] if x_shape and attrs.trans_a else (x_shape[0] if x_shape else 1)
    rows = int(rows) if isinstance(rows, (int, np.integer)) and rows > 0 else 1
    return LayerTarget(name=node.name, op="Gemm", weight=w, weight_tensor=node.inputs[1].name,
                       activation=node.inputs[0].name, output=node.outputs[0].name,
                       bias_tensor=node.inputs[2].name if len(node.inputs) > 2 and node.inputs[2].name else None,
                       in_features=int(n_in), out_features=int(n_out), rows=rows, gemm=attrs)


def matmul_target(node: gs.Node, graph: gs.Graph) -> LayerTarget:
    """y = x @ W (weight on the right) or y = W @ x (weight on the left), W constant 2-D."""
    if any(_dequantized_constant(t) for t in node.inputs[:2]):
        raise NotATarget("weight is quantized (DequantizeLinear)")
    right, left = resolve_constant(node.inputs[1]), resolve_constant(node.inputs[0])
    if right is not None and left is not None:
        raise NotATarget("both operands are constant")
    if right is None and left is None:
        raise NotATarget("no constant operand")
    side, index = ("right", 1) if right is not None else ("left", 0)
    resolved = _weight(node, index, graph)
    w = resolved.values
    if w.ndim != 2:
        raise NotATarget(f"weight has rank {w.ndim} (batched matmul)")
    x_shape = _shape(node.inputs[1 - index])
    if side == "right":
        n_in, n_out = w.shape
        rows = _known_product(x_shape[:-1]) if x_shape else 1
    else:
        n_out, n_in = w.shape
        rows = _known_product(x_shape[:-2] + x_shape[-1:]) if x_shape and len(x_shape) >= 2 else 1
    if x_shape is not None and len(x_shape) < 2:
        raise NotATarget("activation is a vector")
    return LayerTarget(name=node.name, op="MatMul", weight=w, weight_tensor=node.inputs[index].name,
                       activation=node.inputs[1 - index].name, output=node.outputs[0].name, bias_tensor=None,
                       in_features=int(n_in), out_features=int(n_out), rows=rows, weight_side=side)


def conv_target(node: gs.Node, graph: gs.Graph) -> LayerTarget:
    """Conv with group 1, 1-D or 2-D, any strides / pads / dilations / auto_pad."""
    if int(node.attrs.get("group", 1)) != 1:
        raise NotATarget(f"grouped conv (group={node.attrs['group']})")
    resolved = _weight(node, 1, graph)
    w = resolved.values
    if w.ndim not in (3, 4):
        raise NotATarget(f"{w.ndim - 2}-D conv is not factorized (1-D and 2-D are)")
    spatial = w.ndim - 2
    kernel = tuple(int(k) for k in w.shape[2:])
    geometry = ConvGeometry(
        kernel_shape=kernel,
        strides=tuple(int(s) for s in node.attrs.get("strides", [1] * spatial)),
        pads=tuple(int(p) for p in node.attrs.get("pads", [0] * 2 * spatial)),
        dilations=tuple(int(d) for d in node.attrs.get("dilations", [1] * spatial)),
        auto_pad=str(node.attrs.get("auto_pad", "NOTSET")),
        in_spatial=_spatial(_shape(node.inputs[0]), spatial),
        out_spatial=_spatial(_shape(node.outputs[0]), spatial))
    cout, cin = int(w.shape[0]), int(w.shape[1])
    bias = node.inputs[2].name if len(node.inputs) > 2 and node.inputs[2].name else None
    return LayerTarget(name=node.name, op="Conv", weight=w, weight_tensor=node.inputs[1].name,
                       activation=node.inputs[0].name, output=node.outputs[0].name, bias_tensor=bias,
                       in_features=cin * int(np.prod(kernel)), out_features=cout,
                       rows=geometry.out_positions, conv=geometry)


def gather_target(node: gs.Node, graph: gs.Graph) -> LayerTarget:
    """y = Gather(E, ids) along axis 0 with E [V, d] a constant table: y = onehot(ids) @ E, one
    row per index (`rows`: the indices' known dims; symbolic ones count as 1)."""
    resolved = _weight(node, 0, graph)
    table = resolved.values
    if table.ndim != 2:
        raise NotATarget(f"table has rank {table.ndim} (2-D tables are factorized)")
    if int(node.attrs.get("axis", 0)) not in (0, -2):
        raise NotATarget("gathers along axis 1 (columns of the table)")
    if resolve_constant(node.inputs[1]) is not None:
        raise NotATarget("indices are constant")
    ids_shape = _shape(node.inputs[1])
    return LayerTarget(name=node.name, op="Gather", weight=table, weight_tensor=node.inputs[0].name,
                       activation=node.inputs[1].name, output=node.outputs[0].name, bias_tensor=None,
                       in_features=int(table.shape[0]), out_features=int(table.shape[1]),
                       rows=_known_product(ids_shape) if ids_shape else 1)


def _spatial(shape: Optional[Tuple], n: int) -> Optional[Tuple[int, ...]]:
    if shape is None or len(shape) != n + 2:
        return None
    dims = shape[2:]
    if all(isinstance(d, (int, np.integer)) and d > 0 for d in dims):
        return tuple(int(d) for d in dims)
    return None


def _chain_head(second: LayerTarget, node: gs.Node, graph: gs.Graph) -> Optional[gs.Node]:
    """The node producing `second`'s activation if the two form a low-rank chain: a constant
    right-weight MatMul (before a MatMul / Gemm with the weight on the right) or a group-1 conv
    without bias (before a 1×1, stride-1, unpadded conv), consumed by `node` alone, with an
    inner width below both outer ones."""
    x = next((t for t in node.inputs if t.name == second.activation), None)
    if x is None or len(x.inputs) != 1 or len(x.outputs) != 1 or x in graph.outputs:
        return None
    first = x.inputs[0]
    if second.conv is None:
        plain = second.weight_side == "right" and (second.gemm is None or not second.gemm.trans_a)
        if not plain or first.op != "MatMul" or resolve_constant(first.inputs[1]) is None:
            return None
    else:
        if not second.conv.pointwise or first.op != "Conv" or len(first.inputs) > 2 or int(first.attrs.get("group", 1)) != 1:
            return None
    return first


def _kernel(node: Optional[gs.Node]) -> Optional[Tuple[int, ...]]:
    if node is None or node.op != "Conv" or len(node.inputs) < 2 or getattr(node.inputs[1], "shape", None) is None:
        return None
    return tuple(node.inputs[1].shape[2:])


def _in_spatial_chain(node: gs.Node) -> bool:
    """A k×1 conv feeding only a 1×k conv (or that 1×k conv): a spatial chain, which is not
    re-factored (its parts alone would only grow longer chains)."""
    def vertical(n):
        k = _kernel(n)
        return k is not None and len(k) == 2 and k[0] > 1 and k[1] == 1

    def horizontal(n):
        k = _kernel(n)
        return k is not None and len(k) == 2 and k[0] == 1 and k[1] > 1

    out = node.outputs[0] if node.outputs else None
    if vertical(node) and out is not None and len(out.outputs) == 1 and horizontal(out.outputs[0]):
        return True
    x = node.inputs[0] if node.inputs else None
    return horizontal(node) and x is not None and len(x.inputs) == 1 and len(x.outputs) == 1 and vertical(x.inputs[0])


def chain_target(second: LayerTarget, node: gs.Node, graph: gs.Graph) -> Optional[LayerTarget]:
    """`second` widened to the whole chain ending in `node`, or None when there is none."""
    first = None if second.lookup else _chain_head(second, node, graph)
    if first is None:
        return None
    try:
        head = (matmul_target if second.conv is None else conv_target)(first, graph)
    except NotATarget:
        return None
    if head.weight_side != "right" or head.out_features >= min(head.in_features, second.out_features):
        return None
    product = head.matrix() @ second.matrix()  # [in, out]
    if second.conv is not None:
        weight = product.T.reshape(second.out_channels, *head.weight.shape[1:])
    elif second.gemm is not None and second.gemm.trans_b:
        weight = product.T
    else:
        weight = product
    geometry = second.conv if head.conv is None else dataclasses.replace(head.conv, out_spatial=second.conv.out_spatial)
    return dataclasses.replace(second, weight=weight.astype(second.weight.dtype), activation=head.activation,
                               in_features=head.in_features, rows=head.rows if second.conv is None else second.rows,
                               conv=geometry, chain_first=first.name, chain_rank=head.out_features)


ADAPTERS: Dict[str, Callable[[gs.Node, gs.Graph], LayerTarget]] = {
    "Gemm": gemm_target,
    "MatMul": matmul_target,
    "Conv": conv_target,
    "Gather": gather_target,
}


def is_weight_layer(node: gs.Node) -> bool:
    """A node of a weight op; a Gather only when it reads a floating-point constant table (an
    index or shape Gather is no layer)."""
    if node.op != "Gather":
        return node.op in ADAPTERS or node.op in WEIGHT_OPS_NOT_SUPPORTED
    table = resolve_constant(node.inputs[0]) if node.inputs else None
    return table is not None and np.issubdtype(table.values.dtype, np.floating)


def classify(node: gs.Node, graph: gs.Graph) -> Union[LayerTarget, SkippedLayer, None]:
    """A target, a skipped weight layer with its reason, or None for other ops."""
    if node.domain not in ("", "ai.onnx", None):
        return None
    if node.op in WEIGHT_OPS_NOT_SUPPORTED:
        return SkippedLayer(node.name, node.op, WEIGHT_OPS_NOT_SUPPORTED[node.op])
    adapter = ADAPTERS.get(node.op)
    if adapter is None or not is_weight_layer(node):
        return None
    if node.op == "Conv" and _in_spatial_chain(node):
        return SkippedLayer(node.name, node.op, "part of a spatial (k×1, 1×k) chain, which is not re-factored")
    try:
        target = adapter(node, graph)
    except NotATarget as reason:
        return SkippedLayer(node.name, node.op, str(reason))
    return chain_target(target, node, graph) or target
