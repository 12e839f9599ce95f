"""Replace each factorized layer by its chain of smaller ops (`onnx_lrsd.model.rewrite`)."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from ..model.mapped import mapped_directory, trim_heap
from ..model.rewrite import rewrite_layers

from .base import Pass, PassResult
from .context import PassContext


class RewriteLowRankPass(Pass):
    """Rewrites every layer in `ctx.factorizations`; weights are written as initializers in
    the layer's own dtype. The factor arrays are then dropped from the context: the graph
    holds the only copy of the new weights (a large model's would otherwise be held twice,
    once in float64)."""

    name = "rewrite_low_rank"
    requires = ("find_targets",)

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        ctx.sparse_initializers.extend(rewrite_layers(graph, ctx.targets, ctx.factorizations.values()))
        ctx.factorizations = {name: fact.without_factors() for name, fact in ctx.factorizations.items()}
        if mapped_directory() is not None:
            trim_heap()
        return PassResult(graph, modified=bool(ctx.factorizations), stats={"rewritten": len(ctx.factorizations)})
