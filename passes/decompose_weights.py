"""Factorize each planned layer's weight (data-free: minimise the weight error)."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from ..parallel.tasks import decompose_layers

from .base import Pass, PassResult
from .context import PassContext


class DecomposeWeightsPass(Pass):
    """Fills `ctx.factorizations` for layers that have a plan but no factors yet (layers
    already fitted on calibration data are kept); one executor task per layer."""

    name = "decompose_weights"
    requires = ("select_ranks",)

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        todo = [p for p in ctx.plans.values() if p.factorized and p.name not in ctx.factorizations]
        requests = [(ctx.targets[plan.name], plan) for plan in todo]
        decomposed = decompose_layers(ctx.executor, requests, ctx.config.seed, ctx.config.svd_solver)
        for done, fact in enumerate(decomposed, 1):
            ctx.add_factorization(fact)
            ctx.report_progress("decompose", done, len(todo))
        return PassResult(graph, modified=False, stats={"decomposed": len(todo)})
