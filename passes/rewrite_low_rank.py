"""Replace each factorized layer by its chain of smaller ops (`onnx_lrsd.rewrite`)."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from onnx_lrsd.rewrite import rewrite_layers

from .base import Pass, PassContext, PassResult


class RewriteLowRankPass(Pass):
    """Rewrites every layer in `ctx.factorizations`; weights are written as initializers in
    the layer's own dtype."""

    name = "rewrite_low_rank"
    requires = ("find_targets",)

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        ctx.sparse_initializers.extend(rewrite_layers(graph, ctx.targets, ctx.factorizations.values()))
        return PassResult(graph, modified=bool(ctx.factorizations), stats={"rewritten": len(ctx.factorizations)})
