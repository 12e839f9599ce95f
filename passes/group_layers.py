"""Find the groups of repeated layers that a joint decomposition fits together."""
from __future__ import annotations

import fnmatch
import re
from typing import Dict, List

import onnx_graphsurgeon as gs

from ..errors import LrsdError
from ..model.layers import LayerTarget

from .base import Pass, PassResult
from .context import PassContext

_DIGITS = re.compile(r"\d+")


def role_key(target: LayerTarget) -> tuple:
    """Layers in the same role of repeated blocks: same op, weight shape, side and attributes
    (conv spatial sizes aside), and the same name once digit runs are ignored."""
    conv = target.conv
    geometry = None if conv is None else (conv.kernel_shape, conv.strides, conv.pads, conv.dilations, conv.auto_pad)
    return (target.op, tuple(target.weight.shape), target.weight_side, target.gemm, geometry,
            _DIGITS.sub("#", target.name))


def joint_method(target: LayerTarget) -> str:
    """The chain a joint fit writes: svd for Gemm / MatMul, channel for Conv."""
    return "svd" if target.conv is None else "channel"


class GroupLayersPass(Pass):
    """Fills `ctx.groups` (when `config.joint` is on): name -> members (in graph order), each
    group two or more layers planned as plain svd / channel chains (no sparse residual, not
    an existing chain, not a lookup table) — with a global target, the layers the allocation may choose for —
    by `role_key` or by the patterns of `config.joint_groups`."""

    name = "group_layers"
    requires = ("select_ranks",)

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        config = ctx.config
        if config.joint == "off":
            return PassResult(graph, modified=False, stats={"groups": 0})
        if config.target is not None:  # the allocation decides; groups are its joint candidates
            allocatable = set(ctx.allocatable)
            eligible = [t for t in ctx.targets.values() if t.name in allocatable and t.chain_rank is None
                        and not t.lookup and config.sparse_share == 0 and config.method in ("auto", joint_method(t))]
        else:
            eligible = [t for t in ctx.targets.values()
                        if (plan := ctx.plans[t.name]).factorized and plan.method in ("svd", "channel")
                        and plan.sparse is None and t.chain_rank is None and not t.lookup]
        groups: Dict[str, List[str]] = {}
        if config.joint_groups:
            for pattern in config.joint_groups:
                members = [t for t in eligible if fnmatch.fnmatchcase(t.name, pattern)]
                if len({role_key(t)[:5] for t in members}) > 1:
                    raise LrsdError(f"joint group '{pattern}' matches layers of different shapes or attributes")
                if len(members) >= 2:
                    groups[pattern] = [t.name for t in members]
        else:
            by_key: Dict[tuple, List[str]] = {}
            for t in eligible:
                by_key.setdefault(role_key(t), []).append(t.name)
            groups = {key[-1]: names for key, names in by_key.items() if len(names) >= 2}
        taken = [n for names in groups.values() for n in names]
        if len(taken) != len(set(taken)):
            raise LrsdError("a layer is in two joint groups: make the joint_groups patterns disjoint")
        ctx.groups = groups
        return PassResult(graph, modified=False, stats={"groups": len(groups), "layers": len(taken)})
