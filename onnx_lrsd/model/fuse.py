"""Lossless elementwise fusion: fewer kernels for the same function (`fuse_elementwise`).

Hard swish. Exporters write hswish(x) = x·min(max(x + 3, 0), 6) / 6 as four kernels — Add, Clip, Mul and a
division by 6 (Div, or Mul by 1/6), dividing either the product or the gate — or as
Mul(x, HardSigmoid(x; α = 1/6, β = ½)). onnxruntime runs each as its own pass over the tensor.
`fuse_hard_swish` writes HardSwish(x) (opset ≥ 14) or, below, Mul(x, HardSigmoid(x; 1/6, ½)):
the same function in one or two kernels. Only nodes whose intermediate tensors nothing else
reads are fused; new nodes are named `{mul}/lrsd/hswish` and `{mul}/lrsd/hsig`.

Constant affines. A per-channel constant scale or shift (Mul, Div, Add, Sub; exporters write
BatchNorm and learnable affine blocks so, and onnxruntime folds only a Mul or Add whose second
input is the constant and that directly follows the Conv) next to a Conv with constant weights
is folded into it: Conv(x)·s + t has weights W[o]·s[o] and bias b[o]·s[o] + t[o], Conv(x·s + t)
has W[o, i]·s[i] and bias b[o] + Σ_{i,k} W[o, i, k]·t[i] (a shift only into a conv that pads
nothing). `fold_affines` repeats until no such neighbour is left.
"""
from __future__ import annotations

from typing import List, Optional, Set, Tuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .graph import export_model, import_graph, model_template, resolve_constant
from .io import default_opset

HARD_SWISH_OPSET = 14
"""The first ai.onnx opset with a HardSwish op."""

FUSED_SUFFIX = "/lrsd/hswish"

Match = Tuple[gs.Tensor, List[gs.Node], gs.Variable]
"""(x, the nodes computing hswish(x) from x, the tensor holding hswish(x))."""


def _scalar(tensor: Optional[gs.Tensor]) -> Optional[float]:
    resolved = None if tensor is None else resolve_constant(tensor)
    if resolved is None or resolved.values.size != 1:
        return None
    return float(np.asarray(resolved.values).reshape(-1)[0])


def _close(value: Optional[float], expected: float) -> bool:
    return value is not None and abs(value - expected) <= 1e-6 * max(1.0, abs(expected))


def _other(node: gs.Node, tensor: gs.Tensor) -> Optional[gs.Tensor]:
    """The input of the binary `node` that is not `tensor` (None unless exactly one is)."""
    if len(node.inputs) != 2 or [t is tensor for t in node.inputs].count(True) != 1:
        return None
    return node.inputs[1] if node.inputs[0] is tensor else node.inputs[0]


def _producer(tensor: gs.Tensor, op: str) -> Optional[gs.Node]:
    return tensor.inputs[0] if len(tensor.inputs) == 1 and tensor.inputs[0].op == op else None


class _Readers:
    """Who reads a tensor of `graph`: a rewrite may remove a tensor only its one reader reads."""

    def __init__(self, graph: gs.Graph):
        self.outputs: Set[str] = {t.name for t in graph.outputs}

    def sole_reader(self, tensor: gs.Tensor) -> Optional[gs.Node]:
        """The one node reading `tensor`, if nothing else (no other node, no graph output) does."""
        if len(tensor.outputs) != 1 or tensor.name in self.outputs:
            return None
        return tensor.outputs[0]


