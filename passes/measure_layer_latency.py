"""Time every factorized layer in onnxruntime, dense and as written, for the report."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from onnx_lrsd.decompose import split_budget
from onnx_lrsd.latency import RESIDUAL, LatencyModel
from onnx_lrsd.report import LayerLatency

from .base import Pass, PassContext, PassResult
from .deployment import deployment_feed, input_shapes


class MeasureLayerLatencyPass(Pass):
    """Fills `ctx.layer_latency` (when `config.layer_latency`): each factorized layer's median
    time alone in onnxruntime — dense, as written, and for a layer with a rows residual its
    plain chain at the same parameter budget (the L-only alternative), so the report shows
    what the residual costs in time.
    At `latency_batch` and `latency_threads`; all of a layer's variants timed interleaved."""

    name = "measure_layer_latency"
    requires = ("rewrite_low_rank",)

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        plans = [p for p in ctx.plans.values() if p.factorized]
        if not ctx.config.layer_latency or not plans:
            return PassResult(graph, modified=False, stats={"layers": 0})
        shapes = input_shapes(ctx, [p.name for p in plans], deployment_feed(ctx))
        model = LatencyModel(threads=ctx.config.latency_threads)
        for done, plan in enumerate(plans, 1):
            target = ctx.targets[plan.name]
            candidates = [("dense", ()), (plan.method, plan.ranks)]
            if plan.residual is not None and plan.residual.structure == "rows":
                plain, _ = split_budget(target.in_features, target.out_features, plan.cost.params, 0.0)
                candidates = [("dense", ()), (plan.method, (max(plain, 1),)),
                              (plan.method + RESIDUAL, (plan.ranks[0], plan.residual.size))]
            times = model.measure(target, shapes[plan.name], candidates)
            residual = len(times) == 3
            ctx.layer_latency[plan.name] = LayerLatency(
                dense_ms=times[0], ms=times[2] if residual else times[1], chain_ms=times[1] if residual else None)
            ctx.report_progress("layer latency", done, len(plans))
        return PassResult(graph, modified=False, stats={"layers": len(plans)})
