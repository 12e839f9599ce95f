"""Replace each factorized layer by its chain of smaller ops.

A lookup table Gather(E, ids), E ≈ U·V, becomes Gather(U, ids)·V.

The chain is built from the layer's input tensor and ends in the layer's original output
tensor, so consumers and graph outputs are untouched. MatMul chains are emitted as (x·U)·V:
written x·(U·V), onnxruntime's constant folding would multiply them back into one matrix.

Sparse residuals (W ≈ UV + S, weight on the right):
- "rows" (S non-zero on input rows P): x·W′ = [x·U, x[..., P]]·[V; S_P] — a Gather and a Concat
  feeding the chain's second matmul (one matmul; 1×1 convs gather and concatenate channels).
  A k×k conv's residual holds whole input channels C (all their taps): y = chain(x) +
  Conv(x[:, C], S_C) with the layer's geometry, a channel Gather and a small conv whose sum
  onnxruntime fuses into the conv (NCHWc "Sum" input).
- "unstructured": W′ = U·V + S is written as a constant subgraph Add(MatMul(U, V), S) with S
  saved as a sparse initializer; onnxruntime densifies and folds it into one dense weight at
  session creation, so it makes the file smaller and nothing faster.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Tuple

import numpy as np
import onnx_graphsurgeon as gs

from ..decompose import (
    channel_factors_to_convs,
    spatial_factors_to_convs,
    tucker2_to_convs,
)
from ..decompose.joint import TwoTerms
from .graph import resolve_constant
from .layers import LayerTarget
from .naming import TensorNamer, layer_of

if TYPE_CHECKING:  # the fits' result type; the model layer does not depend on planning
    from ..plan.factorize import LayerFactorization


def rewrite_layers(graph: gs.Graph, targets: Dict[str, LayerTarget],
                   factorizations: Iterable[LayerFactorization]) -> List[str]:
    """Replace each factorized layer's node by its chain (the old node is left dead for
    cleanup; its output tensor is now produced by the chain's last node). Returns the names
    of the constants to save as sparse initializers (`export_model(..., sparse=...)`)."""
    nodes = {n.name: n for n in graph.nodes}
    namer = TensorNamer(graph)
    sparse: List[str] = []
    shared: Dict[str, gs.Constant] = {}
    for fact in factorizations:
        target, node = targets[fact.name], nodes[fact.name]
        emitter = _Emitter(graph, node, target, namer, shared, dict(fact.shared))
        new_nodes = EMITTERS[target.op](emitter, fact)
        node.outputs.clear()
        graph.nodes.extend(new_nodes)
        sparse.extend(emitter.sparse)
    return sparse


class _Emitter:
    """Builds the nodes of one layer's replacement."""

    def __init__(self, graph: gs.Graph, node: gs.Node, target: LayerTarget, namer: TensorNamer,
                 shared: Optional[Dict[str, gs.Constant]] = None, shared_roles: Optional[Dict[str, str]] = None):
        self.graph, self.node, self.target, self.namer = graph, node, target, namer
        self.shared, self.shared_roles = (shared if shared is not None else {}), (shared_roles or {})
        self.base = layer_of(node.name)  # a re-factored chain keeps its layer's name
        self.nodes: List[gs.Node] = []
        self.sparse: List[str] = []

    def const(self, role: str, values: np.ndarray) -> gs.Constant:
        """A new weight in the layer's dtype, subnormal values flushed to zero: they add
        nothing, and activations they spread into run many times slower on x86 (PP-OCR:
        2.6× the whole model's latency). A role shared with other layers (a joint group's
        factor) is written once and reused."""
        key = self.shared_roles.get(role)
        if key is not None and key in self.shared:
            return self.shared[key]
        array = np.array(values, dtype=self.target.dtype, order="C")  # a copy: flushed below
        if np.issubdtype(array.dtype, np.floating):
            array[np.abs(array) < np.finfo(array.dtype).tiny] = 0
        constant = gs.Constant(self.namer(key or self.base, role if key is None else "shared"), array)
        if key is not None:
            self.shared[key] = constant
        return constant

    def indices(self, role: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(self.namer(self.base, role), np.ascontiguousarray(values, dtype=np.int64))

    def sparse_const(self, role: str, values: np.ndarray) -> gs.Constant:
        """A constant to be saved as a sparse initializer (its zeros are not stored)."""
        tensor = self.const(role, values)
        self.sparse.append(tensor.name)
        return tensor

    def tensor(self, role: str) -> gs.Variable:
        return gs.Variable(self.namer(self.base, role))

    def op(self, op: str, role: str, inputs, output: Optional[gs.Tensor] = None, **attrs) -> gs.Tensor:
        out = output if output is not None else self.tensor(role)
        self.nodes.append(gs.Node(op=op, name=self.namer(self.base, role), attrs=attrs,
                                  inputs=list(inputs), outputs=[out]))
        return out

    @property
    def x(self) -> gs.Tensor:
        """The layer's input (of a chain target: the first node's input)."""
        found = next((t for t in self.node.inputs if t.name == self.target.activation), None)
        return found if found is not None else self.graph.tensors()[self.target.activation]

    @property
    def y(self) -> gs.Tensor:
        return self.node.outputs[0]

    def bias(self, shift: Optional[np.ndarray]) -> Optional[gs.Tensor]:
        """The layer's bias plus `shift`; a new constant when shifted, else the original."""
        original = self.node.inputs[2] if self.target.bias_tensor else None
        if shift is None:
            return original
        if original is None:
            return self.const("bias", shift)
        resolved = resolve_constant(original)
        if resolved is None:
            raise ValueError(f"{self.node.name}: bias correction needs a constant bias")
        return self.const("bias", np.asarray(resolved.values, np.float64) + shift)


def _emit_matmul(e: _Emitter, fact: LayerFactorization) -> List[gs.Node]:
    """y = (x·U)·V, or for a weight on the left y = Vᵀ·(Uᵀ·x); plus bias shift if any. Two
    terms (a "both" joint member): y = (x·U)·V + (x·U₂)·V₂."""
    f = fact.factors
    if isinstance(f, TwoTerms):
        first = e.op("MatMul", "v", [e.op("MatMul", "u", [e.x, e.const("U", f.first.U)]), e.const("V", f.first.V)])
        second = e.op("MatMul", "v2", [e.op("MatMul", "u2", [e.x, e.const("U2", f.second.U)]),
                                       e.const("V2", f.second.V)])
        _emit_last(e, "Add", "sum", [first, second], fact.bias_shift)
        return e.nodes
    if e.target.weight_side == "left":
        h = e.op("MatMul", "u", [e.const("U", f.U.T), e.x])
        out = e.y if fact.bias_shift is None else None
        y = e.op("MatMul", "v", [e.const("V", f.V.T), h], output=out)
        if fact.bias_shift is not None:
            e.op("Add", "bias_add", [y, e.const("bias", fact.bias_shift[:, None])], output=e.y)
        return e.nodes
    h, v = _right_chain(e, e.x, fact, axis=-1)
    _emit_last(e, "MatMul", "v", [h, v], fact.bias_shift)
    return e.nodes


def _emit_last(e: _Emitter, op: str, role: str, inputs, shift: Optional[np.ndarray]) -> None:
    """The chain's last node, writing the layer's output; a bias shift is folded into the next
    Add when one takes it, else added by an Add of its own."""
    if shift is None or _fold_into_next_add(e, shift):
        e.op(op, role, inputs, output=e.y)
    else:
        e.op("Add", "bias_add", [e.op(op, role, inputs), e.const("bias", shift)], output=e.y)


def _right_chain(e: _Emitter, a: gs.Tensor, fact: LayerFactorization, axis: int,
                 scale: float = 1.0) -> Tuple[gs.Tensor, gs.Tensor]:
    """(h, B) with a·(scale·W′) = h·B, W′ = U·V (+ S) [in, out], features on `axis` of `a`.

    Plain chain: h = a·U, B = scale·V. Rows residual on P: h = [a·U, a[P]] (Concat on `axis`),
    B = scale·[V; S_P] (for a 1×1 conv a·U is a 1×1 conv). Unstructured: h = a and
    B = Add(MatMul(U, scale·V), scale·S), a constant subgraph with S sparse. The caller
    multiplies h by B (MatMul, Gemm or a 1×1 conv).
    """
    f, sparse = fact.low_rank, fact.sparse
    if sparse is not None and sparse.structure == "unstructured":
        s = e.sparse_const("S", scale * sparse.to_dense(f.shape))
        if f.rank == 0:
            return a, s
        uv = e.op("MatMul", "uv", [e.const("U", f.U), e.const("V", scale * f.V)])
        return a, e.op("Add", "w", [uv, s])
    parts = [_project(e, a, f.U)] if f.rank else []
    if sparse is None:
        return parts[0], e.const("V", scale * f.V)
    parts.append(e.op("Gather", "rows", [a, e.indices("rows", sparse.rows)], axis=axis))
    h = parts[0] if len(parts) == 1 else e.op("Concat", "concat", parts, axis=axis)
    return h, e.const("VS", scale * np.vstack([f.V, sparse.values]))


def _fold_into_next_add(e: _Emitter, shift: np.ndarray) -> bool:
    """Add `shift` to the constant bias of an Add that alone consumes the output (the usual
    MatMul + bias pair of exported linear layers), so no extra node is needed."""
    consumers = e.y.outputs
    if len(consumers) != 1 or consumers[0].op != "Add" or any(t.name == e.y.name for t in e.graph.outputs):
        return False
    add = consumers[0]
    other = 1 if add.inputs[0] is e.y else 0
    resolved = resolve_constant(add.inputs[other])
    if resolved is None or resolved.values.shape != shift.shape:
        return False
    add.inputs[other] = e.const("bias", np.asarray(resolved.values, np.float64) + shift)
    return True


def _project(e: _Emitter, a: gs.Tensor, u: np.ndarray) -> gs.Tensor:
    """a·U: a MatMul, or for a 1×1 conv target a 1×1 conv with weight Uᵀ [r, Cin, 1, …]."""
    if e.target.conv is None:
        return e.op("MatMul", "u", [a, e.const("U", u)])
    n = len(e.target.conv.kernel_shape)
    return e.op("Conv", "u", [a, e.const("U", u.T.reshape(*u.T.shape, *[1] * n))], **_pointwise_attrs(n))


def _emit_gemm(e: _Emitter, fact: LayerFactorization) -> List[gs.Node]:
    """Y = alpha·A'·B' + beta·C as h = A'·U, Y = Gemm(h, alpha·V, C, beta) (with a residual,
    h and alpha·V as `_right_chain` makes them)."""
    attrs = e.target.gemm
    a = e.op("Transpose", "trans_a", [e.x], perm=[1, 0]) if attrs.trans_a else e.x
    h, v = _right_chain(e, a, fact, axis=1, scale=attrs.alpha)
    shift = fact.bias_shift
    has_bias = e.target.bias_tensor is not None and attrs.beta != 0
    if not has_bias and shift is None:
        e.op("MatMul", "v", [h, v], output=e.y)
    elif not has_bias:
        e.op("Gemm", "v", [h, v, e.const("bias", attrs.alpha * shift)], output=e.y)
    else:
        c = e.bias(None if shift is None else attrs.alpha * shift / attrs.beta)
        e.op("Gemm", "v", [h, v, c], output=e.y, beta=attrs.beta)
    return e.nodes


def _conv_attrs(target: LayerTarget, kernel, strides, pads, dilations) -> dict:
    geometry = target.conv
    attrs = {"kernel_shape": list(kernel), "strides": list(strides), "dilations": list(dilations)}
    if geometry.auto_pad not in ("NOTSET", ""):
        attrs["auto_pad"] = geometry.auto_pad
    else:
        attrs["pads"] = list(pads)
    return attrs


def _pointwise_attrs(n: int) -> dict:
    return {"kernel_shape": [1] * n, "strides": [1] * n, "pads": [0] * (2 * n), "dilations": [1] * n}


def _emit_conv(e: _Emitter, fact: LayerFactorization) -> List[gs.Node]:
    t, g = e.target, e.target.conv
    n = len(g.kernel_shape)
    bias = e.bias(fact.bias_shift)
    tail = [bias] if bias is not None else []
    if fact.sparse is not None and g.pointwise:  # the rows join the chain's 1×1 conv
        _emit_pointwise_residual(e, fact, tail)
    elif fact.sparse is not None:
        _emit_channel_residual(e, fact, tail)
    elif fact.method == "channel":
        w1, w2 = channel_factors_to_convs(fact.factors, t.in_channels, g.kernel_shape)
        h = e.op("Conv", "channel", [e.x, e.const("W1", w1)],
                 **_conv_attrs(t, g.kernel_shape, g.strides, g.pads, g.dilations))
        e.op("Conv", "pointwise", [h, e.const("W2", w2)] + tail, output=e.y, **_pointwise_attrs(n))
    elif fact.method == "spatial":
        (kh, kw), (sh, sw), (dh, dw) = g.kernel_shape, g.strides, g.dilations
        pt, pl, pb, pr = g.pads
        w1, w2 = spatial_factors_to_convs(fact.factors, t.out_channels, t.in_channels, kh, kw)
        h = e.op("Conv", "vertical", [e.x, e.const("W1", w1)],
                 **_conv_attrs(t, (kh, 1), (sh, 1), (pt, 0, pb, 0), (dh, 1)))
        e.op("Conv", "horizontal", [h, e.const("W2", w2)] + tail, output=e.y,
             **_conv_attrs(t, (1, kw), (1, sw), (0, pl, 0, pr), (1, dw)))
    elif fact.method == "tucker2":
        w1, w2, w3 = tucker2_to_convs(fact.factors)
        h1 = e.op("Conv", "tucker_in", [e.x, e.const("W1", w1)], **_pointwise_attrs(n))
        h2 = e.op("Conv", "tucker_core", [h1, e.const("W2", w2)],
                  **_conv_attrs(t, g.kernel_shape, g.strides, g.pads, g.dilations))
        e.op("Conv", "tucker_out", [h2, e.const("W3", w3)] + tail, output=e.y, **_pointwise_attrs(n))
    else:
        raise ValueError(f"{t.name}: conv cannot be written with method {fact.method!r}")
    return e.nodes


def _emit_channel_residual(e: _Emitter, fact: LayerFactorization, tail: List[gs.Tensor]) -> None:
    """k×k conv with a rows residual on whole input channels C (rows in blocks of kernel taps):
    y = Conv1×1(Conv_k×k(x, W1), W2) + Conv_k×k(x[:, C], S_C), the bias on the residual conv."""
    t, g, sparse = e.target, e.target.conv, fact.sparse
    geometry = _conv_attrs(t, g.kernel_shape, g.strides, g.pads, g.dilations)
    if sparse.structure != "rows":  # unstructured: one conv, its weight the constant subgraph UV + S
        _, b = _right_chain(e, e.x, fact, axis=1)
        shape = e.indices("wshape", [t.out_channels, t.in_channels, *g.kernel_shape])
        weight = e.op("Reshape", "w4", [e.op("Transpose", "wt", [b], perm=[1, 0]), shape])
        e.op("Conv", "conv", [e.x, weight] + tail, output=e.y, **geometry)
        return
    taps = int(np.prod(g.kernel_shape))
    channels = sparse.rows[::taps] // taps
    if not np.array_equal(sparse.rows, (channels[:, None] * taps + np.arange(taps)).ravel()):
        raise ValueError(f"{t.name}: a conv residual must hold whole input channels")
    n = len(g.kernel_shape)
    main = []
    if fact.low_rank.rank:
        w1, w2 = channel_factors_to_convs(fact.low_rank, t.in_channels, g.kernel_shape)
        h = e.op("Conv", "channel", [e.x, e.const("W1", w1)], **geometry)
        main = [e.op("Conv", "pointwise", [h, e.const("W2", w2)], **_pointwise_attrs(n))]
    picked = e.op("Gather", "channels", [e.x, e.indices("channels", channels)], axis=1)
    s = np.asarray(sparse.values, np.float64).T.reshape(t.out_channels, channels.size, *g.kernel_shape)
    out = None if main else e.y
    residual = e.op("Conv", "residual", [picked, e.const("S", s)] + tail, output=out, **geometry)
    if main:
        e.op("Add", "sum", [main[0], residual], output=e.y)


def _emit_pointwise_residual(e: _Emitter, fact: LayerFactorization, tail: List[gs.Tensor]) -> None:
    """1×1 conv (stride 1, no padding) with a residual: `_right_chain` over channels (axis 1),
    then a 1×1 conv whose weight is B [in′, Cout] transposed to [Cout, in′, 1, …]."""
    n = len(e.target.conv.kernel_shape)
    h, b = _right_chain(e, e.x, fact, axis=1)
    if isinstance(b, gs.Constant):
        weight = e.const("W2", np.asarray(b.values, np.float64).T.reshape(*b.shape[::-1], *[1] * n))
    else:  # unstructured: a constant subgraph, reshaped to the conv layout
        bt = e.op("Transpose", "wt", [b], perm=[1, 0])
        shape = e.indices("wshape", [e.target.out_channels, e.target.in_channels] + [1] * n)
        weight = e.op("Reshape", "w4", [bt, shape])
    e.op("Conv", "pointwise", [h, weight] + tail, output=e.y, **_pointwise_attrs(n))


def _emit_gather(e: _Emitter, fact: LayerFactorization) -> List[gs.Node]:
    """A lookup Gather(E, ids) with E ≈ U·V [V, d]: y = Gather(U, ids)·V (the table U [V, r]
    read by index, then one MatMul by V [r, d]); plus bias shift if any."""
    f = fact.factors
    h = e.op("Gather", "u", [e.const("U", f.U), e.x], axis=0)
    _emit_last(e, "MatMul", "v", [h, e.const("V", f.V)], fact.bias_shift)
    return e.nodes


EMITTERS = {"MatMul": _emit_matmul, "Gemm": _emit_gemm, "Conv": _emit_conv, "Gather": _emit_gather}
