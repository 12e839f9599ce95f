"""Fewer kernels for the same function: hard swishes in one op, constant affines folded into
convs (`model.fuse`)."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from ..model.fuse import fuse_graph
from ..model.io import default_opset
from .base import Pass, PassResult
from .context import PassContext


class FuseElementwisePass(Pass):
    """hswish(x) written as x·clip(x + 3, 0, 6)/6 becomes HardSwish (HardSigmoid·Mul below
    opset 14); per-channel constant scales and shifts next to a Conv fold into its weights and
    bias. Off with `fuse_elementwise=False`."""

    name = "fuse_elementwise"
    requires = ("cleanup_graph",)

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if not ctx.config.fuse_elementwise:
            return PassResult(graph, modified=False, stats={"fused": 0, "folded": 0})
        fused, folded = fuse_graph(graph, default_opset(ctx.source))
        return PassResult(graph, modified=bool(fused or folded), stats={"fused": fused, "folded": folded})
