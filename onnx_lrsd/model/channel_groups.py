"""Coupled channel groups: the layers that must lose the same channels together, from the graph alone.

A group is one *channel space*: tensors whose channel axis (1 after a Conv, the last axis after a
MatMul / Gemm) indexes the same C channels. It starts at a producer (Conv with group 1, MatMul
with a constant right operand, Gemm; constant weight) and grows through ops that act on each
channel alone:

- elementwise unary ops (Relu, Clip, Sigmoid, HardSigmoid, HardSwish, Erf, Tanh, …);
- elementwise binary ops (Add, Sub, Mul, Div, …) with a constant that is scalar or per-channel
  (then sliced), or with another tensor, which joins the space: its producer joins as well, so
  Sigmoid·Mul / HardSwish / Erf-GELU patterns and squeeze-excitation gates (whose last conv
  becomes a second producer) stay in one group;
- BatchNormalization, depthwise Conv (group = C, one filter per channel), pooling over space
  and Resize / Upsample of the spatial dims (channel-first spaces only);
- a flatten of globally pooled channels ([N, C, 1, 1] → [N, C] by Flatten, or by Reshape to
  [N, C] / [N, -1] / [-1, C] whose shape is constant or built from Shape → batch entry and constants):
  the space continues channel-last, the C in the shape constant is rewritten.

Per-channel constants may be reshaped or unsqueezed from a [C] vector (a SE bias stored as
Reshape(b, [1, C, 1, 1])): the vector is sliced and the C in the shape rewritten.

Residual Adds: an Add (Sum, Sub, Max, …) of two computed tensors joins both operands' channels,
so the producers of every branch of an Add chain, the readers of every tensor of the chain and
the channel-wise ops between form ONE group, listed in `residual_adds`. If any branch cannot be
narrowed, the whole chain is blocked and the reason names the residual Add whose branch
blocked it.

It ends at consumers: Conv / MatMul / Gemm that read the channels through a constant weight
(input channels sliced, weight refitted). A Concat on the channel axis (1 channel-first, the
last channel-last; negative axes too) puts the channels at an offset beside other channels:
the readers of its output through a weight (past param-free unary ops) are consumers that read
the group's channels at that offset (`ChannelGroup.offsets`), while the Concat's other parts
keep their own groups. Anything else reading the concatenated tensor (a graph output, a
Reshape, a per-channel op) blocks.

Anything else that touches the space blocks the group, with the reason: a graph input or
output, Reshape / Transpose / LayerNorm / Softmax, a Concat along another axis or reached from
its output, a residual Add with a tensor produced by an op outside these rules, a constant
that broadcasts against the channels in another way. A Shape that reads the channels is allowed
when only the batch entry of its result is used.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx_graphsurgeon as gs

from .graph import resolve_constant
from .layers import LayerTarget, NotATarget, conv_target, gemm_target, matmul_target

__all__ = ["ChannelParam", "ShapeEdit", "ChannelGroup", "BlockedGroup", "find_channel_groups", "find_head_groups",
           "vector_view", "weight_target"]

UNARY = {"Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf",
         "Gelu", "Softplus", "Softsign", "Mish", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Identity",
         "Clip", "Dropout", "Floor", "Ceil", "Round", "Sin", "Cos", "ThresholdedRelu", "Shrink"}
BINARY = {"PRelu", "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean"}
POOLS = {"GlobalAveragePool", "GlobalMaxPool", "AveragePool", "MaxPool", "LpPool", "GlobalLpPool"}
GLOBAL_POOLS = {"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
RESIDUAL = {"Add", "Sub", "Sum", "Mean", "Max", "Min"}
_VECTOR_VIEWS = {"Reshape", "Unsqueeze"}


@dataclass(frozen=True)
class ChannelParam:
    """Input `index` of node `node` is a constant to slice along `axis` (per-channel values;
    `block` consecutive entries per channel, e.g. one attention head's columns)."""

    node: str
    index: int
    axis: int
    block: int = 1


@dataclass(frozen=True)
class ShapeEdit:
    """Entry `position` of the constant shape at input `index` of `node` becomes
    width · `per_channel` (a Reshape's head count, or heads × head size)."""

    node: str
    index: int
    position: int
    per_channel: int


@dataclass(frozen=True)
class ChannelGroup:
    """C channels that producers write and consumers read; `params` are the per-channel
    constants between them, `depthwise` the depthwise convs whose `group` is C. A channel is
    `block` consecutive features of the consumers' input (attention heads: the head size);
    `shapes` are Reshape constants that count channels."""

    name: str
    channels: int
    channel_first: bool
    producers: Tuple[str, ...]
    consumers: Tuple[str, ...]
    params: Tuple[ChannelParam, ...]
    depthwise: Tuple[str, ...]
    tensors: Tuple[str, ...]
    block: int = 1
    shapes: Tuple[ShapeEdit, ...] = ()
    residual_adds: Tuple[str, ...] = ()
    offsets: Tuple[Tuple[str, int, int], ...] = ()
    concats: Tuple[str, ...] = ()

    def read_at(self, consumer: str) -> Tuple[int, int]:
        """(offset, input channels) of `consumer`: it reads the group's channels as its input
        channels offset … offset + channels (a Concat put others beside them; `offsets` lists
        those consumers as (name, offset, input channels)), else (0, channels)."""
        for name, offset, width in self.offsets:
            if name == consumer:
                return offset, width
        return 0, self.channels


@dataclass(frozen=True)
class BlockedGroup:
    """A channel space that cannot be narrowed, and why."""

    name: str
    channels: Optional[int]
    producers: Tuple[str, ...]
    reason: str


def weight_target(node: gs.Node, graph: gs.Graph) -> Optional[LayerTarget]:
    """The node as a dense layer y = x @ W with a constant weight, or None."""
    try:
        if node.op == "Conv" and int(node.attrs.get("group", 1)) == 1:
            return conv_target(node, graph)
        if node.op == "MatMul":
            target = matmul_target(node, graph)
            return target if target.weight_side == "right" else None
        if node.op == "Gemm":
            target = gemm_target(node, graph)
            return None if target.gemm.trans_a else target
    except NotATarget:
        return None
    return None


def vector_view(node: gs.Node) -> Optional[np.ndarray]:
    """Output of `node` if it reshapes or unsqueezes a constant vector (1-D) by constants."""
    if node.op not in _VECTOR_VIEWS or not node.inputs:
        return None
    source = resolve_constant(node.inputs[0])
    if source is None or source.values.ndim != 1:
        return None
    vector = np.asarray(source.values)
    if node.op == "Reshape":
        shape = resolve_constant(node.inputs[1]) if len(node.inputs) > 1 else None
        if shape is None:
            return None
        dims = [int(d) for d in np.asarray(shape.values).reshape(-1)]
        if 0 in dims:
            return None
        try:
            return vector.reshape(dims)
        except ValueError:
            return None
    axes = node.attrs.get("axes") if len(node.inputs) < 2 else None
    if axes is None and len(node.inputs) > 1:
        resolved = resolve_constant(node.inputs[1])
        axes = None if resolved is None else [int(a) for a in np.asarray(resolved.values).reshape(-1)]
    if axes is None:
        return None
    rank = 1 + len(axes)
    out = vector
    for axis in sorted(a % rank for a in axes):
        out = np.expand_dims(out, axis)
    return out


class _Blocked(Exception):
    """A channel space cannot be narrowed; the message says why."""


@dataclass
class _Space:
    channels: int
    channel_first: bool
    rank: Optional[int]
    tensors: Dict[str, gs.Tensor] = field(default_factory=dict)
    producers: Dict[str, gs.Node] = field(default_factory=dict)
    consumers: Dict[str, gs.Node] = field(default_factory=dict)
    params: List[ChannelParam] = field(default_factory=list)
    depthwise: Dict[str, gs.Node] = field(default_factory=dict)
    visited: set = field(default_factory=set)
    flat: set = field(default_factory=set)  # tensors [N, C] after a flatten (channel-last)
    shapes: List[ShapeEdit] = field(default_factory=list)
    residual: Dict[str, None] = field(default_factory=dict)
    branch: Dict[str, str] = field(default_factory=dict)  # tensor → the residual Add whose operand it feeds
    offsets: Dict[str, Tuple[int, int]] = field(default_factory=dict)  # consumer → (offset, its input channels)
    concats: Dict[str, gs.Node] = field(default_factory=dict)  # channel Concats the space enters at an offset
    reason: Optional[str] = None  # why the space cannot be narrowed (the first block met)


def _out_channels(target: LayerTarget) -> int:
    return target.out_channels if target.conv is not None else target.out_features


def _in_channels(target: LayerTarget) -> int:
    return target.in_channels if target.conv is not None else target.in_features


class _Finder:
    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.outputs = {t.name for t in graph.outputs}
        self.inputs = {t.name for t in graph.inputs}
        self.targets: Dict[str, Optional[LayerTarget]] = {}
        self.space: Optional[_Space] = None
        self.opset = 17

    def target(self, node: gs.Node) -> Optional[LayerTarget]:
        if node.name not in self.targets:
            self.targets[node.name] = weight_target(node, self.graph)
        return self.targets[node.name]

    def constant(self, tensor: gs.Tensor) -> Optional[np.ndarray]:
        """The value of a constant tensor (`resolve_constant`), or of a Reshape / Unsqueeze
        of a constant vector by constant shape / axes; else None."""
        if isinstance(tensor, gs.Constant) or tensor.inputs:
            resolved = resolve_constant(tensor)
            if resolved is not None:
                return resolved.values
            return vector_view(tensor.inputs[0]) if tensor.inputs else None
        return None

    def grow(self, start: gs.Node) -> _Space:
        target = self.target(start)
        space = self.space = _Space(channels=_out_channels(target), channel_first=target.conv is not None,
                                    rank=(2 + len(target.conv.kernel_shape)) if target.conv is not None else None)
        space.producers[start.name] = start
        space.visited.add(start.name)
        queue = deque([start.outputs[0]])
        while queue:  # past a block the search goes on, so that one blocked space lists all its producers
            tensor = queue.popleft()
            if tensor.name in space.tensors:
                continue
            space.tensors[tensor.name] = tensor
            try:
                if tensor.name in self.outputs:
                    raise _Blocked(f"'{tensor.name}' is a graph output")
                if tensor.name in self.inputs or not tensor.inputs:
                    raise _Blocked(f"graph input '{tensor.name}' enters the channels")
                for node in [tensor.inputs[0]] + list(tensor.outputs):
                    if node.name not in space.visited:
                        space.visited.add(node.name)
                        try:
                            queue.extend(self.visit(node, tensor, space))
                        except _Blocked as reason:
                            self.block(space, tensor, reason)
            except _Blocked as reason:
                self.block(space, tensor, reason)
        for concat in space.concats.values():
            if sum(t.name in space.tensors for t in concat.inputs) > 1:
                self.block(space, concat.inputs[0], _Blocked(f"Concat '{concat.name}' joins the channels with "
                                                             "themselves"))
        if space.reason is not None:
            raise _Blocked(space.reason)
        if not space.consumers:
            raise _Blocked("no layer reads the channels through a weight")
        return space

    @staticmethod
    def block(space: _Space, tensor: gs.Tensor, reason: _Blocked) -> None:
        """Keep the first reason the space cannot be narrowed (naming the residual Add whose
        branch `tensor` is on)."""
        if space.reason is None:
            add = space.branch.get(tensor.name)
            space.reason = str(reason) if add is None else f"residual Add '{add}' joins a branch where {reason}"

    def visit(self, node: gs.Node, via: gs.Tensor, space: _Space) -> List[gs.Tensor]:
        """Record `node`, reached through `via`; return the tensors that join the space (those
        on a branch of a residual Add are marked in `space.branch`, flattened ones in `space.flat`)."""
        joined = self.joined(node, via, space)
        flat = via.name in space.flat
        backward = via in node.outputs
        for tensor in joined:
            if flat and node.op not in ("Reshape", "Flatten"):
                space.flat.add(tensor.name)
            if backward and via.name in space.branch and tensor in node.inputs:
                space.branch.setdefault(tensor.name, space.branch[via.name])
        return joined

    def joined(self, node: gs.Node, via: gs.Tensor, space: _Space) -> List[gs.Tensor]:
        produced = via in node.outputs
        first = space.channel_first and via.name not in space.flat  # channel axis 1 (else the last axis)
        if node.op in ("Conv", "MatMul", "Gemm") and int(node.attrs.get("group", 1)) == 1:
            target = self.target(node)
            if target is None:
                raise _Blocked(f"{node.op} '{node.name}' touches the channels without a constant weight")
            if produced:
                if (target.conv is not None) != first or _out_channels(target) != space.channels:
                    raise _Blocked(f"producer '{node.name}' does not match the channel layout")
                space.producers[node.name] = node
                return []
            if node.inputs[0] is not via or _in_channels(target) != space.channels or \
                    (target.conv is not None) != first:
                raise _Blocked(f"{node.op} '{node.name}' reads the channels in another layout")
            space.consumers[node.name] = node
            return []
        if node.op == "Conv":
            return self.depthwise(node, space, first)
        if node.op == "BatchNormalization":
            if len([t for t in node.outputs if t.name]) != 1:
                raise _Blocked(f"BatchNormalization '{node.name}' in training mode")
            space.params.extend(ChannelParam(node.name, i, 0) for i in range(1, 5))
            return [node.inputs[0], node.outputs[0]]
        if node.op in POOLS:
            if not first:
                raise _Blocked(f"{node.op} '{node.name}' pools over the channel axis")
            return [node.inputs[0], node.outputs[0]]
        if node.op in ("Resize", "Upsample"):
            if not first:
                raise _Blocked(f"{node.op} '{node.name}' on channel-last channels")
            self.spatial_resize(node, space)
            return [node.inputs[0], node.outputs[0]]
        if node.op == "Shape" and not produced:
            if not self.batch_only(node.outputs[0]):
                raise _Blocked(f"Shape '{node.name}' reads the channels (not only the batch size)")
            return []
        if node.op in ("Reshape", "Flatten"):
            return self.flatten(node, via, space)
        if node.op == "Concat":
            return self.concat(node, via, space, produced, first)
        if node.op in UNARY:
            for index, extra in enumerate(node.inputs[1:], 1):
                if extra.name:
                    self.per_channel(node, index, extra, space, first, scalar_only=True)
            return [node.inputs[0], node.outputs[0]]
        if node.op in BINARY:
            joined = [node.outputs[0]]
            for index, tensor in enumerate(node.inputs):
                if tensor is not via and self.constant(tensor) is not None:
                    self.per_channel(node, index, tensor, space, first)
                else:
                    joined.append(tensor)
            computed = [t for t in node.inputs if t in joined]
            if node.op in RESIDUAL and len(computed) > 1:
                space.residual[node.name] = None
                for tensor in computed:
                    if tensor is not via:
                        space.branch.setdefault(tensor.name, (space.branch.get(via.name) if produced else None)
                                                or node.name)
            return joined
        raise _Blocked(f"{node.op} '{node.name}' {'writes' if produced else 'reads'} the channels")

    # ------------------------------------------------------------------ channel Concat
    def concat(self, node: gs.Node, via: gs.Tensor, space: _Space, produced: bool, first: bool) -> List[gs.Tensor]:
        """`via` is part of a Concat on the channel axis: the channels sit at an offset (the
        parts before them) of its output. Its readers through a weight become consumers at that
        offset (`concat_readers`); the other parts are not joined. Nothing joins the space."""
        if produced:
            raise _Blocked(f"Concat '{node.name}' writes the channels (its parts are other channels)")
        rank = space.rank if first else (len(via.shape) if via.shape is not None else None)
        axis = int(node.attrs.get("axis", 1))
        channel_axis = 1 if first else (rank - 1 if rank is not None else -1)
        if rank is not None:
            axis %= rank
        if axis != channel_axis:
            raise _Blocked(f"Concat '{node.name}' joins along axis {node.attrs.get('axis', 1)}, not the channel axis")
        if sum(t is via for t in node.inputs) > 1:
            raise _Blocked(f"Concat '{node.name}' joins the channels with themselves")
        sizes = []
        for part in node.inputs:
            size = space.channels if part is via else self.part_channels(part, channel_axis, rank)
            if size is None:
                raise _Blocked(f"Concat '{node.name}' has a part '{part.name}' of unknown channel count")
            sizes.append(int(size))
        at = next(i for i, t in enumerate(node.inputs) if t is via)
        space.concats[node.name] = node
        self.concat_readers(node, sum(sizes[:at]), sum(sizes), space, first)
        return []

    def part_channels(self, tensor: gs.Tensor, axis: int, rank: Optional[int], depth: int = 0) -> Optional[int]:
        """The channel count of a Concat part: its recorded shape, else that of the layer
        writing it (a Conv's or MatMul's constant weight) through channel-wise ops."""
        shape = tensor.shape
        if shape is not None and len(shape) == (rank or len(shape)) and isinstance(shape[axis], (int, np.integer)) \
                and shape[axis] >= 0:
            return int(shape[axis])
        node = tensor.inputs[0] if tensor.inputs else None
        if node is None or depth > 64:
            return None
        if node.op in ("Conv", "MatMul"):
            weight = resolve_constant(node.inputs[1]) if len(node.inputs) > 1 else None
            if weight is None or weight.values.ndim < 2:
                return None
            return int(weight.values.shape[0] if node.op == "Conv" else weight.values.shape[-1])
        if node.op in UNARY | BINARY | POOLS | {"BatchNormalization", "Resize", "Upsample"}:
            for source in node.inputs:
                if source.name and self.constant(source) is None:
                    found = self.part_channels(source, axis, rank, depth + 1)
                    if found is not None:
                        return found
        return None

    def concat_readers(self, concat: gs.Node, offset: int, total: int, space: _Space, first: bool) -> None:
        """Record the readers of a channel Concat's output (past param-free unary ops) as
        consumers reading the channels at `offset` of their `total` input channels."""
        pending = deque([concat.outputs[0]])
        while pending:
            tensor = pending.popleft()
            if tensor.name in self.outputs:
                raise _Blocked(f"the output '{tensor.name}' of Concat '{concat.name}' is a graph output")
            for reader in tensor.outputs:
                if reader.op in UNARY and reader.inputs[0] is tensor and \
                        all(not extra.name or self.scalar(extra) for extra in reader.inputs[1:]):
                    pending.append(reader.outputs[0])
                    continue
                target = self.target(reader) if reader.op in ("Conv", "MatMul", "Gemm") else None
                if target is None or reader.inputs[0] is not tensor or _in_channels(target) != total or \
                        (target.conv is not None) != first:
                    raise _Blocked(f"{reader.op} '{reader.name}' reads the output of Concat '{concat.name}' "
                                   "not through a weight")
                if space.offsets.get(reader.name, (offset, total)) != (offset, total):
                    raise _Blocked(f"'{reader.name}' reads the channels at two offsets")
                space.consumers[reader.name] = reader
                space.offsets[reader.name] = (offset, total)

    def scalar(self, tensor: gs.Tensor) -> bool:
        values = self.constant(tensor)
        return values is not None and values.size == 1

    def per_channel(self, node: gs.Node, index: int, tensor: gs.Tensor, space: _Space, first: bool,
                    scalar_only: bool = False) -> bool:
        """Record a constant operand: scalar-like (nothing to do) or per-channel (sliced; a
        [C] vector seen through Reshape / Unsqueeze is sliced at its source)."""
        values = self.constant(tensor)
        if values is None:
            raise _Blocked(f"{node.op} '{node.name}' mixes in '{tensor.name}', computed at run time")
        if values.size == 1:
            return False
        if scalar_only:
            raise _Blocked(f"{node.op} '{node.name}' has a non-scalar parameter")
        rank = space.rank if first else values.ndim
        if first and rank is None or values.ndim > (rank or values.ndim):
            raise _Blocked(f"constant '{tensor.name}' of {node.op} '{node.name}' broadcasts beyond the tensor")
        axis = values.ndim - (rank - 1) if first else values.ndim - 1
        if axis < 0 or values.shape[axis] == 1:
            return False
        if values.shape[axis] != space.channels:
            raise _Blocked(f"constant '{tensor.name}' of {node.op} '{node.name}' has {values.shape[axis]} "
                           f"entries on the channel axis, not {space.channels}")
        view = tensor.inputs[0] if tensor.inputs and resolve_constant(tensor) is None else None
        if view is None:
            space.params.append(ChannelParam(node.name, index, axis))
            return True
        # a [C] vector reshaped / unsqueezed into place: slice the vector, rewrite a C in the shape
        if values.size != space.channels:
            raise _Blocked(f"constant '{tensor.name}' of {node.op} '{node.name}' is not one value per channel")
        if len(tensor.outputs) != 1:
            raise _Blocked(f"{view.op} '{view.name}' of a per-channel constant has other readers")
        space.params.append(ChannelParam(view.name, 0, 0))
        if view.op == "Reshape":
            shape = np.asarray(self.constant(view.inputs[1])).reshape(-1)
            if shape[axis] == space.channels:
                space.shapes.append(ShapeEdit(view.name, 1, axis, 1))
        return True

    def depthwise(self, node: gs.Node, space: _Space, first: bool) -> List[gs.Tensor]:
        group = int(node.attrs.get("group", 1))
        resolved = resolve_constant(node.inputs[1]) if len(node.inputs) > 1 else None
        weight = None if resolved is None else resolved.values
        if weight is None or group != space.channels or weight.shape[0] != space.channels or weight.shape[1] != 1:
            raise _Blocked(f"grouped Conv '{node.name}' (group {group}) is not depthwise over the channels")
        if not first:
            raise _Blocked(f"depthwise Conv '{node.name}' on channel-last channels")
        space.depthwise[node.name] = node
        space.params.append(ChannelParam(node.name, 1, 0))
        if len(node.inputs) > 2 and node.inputs[2].name:
            if resolve_constant(node.inputs[2]) is None:
                raise _Blocked(f"depthwise Conv '{node.name}' adds a bias computed at run time")
            space.params.append(ChannelParam(node.name, 2, 0))
        return [node.inputs[0], node.outputs[0]]

    def spatial_resize(self, node: gs.Node, space: _Space) -> None:
        """Accept a Resize / Upsample that scales the spatial dims only (constant scales with 1
        for batch and channels, or constant sizes whose channel entry is rewritten)."""
        named = [t if t.name else None for t in node.inputs]
        if node.op == "Upsample":
            scales = np.asarray(node.attrs["scales"]) if "scales" in node.attrs else \
                (self.constant(named[1]) if len(named) > 1 and named[1] is not None else None)
            sizes = None
        else:
            scales_at = 1 if len(named) == 2 else 2
            scales = self.constant(named[scales_at]) if len(named) > scales_at and named[scales_at] is not None \
                else None
            sizes = named[3] if len(named) > 3 else None
            if scales is None and len(named) > scales_at and named[scales_at] is not None:
                raise _Blocked(f"{node.op} '{node.name}' has scales computed at run time")
        if scales is not None and scales.size:
            if scales.size < 2 or np.any(np.asarray(scales).reshape(-1)[:2] != 1):
                raise _Blocked(f"{node.op} '{node.name}' scales the channels")
            return
        values = self.constant(sizes) if sizes is not None else None
        if values is None or values.size < 2 or int(values.reshape(-1)[1]) != space.channels:
            raise _Blocked(f"{node.op} '{node.name}' has no constant scales or sizes")
        space.shapes.append(ShapeEdit(node.name, 3, 1, 1))

    # ------------------------------------------------------------------ flatten after a global pool
    def flatten(self, node: gs.Node, via: gs.Tensor, space: _Space) -> List[gs.Tensor]:
        """[N, C, 1, 1] → [N, C]: Flatten(axis 1), or Reshape to [N, C] / [N, -1] / [-1, C] with
        N a constant, 0 or the batch entry of a Shape. The output continues the space channel-last."""
        if via is not node.inputs[0] or via.name in space.flat or not space.channel_first:
            raise _Blocked(f"{node.op} '{node.name}' {'writes' if via is not node.inputs[0] else 'reads'} "
                           "the channels")
        if not self.pooled(via):
            raise _Blocked(f"{node.op} '{node.name}' flattens channels with a spatial extent")
        if node.op == "Flatten":
            if int(node.attrs.get("axis", 1)) != 1:
                raise _Blocked(f"Flatten '{node.name}' not at axis 1")
        else:
            entries = self.shape_entries(node, 1)
            if entries is None or len(entries) != 2 or entries[0][0] == entries[1][0] == -1:
                raise _Blocked(f"Reshape '{node.name}' is not a flatten to [N, C]")
            value, where = entries[1]
            if value == space.channels and where is not None:
                space.shapes.append(ShapeEdit(where[0], where[1], where[2], 1))
            elif value != -1:
                raise _Blocked(f"Reshape '{node.name}' is not a flatten to [N, C]")
        space.flat.add(node.outputs[0].name)
        return [node.outputs[0]]

    def pooled(self, tensor: gs.Tensor) -> bool:
        """The tensor's spatial dims are 1: recorded so, or it comes from a global pool
        through channel-wise unary ops."""
        shape = tensor.shape
        if shape is not None and len(shape) > 2 and all(isinstance(d, (int, np.integer)) and d == 1
                                                         for d in shape[2:]):
            return True
        while tensor.inputs:
            node = tensor.inputs[0]
            if node.op in GLOBAL_POOLS:
                return True
            if node.op not in UNARY or not node.inputs:
                return False
            tensor = node.inputs[0]
        return False

    def shape_entries(self, node: gs.Node, index: int) -> Optional[List[Tuple[int, Optional[tuple]]]]:
        """The entries of the shape at input `index` of `node`: (value, (node, input, position)
        of the constant holding it), value -2 for the batch entry of a Shape; None if unknown."""
        tensor = node.inputs[index]
        values = self.constant(tensor)
        if values is not None:
            return [(int(v), (node.name, index, i)) for i, v in enumerate(np.asarray(values).reshape(-1))]
        if self.batch_entry(tensor):
            return [(-2, None)]
        producer = tensor.inputs[0] if tensor.inputs else None
        if producer is not None and producer.op == "Concat" and int(producer.attrs.get("axis", 0)) in (0, -1):
            entries = []
            for i in range(len(producer.inputs)):
                part = self.shape_entries(producer, i)
                if part is None:
                    return None
                entries += part
            return entries
        return None

    def batch_entry(self, tensor: gs.Tensor) -> bool:
        """`tensor` is [N] (or N): entry 0 of a Shape, through Cast / Unsqueeze / Identity."""
        while tensor.inputs and tensor.inputs[0].op in ("Cast", "Unsqueeze", "Identity"):
            tensor = tensor.inputs[0].inputs[0]
        node = tensor.inputs[0] if tensor.inputs else None
        if node is None or not self.takes_batch(node):
            return False
        source = node.inputs[0]
        while source.inputs and source.inputs[0].op in ("Cast", "Identity"):
            source = source.inputs[0].inputs[0]
        return bool(source.inputs) and source.inputs[0].op == "Shape" and \
            int(source.inputs[0].attrs.get("start", 0)) == 0

    def takes_batch(self, node: gs.Node) -> bool:
        """A Slice [0:1] on axis 0 or a Gather of index 0 (of a shape)."""
        if node.op == "Gather" and len(node.inputs) == 2:
            index = self.constant(node.inputs[1])
            return index is not None and index.size == 1 and int(index.reshape(-1)[0]) == 0
        if node.op == "Slice" and len(node.inputs) >= 3:
            bounds = [self.constant(t) if t.name else None for t in node.inputs[1:]]
            if any(b is None for b in bounds[:2]) or any(b is not None and b.size != 1 for b in bounds):
                return False
            starts, ends = int(bounds[0].reshape(-1)[0]), int(bounds[1].reshape(-1)[0])
            axes = int(bounds[2].reshape(-1)[0]) if len(bounds) > 2 and bounds[2] is not None else 0
            steps = int(bounds[3].reshape(-1)[0]) if len(bounds) > 3 and bounds[3] is not None else 1
            return starts == 0 and ends == 1 and axes == 0 and steps == 1
        if node.op == "Slice":  # opset < 10: starts / ends attributes
            return list(node.attrs.get("starts", [])) == [0] and list(node.attrs.get("ends", [])) == [1] and \
                list(node.attrs.get("axes", [0])) == [0]
        return False

    def batch_only(self, shape: gs.Tensor) -> bool:
        """Every use of a Shape's result (through Cast / Identity) takes its batch entry only."""
        readers = list(shape.outputs)
        if shape.name in self.outputs or not readers:
            return False
        for reader in readers:
            if reader.op in ("Cast", "Identity"):
                if not self.batch_only(reader.outputs[0]):
                    return False
            elif not (self.takes_batch(reader) and reader.inputs[0] is shape):
                return False
        return True


def _producer_params(space: _Space, finder: _Finder) -> List[ChannelParam]:
    """Output-channel slices of the producers' weights and biases (Conv [Cout, ...], MatMul
    [in, out], Gemm B and C)."""
    params = []
    for name, node in space.producers.items():
        target = finder.target(node)
        if node.op == "Conv":
            params.append(ChannelParam(name, 1, 0))
            if len(node.inputs) > 2 and node.inputs[2].name:
                params.append(ChannelParam(name, 2, 0))
        elif node.op == "MatMul":
            params.append(ChannelParam(name, 1, 1))
        else:
            params.append(ChannelParam(name, 1, 0 if target.gemm.trans_b else 1))
            if len(node.inputs) > 2 and node.inputs[2].name:
                resolved = resolve_constant(node.inputs[2])
                c = None if resolved is None else resolved.values
                if c is None:
                    raise _Blocked(f"Gemm '{name}' adds a bias computed at run time")
                if c.size > 1:
                    if c.shape[-1] != space.channels or c.size != space.channels:
                        raise _Blocked(f"Gemm '{name}' has a bias of shape {c.shape}")
                    params.append(ChannelParam(name, 2, c.ndim - 1))
    return params


def find_channel_groups(graph: gs.Graph) -> Tuple[List[ChannelGroup], List[BlockedGroup]]:
    """Every channel space that starts at a producer with a constant weight: the ones that can
    be narrowed, and the blocked ones with the reason."""
    finder = _Finder(graph)
    groups, blocked, seen = [], [], set()
    for node in graph.nodes:
        if node.name in seen or node.op not in ("Conv", "MatMul", "Gemm") or finder.target(node) is None:
            continue
        try:
            space = finder.grow(node)
            params = _producer_params(space, finder) + space.params
            for name in set(space.producers) & set(space.consumers):
                raise _Blocked(f"'{name}' both writes and reads the channels")
        except _Blocked as reason:
            producers = tuple(finder.space.producers)
            seen.update(producers)
            blocked.append(BlockedGroup(node.name, _out_channels(finder.target(node)), producers, str(reason)))
            continue
        seen.update(space.producers)
        groups.append(ChannelGroup(
            name=node.name, channels=space.channels, channel_first=space.channel_first,
            producers=tuple(space.producers), consumers=tuple(space.consumers), params=tuple(params),
            depthwise=tuple(space.depthwise), tensors=tuple(space.tensors), shapes=tuple(space.shapes),
            residual_adds=tuple(space.residual),
            offsets=tuple((name, offset, width) for name, (offset, width) in space.offsets.items()),
            concats=tuple(space.concats)))
    return groups, blocked


_HEAD_PASS = {"Transpose", "Softmax", "MatMul", "Mul", "Div", "Add", "Sub", "Cast", "Identity", "Dropout"}


class _Heads:
    """Attention heads: Q / K / V producers whose outputs (after a constant bias Add) are
    reshaped by a constant shape [..., H, d] into heads, and the output projection that reads
    them back through a constant Reshape [..., H·d]. Between the two, the head axis is
    tracked through Transpose, batched MatMul, Softmax (not over heads) and elementwise ops
    whose other operand is constant and scalar or a tensor with one entry on the head axis."""

    def __init__(self, finder: _Finder):
        self.finder = finder
        self.axis: Dict[str, int] = {}
        self.tensors: Dict[str, gs.Tensor] = {}
        self.splits: Dict[str, gs.Node] = {}
        self.merges: Dict[str, gs.Node] = {}
        self.heads = self.size = None
        self.visited: set = set()

    def shape_constant(self, node: gs.Node) -> Optional[np.ndarray]:
        if node.op != "Reshape" or len(node.inputs) < 2:
            return None
        values = self.finder.constant(node.inputs[1])
        return None if values is None else np.asarray(values).reshape(-1)

    def add(self, tensor: gs.Tensor, axis: int, queue: deque) -> None:
        known = self.axis.get(tensor.name)
        if known is not None and known != axis:
            raise _Blocked(f"'{tensor.name}' holds the heads on two axes")
        if known is None:
            if tensor.name in self.finder.outputs:
                raise _Blocked(f"'{tensor.name}' is a graph output")
            self.axis[tensor.name] = axis
            self.tensors[tensor.name] = tensor
            queue.append(tensor)

    def split(self, node: gs.Node) -> None:
        shape = self.shape_constant(node)
        if shape is None or len(shape) < 3 or shape[-1] <= 0 or shape[-2] <= 0:
            raise _Blocked(f"Reshape '{node.name}' into heads has no constant shape")
        heads, size = int(shape[-2]), int(shape[-1])
        if self.heads is None:
            self.heads, self.size = heads, size
        if (heads, size) != (self.heads, self.size):
            raise _Blocked(f"Reshape '{node.name}' splits into other heads")
        self.splits[node.name] = node

    def grow(self, start: gs.Node) -> None:
        self.split(start)
        queue: deque = deque()
        self.add(start.outputs[0], len(self.shape_constant(start)) - 2, queue)
        while queue:
            tensor = queue.popleft()
            producer = tensor.inputs[0] if tensor.inputs else None
            if producer is not None and producer.name not in self.splits and producer.name not in self.visited:
                self.visited.add(producer.name)
                self.visit(producer, queue, backward=True)
            for node in tensor.outputs:
                if node.name not in self.visited and node.name not in self.splits:
                    self.visited.add(node.name)
                    self.visit(node, queue, backward=False)

    def visit(self, node: gs.Node, queue: deque, backward: bool) -> None:
        if node.op == "Reshape" and backward:
            self.split(node)
            return
        if node.op == "Reshape":
            shape = self.shape_constant(node)
            data = node.inputs[0]
            if shape is None or self.axis[data.name] != len(shape) - 1 or shape[-1] != self.heads * self.size:
                raise _Blocked(f"Reshape '{node.name}' does not merge the heads back")
            self.merges[node.name] = node
            return
        if node.op not in _HEAD_PASS:
            raise _Blocked(f"{node.op} '{node.name}' touches the heads")
        inside = [t for t in node.inputs if t.name in self.axis]
        if node.op == "Transpose":
            perm = list(node.attrs.get("perm", []))
            if not perm:
                raise _Blocked(f"Transpose '{node.name}' without perm")
            if node.inputs[0].name in self.axis:
                self.add(node.outputs[0], perm.index(self.axis[node.inputs[0].name]), queue)
            else:
                self.add(node.inputs[0], perm[self.axis[node.outputs[0].name]], queue)
            return
        axis = self.axis[inside[0].name] if inside else self.axis[node.outputs[0].name]
        if node.op == "Softmax":
            rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
            softmax_axis = int(node.attrs.get("axis", -1 if self.finder.opset >= 13 else 1))
            if rank is None or softmax_axis % rank == axis or (self.finder.opset < 13 and softmax_axis % rank <= axis):
                raise _Blocked(f"Softmax '{node.name}' mixes the heads")
        for tensor in node.inputs[:2] if node.op == "MatMul" else node.inputs:
            if tensor.name in self.axis:
                continue
            if node.op == "MatMul":
                self.add(tensor, axis, queue)
                continue
            values = self.finder.constant(tensor)
            shape = tensor.shape if values is None else values.shape
            rank = len(node.outputs[0].shape) if node.outputs[0].shape is not None else None
            if shape is None or rank is None:
                raise _Blocked(f"{node.op} '{node.name}' mixes in '{tensor.name}' of unknown shape")
            offset = axis - (rank - len(shape))
            if offset >= 0 and shape[offset] != 1:
                raise _Blocked(f"{node.op} '{node.name}' mixes in '{tensor.name}' per head")
        self.add(node.outputs[0], axis, queue)


def _head_producer(split: gs.Node, finder: _Finder, heads: int, size: int):
    """(producer MatMul, bias ChannelParam or None) feeding a split Reshape."""
    tensor = split.inputs[0]
    bias = None
    node = tensor.inputs[0] if tensor.inputs else None
    if node is not None and node.op == "Add" and len(tensor.outputs) == 1:
        const = [i for i, t in enumerate(node.inputs) if finder.constant(t) is not None]
        if len(const) != 1:
            raise _Blocked(f"Add '{node.name}' before the heads is not a constant bias")
        values = finder.constant(node.inputs[const[0]])
        if values.size != heads * size:
            raise _Blocked(f"bias of '{node.name}' is not per feature")
        bias = ChannelParam(node.name, const[0], values.ndim - 1, size)
        tensor = node.inputs[1 - const[0]]
        node = tensor.inputs[0] if tensor.inputs else None
    if node is None or node.op != "MatMul" or len(tensor.outputs) != 1 or tensor.name in finder.outputs:
        raise _Blocked(f"the input of Reshape '{split.name}' is not a projection's own output")
    target = finder.target(node)
    if target is None or target.out_features != heads * size:
        raise _Blocked(f"'{node.name}' is not a projection into {heads} heads of {size}")
    return node, bias


def find_head_groups(graph: gs.Graph, opset: int = 17) -> Tuple[List[ChannelGroup], List[BlockedGroup]]:
    """Attention-head groups (channels: heads, block: head size): the Q / K / V projections
    whose columns of a head go together with that head's rows of the output projection, and
    the Reshape constants that count heads."""
    finder = _Finder(graph)
    finder.opset = opset
    groups, blocked, seen = [], [], set()
    for node in graph.nodes:
        if node.name in seen or node.op != "Reshape":
            continue
        heads = _Heads(finder)
        try:
            head_input = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
            if head_input is None or head_input.op not in ("Add", "MatMul"):
                continue
            heads.grow(node)
            seen.update(heads.splits)
            producers, params = [], []
            for split in heads.splits.values():
                producer, bias = _head_producer(split, finder, heads.heads, heads.size)
                producers.append(producer.name)
                params.append(ChannelParam(producer.name, 1, 1, heads.size))
                if bias is not None:
                    params.append(bias)
            consumers = []
            for merge in heads.merges.values():
                out = merge.outputs[0]
                readers = list(out.outputs)
                if out.name in finder.outputs or len(readers) != 1 or readers[0].op != "MatMul" or \
                        finder.target(readers[0]) is None or readers[0].inputs[0] is not out:
                    raise _Blocked(f"the merged heads of '{merge.name}' are not read by one projection")
                consumers.append(readers[0].name)
            if not consumers or len(heads.splits) < 2:
                raise _Blocked("no output projection reads the heads")
        except _Blocked as reason:
            seen.update(heads.splits)
            blocked.append(BlockedGroup(node.name, heads.heads, tuple(heads.splits), f"heads: {reason}"))
            continue
        shapes = tuple(ShapeEdit(s.name, 1, len(heads.shape_constant(s)) - 2, 1) for s in heads.splits.values()) + \
            tuple(ShapeEdit(m.name, 1, len(heads.shape_constant(m)) - 1, heads.size) for m in heads.merges.values())
        groups.append(ChannelGroup(
            name=f"{producers[0]}/heads", channels=heads.heads, channel_first=False, producers=tuple(producers),
            consumers=tuple(consumers), params=tuple(params), depthwise=(), tensors=tuple(heads.tensors),
            block=heads.size, shapes=shapes))
    return groups, blocked
