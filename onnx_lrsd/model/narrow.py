"""Rewrite a graph so that channel groups keep only some channels.

For each group: the producers' output channels (weight, bias), the per-channel constants
between them (BatchNorm, bias Add, scales, depthwise conv weights; the depthwise `group`
attribute) and the consumers' input channels are cut to the kept channels. A consumer may
instead get a refitted weight W' [k·block, out] and a bias shift (see
`onnx_lrsd.decompose.channels.refit_consumer`): the shift is added to its bias (Conv / Gemm
bias input, or the constant of the Add that follows a MatMul), or a bias is added. Every new
constant is a new initializer named ``{node}/lrsd/{role}``, so shared constants stay intact.
Attention-head groups also rewrite the Reshape constants that count heads, and channel groups
the C in the shape of a flatten into a classifier or of a [C] vector reshaped to [1, C, 1, 1]. Shapes recorded
for the narrowed tensors are dropped (they changed). A consumer reading the group through a
channel Concat has its rows cut (or refitted) at the group's offset. Graph inputs and outputs
never belong to a group, so dynamic batch and sequence dims are untouched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import numpy as np
import onnx_graphsurgeon as gs

from .channel_groups import ChannelGroup, vector_view, weight_target
from .graph import resolve_constant
from .naming import TensorNamer

__all__ = ["ConsumerRefit", "GroupPlan", "narrow_graph"]


@dataclass(frozen=True)
class ConsumerRefit:
    """New weight [k·block, out] (y = x @ W orientation, float64) and bias shift [out] of a consumer."""

    node: str
    weight: np.ndarray
    bias_shift: np.ndarray


@dataclass(frozen=True)
class GroupPlan:
    """The channels a group keeps (ascending) and its consumers' refits (none: plain cut)."""

    group: ChannelGroup
    kept: np.ndarray
    refits: Tuple[ConsumerRefit, ...] = ()

    @property
    def width(self) -> int:
        return int(len(self.kept))


class _Values:
    """Current values of the constant inputs being rewritten, keyed by (node, input index)."""

    def __init__(self, nodes: Dict[str, gs.Node]):
        self.nodes = nodes
        self.values: Dict[Tuple[str, int], np.ndarray] = {}
        self.dtypes: Dict[Tuple[str, int], np.dtype] = {}

    def get(self, node: str, index: int) -> np.ndarray:
        key = (node, index)
        if key not in self.values:
            resolved = resolve_constant(self.nodes[node].inputs[index])
            if resolved is None:
                raise ValueError(f"input {index} of '{node}' is not a constant")
            self.values[key] = np.asarray(resolved.values)
            self.dtypes[key] = resolved.values.dtype
        return self.values[key]

    def set(self, node: str, index: int, value: np.ndarray, dtype=None) -> None:
        key = (node, index)
        if key not in self.dtypes:
            self.dtypes[key] = np.dtype(dtype)
        self.values[key] = value


def _to_layout(node: gs.Node, W: np.ndarray, graph: gs.Graph) -> np.ndarray:
    """Weight [in, out] (conv: im2col order) in the node's own layout."""
    target = weight_target(node, graph)
    if target.conv is not None:
        return W.T.reshape((W.shape[1], -1) + tuple(target.conv.kernel_shape))
    if target.gemm is not None and target.gemm.trans_b:
        return W.T
    return W


def _bias_add(node: gs.Node, outputs: set, channels: int, graph: gs.Graph):
    """Where the constant per-channel bias Add right after `node` keeps its values: (node, input
    index) of the Add's constant, or of the [C] vector a Reshape / Unsqueeze turns into it
    (a squeeze-excitation bias stored as Reshape(b, [1, C, 1, 1])); None if there is none.
    Per-channel: C entries on the channel axis (1 for a conv, the last for a MatMul), 1 elsewhere."""
    out = node.outputs[0]
    if out.name in outputs or len(out.outputs) != 1 or out.outputs[0].op != "Add":
        return None
    add = out.outputs[0]
    other = 1 if add.inputs[0] is out else 0
    if add.inputs[1 - other] is not out:
        return None
    operand = add.inputs[other]
    resolved = resolve_constant(operand)
    view = operand.inputs[0] if resolved is None and operand.inputs and len(operand.outputs) == 1 else None
    values = resolved.values if resolved is not None else (vector_view(view) if view is not None else None)
    if values is None or values.size != channels:
        return None
    target = weight_target(node, graph)
    axis = values.ndim - 1 - (len(target.conv.kernel_shape) if target.conv is not None else 0)
    if axis < 0 or values.shape[axis] != channels:
        return None
    return (add, other) if resolved is not None else (view, 0)


def _columns(kept: np.ndarray, block: int) -> np.ndarray:
    """Indices of the `block` consecutive entries of every kept channel."""
    return (np.asarray(kept)[:, None] * block + np.arange(block)).reshape(-1)