class _HardSwishMatcher(_Readers):
    """Finds hard swishes in a graph; an intermediate tensor may have one reader only."""

    def divides_by_six(self, node: gs.Node, tensor: gs.Tensor) -> bool:
        """`node` computes tensor / 6 or tensor · (1/6)."""
        if node.op == "Div":
            return node.inputs[0] is tensor and _close(_scalar(node.inputs[1]), 6.0)
        return node.op == "Mul" and _close(_scalar(_other(node, tensor)), 1.0 / 6.0)

    def relu6_of_shift(self, clipped: gs.Tensor) -> Optional[Tuple[gs.Tensor, List[gs.Node]]]:
        """(x, [Add, Clip]) when `clipped` = min(max(x + 3, 0), 6)."""
        clip = _producer(clipped, "Clip")
        if clip is None:
            return None
        if "min" in clip.attrs or "max" in clip.attrs:  # opset < 11: bounds as attributes
            low, high = clip.attrs.get("min"), clip.attrs.get("max")
        else:
            low, high = (_scalar(t) if t is not None and t.name else None for t in (list(clip.inputs[1:3]) + [None, None])[:2])
        shifted = clip.inputs[0]
        add = _producer(shifted, "Add")
        if not (_close(low, 0.0) and _close(high, 6.0)) or add is None or self.sole_reader(shifted) is not clip:
            return None
        x = next((t for t in add.inputs if _close(_scalar(_other(add, t)), 3.0)), None)
        return None if x is None else (x, [add, clip])

    def gate(self, gate: gs.Tensor) -> Optional[Tuple[gs.Tensor, List[gs.Node]]]:
        """(x, nodes) when `gate` = relu6(x + 3) / 6 or HardSigmoid(x; 1/6, ½)."""
        sigmoid = _producer(gate, "HardSigmoid")
        if sigmoid is not None:
            alpha, beta = sigmoid.attrs.get("alpha", 0.2), sigmoid.attrs.get("beta", 0.5)
            return (sigmoid.inputs[0], [sigmoid]) if _close(alpha, 1 / 6) and _close(beta, 0.5) else None
        if len(gate.inputs) != 1:
            return None
        scale = gate.inputs[0]
        clipped = next((t for t in scale.inputs if _producer(t, "Clip") is not None), None)
        if clipped is None or not self.divides_by_six(scale, clipped) or self.sole_reader(clipped) is not scale:
            return None
        found = self.relu6_of_shift(clipped)
        return None if found is None else (found[0], found[1] + [scale])

    def at(self, mul: gs.Node) -> Optional[Match]:
        """The hard swish whose product is `mul`: x·gate(x), or x·relu6(x + 3) then / 6."""
        for factor in mul.inputs:
            x = _other(mul, factor)
            if x is None or self.sole_reader(factor) is not mul:
                continue
            gated = self.gate(factor)
            if gated is not None and gated[0] is x:
                return x, gated[1] + [mul], mul.outputs[0]
            found = self.relu6_of_shift(factor)
            if found is None or found[0] is not x:
                continue
            product = mul.outputs[0]
            scale = self.sole_reader(product)
            if scale is not None and self.divides_by_six(scale, product):
                return x, found[1] + [mul, scale], scale.outputs[0]
        return None


def fuse_hard_swish(graph: gs.Graph, opset: int) -> int:
    """Rewrite in place every hard swish written in elementwise ops (module docstring); the
    number fused. Graph inputs and outputs keep their names."""
    matcher = _HardSwishMatcher(graph)
    fused = 0
    for mul in [n for n in graph.nodes if n.op == "Mul"]:
        if not mul.outputs:  # already part of a fused match
            continue
        match = matcher.at(mul)
        if match is None:
            continue
        x, nodes, out = match
        if opset < HARD_SWISH_OPSET and [n.op for n in nodes] == ["HardSigmoid", "Mul"]:
            continue  # already the short form
        for node in nodes:
            node.outputs.clear()
            node.inputs.clear()
        if opset >= HARD_SWISH_OPSET:
            graph.nodes.append(gs.Node("HardSwish", mul.name + FUSED_SUFFIX, inputs=[x], outputs=[out]))
        else:
            gate = gs.Variable(f"{mul.name}/lrsd/hsig", dtype=out.dtype, shape=out.shape)
            graph.nodes.append(gs.Node("HardSigmoid", f"{mul.name}/lrsd/hsig", attrs={"alpha": 1.0 / 6.0, "beta": 0.5},
                                       inputs=[x], outputs=[gate]))
            graph.nodes.append(gs.Node("Mul", mul.name + FUSED_SUFFIX, inputs=[x, gate], outputs=[out]))
        fused += 1
    if fused:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return fused


# --------------------------------------------------------------------------- constant affines

AFFINE_OPS = ("Mul", "Div", "Add", "Sub")


def _per_channel(values: np.ndarray, rank: int, channels: int) -> Optional[np.ndarray]:
    """`values` as a [channels] vector when it broadcasts against an [N, channels, spatial...]
    tensor along the channel axis only (a scalar, [C, 1, 1], [1, C, 1, 1], ...); else None."""
    values = np.asarray(values, np.float64)
    if values.ndim > rank:
        return None
    shape = (1,) * (rank - values.ndim) + values.shape
    if shape[0] != 1 or any(d != 1 for d in shape[2:]) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(values.reshape(-1), (channels,)).copy()


def _affine(node: gs.Node, tensor: gs.Tensor, rank: int, channels: int) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """(scale, shift) per channel when `node` computes tensor·s + t with constant s or t
    (Mul, Div by, Add, Sub of a per-channel constant); else None."""
    if node.op not in AFFINE_OPS or len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    other = _other(node, tensor)
    if other is None or (node.op in ("Div", "Sub") and node.inputs[0] is not tensor):
        return None
    resolved = resolve_constant(other)
    if resolved is None or not np.issubdtype(np.asarray(resolved.values).dtype, np.floating):
        return None
    values = _per_channel(resolved.values, rank, channels)
    if values is None or (node.op == "Div" and np.any(values == 0)):
        return None
    ones, zeros = np.ones(channels), np.zeros(channels)
    return {"Mul": (values, zeros), "Div": (1.0 / values, zeros), "Add": (ones, values), "Sub": (ones, -values)}[node.op]


class _ConvFolder(_Readers):
    """Folds per-channel constant affines into the Convs they follow or feed."""

    def weights(self, conv: gs.Node) -> Optional[Tuple[np.ndarray, Optional[np.ndarray]]]:
        if conv.op != "Conv" or len(conv.inputs) < 2:
            return None
        weight = resolve_constant(conv.inputs[1])
        bias = resolve_constant(conv.inputs[2]) if len(conv.inputs) > 2 and conv.inputs[2].name else None
        if weight is None or (len(conv.inputs) > 2 and conv.inputs[2].name and bias is None):
            return None
        if not np.issubdtype(np.asarray(weight.values).dtype, np.floating):
            return None
        return np.asarray(weight.values), None if bias is None else np.asarray(bias.values)

    def _store(self, conv: gs.Node, index: int, values: np.ndarray, role: str) -> None:
        """`values` as `conv`'s input `index`: the old tensor's name when `conv` alone read it."""
        old = conv.inputs[index] if index < len(conv.inputs) and conv.inputs[index].name else None
        if old is not None and len(old.outputs) == 1 and old.name not in self.outputs:
            name = old.name
            old.name = f"{old.name}/before_fold"
        else:
            name = f"{conv.name}/{role}"
        constant = gs.Constant(name, values)
        while len(conv.inputs) <= index:
            conv.inputs.append(gs.Variable.empty())
        conv.inputs[index] = constant

    def fold_after(self, conv: gs.Node) -> bool:
        """y = Conv(x)·s + t  →  Conv with W[o]·s[o] and b[o]·s[o] + t[o]."""
        found = self.weights(conv)
        out = conv.outputs[0]
        reader = self.sole_reader(out)
        if found is None or reader is None:
            return False
        weight, bias = found
        affine = _affine(reader, out, weight.ndim, weight.shape[0])
        if affine is None:
            return False
        scale, shift = affine
        dtype = weight.dtype
        bias = np.zeros(weight.shape[0]) if bias is None else bias.astype(np.float64)
        self._store(conv, 1, (weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))).astype(dtype), "weight")
        self._store(conv, 2, (bias * scale + shift).astype(dtype), "bias")
        result = reader.outputs[0]
        reader.outputs.clear()
        reader.inputs.clear()
        conv.outputs[0] = result
        return True

    def fold_before(self, conv: gs.Node) -> bool:
        """Conv(x·s + t) → Conv with W[o, i]·s[i] and b[o] + Σ W[o, i, k]·t[i]; a shift only
        when the conv pads nothing (a padded border sees zeros, not t)."""
        found = self.weights(conv)
        x = conv.inputs[0]
        if found is None or len(x.inputs) != 1 or self.sole_reader(x) is not conv:
            return False
        weight, bias = found
        group = int(conv.attrs.get("group", 1))
        node = x.inputs[0]
        found = next(((t, affine) for t in node.inputs
                      for affine in [_affine(node, t, weight.ndim, weight.shape[1] * group)] if affine is not None), None)
        if found is None:
            return False
        source, (scale, shift) = found
        padded = any(int(p) for p in conv.attrs.get("pads", ())) or \
            conv.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID")
        if padded and np.any(shift):
            return False
        out_channels, per_group = weight.shape[0], weight.shape[1]
        # input channel of W[o, j]: (o // (O / group)) · per_group + j
        index = (np.arange(out_channels) // (out_channels // group))[:, None] * per_group + np.arange(per_group)
        spatial = (1,) * (weight.ndim - 2)
        folded = weight * scale[index].reshape(index.shape + spatial)
        added = (weight * shift[index].reshape(index.shape + spatial)).reshape(out_channels, -1).sum(axis=1)
        dtype = weight.dtype
        self._store(conv, 1, folded.astype(dtype), "weight")
        if np.any(shift) or bias is not None:
            self._store(conv, 2, ((np.zeros(out_channels) if bias is None else bias) + added).astype(dtype), "bias")
        conv.inputs[0] = source
        node.outputs.clear()
        node.inputs.clear()
        return True


def fold_affines(graph: gs.Graph) -> int:
    """Fold in place every per-channel constant scale / shift (Mul, Div, Add, Sub) next to a
    Conv with constant weights into that Conv, until none is left; the number folded."""
    folder = _ConvFolder(graph)
    folded = 0
    changed = True
    while changed:
        changed = False
        for conv in [n for n in graph.nodes if n.op == "Conv" and n.outputs]:
            while folder.fold_after(conv) or folder.fold_before(conv):
                folded += 1
                changed = True
    if folded:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return folded


def fuse_graph(graph: gs.Graph, opset: int) -> Tuple[int, int]:
    """Both rewrites in place: (hard swishes fused, affines folded)."""
    return fuse_hard_swish(graph, opset), fold_affines(graph)


def fuse_elementwise(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its hard swishes fused and constant affines folded into its Convs;
    `model` itself when there is nothing to fuse."""
    graph = import_graph(model)
    return export_model(graph, model_template(model)) if any(fuse_graph(graph, default_opset(model))) else model