def narrow_graph(graph: gs.Graph, plans: Sequence[GroupPlan]) -> int:
    """Apply `plans` in place; returns the number of groups narrowed (full-width plans are skipped)."""
    nodes = {n.name: n for n in graph.nodes}
    outputs = {t.name for t in graph.outputs}
    values = _Values(nodes)
    extra_bias: Dict[str, np.ndarray] = {}
    plans = [p for p in plans if p.width < p.group.channels]
    _narrow_consumers(graph, plans, nodes, values, extra_bias, outputs)
    for plan in plans:
        kept = plan.kept
        for param in dict.fromkeys(plan.group.params):
            current = values.get(param.node, param.index)
            values.set(param.node, param.index, np.take(current, _columns(kept, param.block), axis=param.axis))
            if param.node in extra_bias and param.index == 1 and param.node in plan.group.producers:
                extra_bias[param.node] = extra_bias[param.node][_columns(kept, param.block)]
        for edit in plan.group.shapes:
            shape = np.array(values.get(edit.node, edit.index))
            shape.reshape(-1)[edit.position] = len(kept) * edit.per_channel
            values.set(edit.node, edit.index, shape)
        for name in plan.group.depthwise:
            nodes[name].attrs["group"] = len(kept)
    if plans:  # recorded shapes of narrowed tensors are stale; inference redoes them
        io = {t.name for t in graph.inputs} | outputs
        for tensor in graph.tensors().values():
            if isinstance(tensor, gs.Variable) and tensor.name not in io:
                tensor.shape = None
    namer = TensorNamer(graph)
    roles = {1: "weight", 2: "bias"}
    for (name, index), value in values.values.items():
        dtype = values.dtypes[(name, index)]
        if nodes[name].op in ("Reshape", "Unsqueeze"):  # a per-channel vector (0) seen through a shape (1)
            role = "shape" if index == 1 else "values"
        else:
            role = roles.get(index, f"param{index}")
        nodes[name].inputs[index] = gs.Constant(namer(name, role),
                                                np.ascontiguousarray(value.astype(dtype)))
    for name, bias in extra_bias.items():
        node = nodes[name]
        dtype = weight_target(node, graph).weight.dtype if weight_target(node, graph) else np.float32
        const = gs.Constant(namer(name, "bias"), np.ascontiguousarray(bias.astype(dtype)))
        if node.op in ("Conv", "Gemm"):
            node.inputs.append(const)
            continue
        original = node.outputs[0]
        middle = gs.Variable(namer(name, "unbiased"), dtype=original.dtype)
        node.outputs[0] = middle
        graph.nodes.append(gs.Node("Add", name=namer(name, "bias_add"), inputs=[middle, const], outputs=[original]))
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return len(plans)


def _narrow_consumers(graph: gs.Graph, plans: Sequence[GroupPlan], nodes: Dict[str, gs.Node], values: _Values,
                      extra_bias: Dict[str, np.ndarray], outputs: set) -> None:
    """Cut (or refit) the consumers' input rows, first of all: refits are fitted on the full
    output width. A consumer reading several groups beside each other (a channel Concat) has
    its parts rewritten from the last offset to the first, so the rows before a part keep
    their places; the refits' bias shifts add up."""
    parts: Dict[str, list] = {}
    for plan in plans:
        refits = {r.node: r for r in plan.refits}
        for name in plan.group.consumers:
            parts.setdefault(name, []).append((plan.group.read_at(name)[0], plan, refits.get(name)))
    for name, reads in parts.items():
        node = nodes[name]
        target = weight_target(node, graph)
        W = np.asarray(target.matrix(), np.float64)  # cast back to the weight's dtype when written
        for offset, plan, refit in sorted(reads, key=lambda read: -read[0]):
            block = plan.group.block * (int(np.prod(target.conv.kernel_shape)) if target.conv is not None else 1)
            start, end = offset * block, (offset + plan.group.channels) * block
            part = refit.weight if refit is not None else W[start:end][_columns(plan.kept, block)]
            W = np.concatenate([W[:start], np.asarray(part, np.float64), W[end:]])
            if refit is not None:
                _shift_bias(node, refit.bias_shift, values, extra_bias, outputs, graph)
        values.get(name, 1)
        values.set(name, 1, _to_layout(node, W, graph))


def _shift_bias(node: gs.Node, shift: np.ndarray, values: _Values, extra_bias: Dict[str, np.ndarray],
                outputs: set, graph: gs.Graph) -> None:
    """Add the refit's bias shift [out] to the consumer's bias, else to the constant bias Add
    that follows it (so onnxruntime still folds that Add into the layer), else give it a bias."""
    has_bias = len(node.inputs) > 2 and node.inputs[2].name
    follows = _bias_add(node, outputs, shift.size, graph) if node.op in ("Conv", "MatMul") and not has_bias \
        else None
    if node.op == "Conv" and has_bias:
        values.set(node.name, 2, values.get(node.name, 2) + shift)
    elif node.op == "Gemm" and has_bias:
        beta = float(node.attrs.get("beta", 1.0))
        values.set(node.name, 2, values.get(node.name, 2) + shift / beta)
    elif node.op == "Gemm":
        extra_bias[node.name] = extra_bias.get(node.name, 0.0) + shift / float(node.attrs.get("beta", 1.0))
    elif follows is not None:
        owner, index = follows
        current = values.get(owner.name, index)
        values.set(owner.name, index, current + shift.reshape(current.shape))
    else:
        extra_bias[node.name] = extra_bias.get(node.name, 0.0) + shift
