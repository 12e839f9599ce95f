"""Time every factorized layer in onnxruntime, dense and as written, for the report."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from ..decompose import split_budget
from ..runtime.latency import RESIDUAL, LatencyModel
from ..report.types import LayerLatency
from ..runtime.deployment import deployment_feed, input_shapes

from .base import Pass, PassResult
from .context import PassContext


class MeasureLayerLatencyPass(Pass):
    """Fills `ctx.layer_latency` (when `config.layer_latency`): each factorized layer's median
    time alone in onnxruntime — dense, as written, and for a layer with a rows residual its
    plain chain at the same parameter budget (the L-only alternative), so the report shows
    what the residual costs in time: the L + S layer and its plain chain are timed
    interleaved and the ratio is the median of several blocks (`LatencyModel.measure_ratios`,
    the measurement the automatic share is filtered by).
    At `latency_batch` and `latency_threads`."""

    name = "measure_layer_latency"
    requires = ("rewrite_low_rank",)

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        plans = [p for p in ctx.plans.values() if p.factorized]
        if not ctx.config.layer_latency or not plans:
            return PassResult(graph, modified=False, stats={"layers": 0})
        shapes = input_shapes(ctx.source, [ctx.targets[p.name] for p in plans],
                              deployment_feed(ctx.source, ctx.calibration, ctx.config))
        model = LatencyModel(threads=ctx.config.latency_threads)
        for done, plan in enumerate(plans, 1):
            target = ctx.targets[plan.name]
            (dense_ms,) = model.measure(target, shapes[plan.name], [("dense", ())])
            if plan.residual is not None and plan.residual.structure == "rows":
                plain, _ = split_budget(target.in_features, target.out_features, plan.cost.params, 0.0)
                written = (plan.method + RESIDUAL, (plan.ranks[0], plan.residual.size)) if plan.ranks[0] else \
                    ("dense", ())
                chain_ms, (ratio,) = model.measure_ratios(target, shapes[plan.name], (plan.method, (max(plain, 1),)),
                                                          [written])
                latency = LayerLatency(dense_ms=dense_ms, ms=chain_ms * ratio, chain_ms=chain_ms)
            else:
                (ms,) = model.measure(target, shapes[plan.name], [(plan.method, plan.ranks)])
                latency = LayerLatency(dense_ms=dense_ms, ms=ms)
            ctx.layer_latency[plan.name] = latency
            ctx.report_progress("layer latency", done, len(plans))
        return PassResult(graph, modified=False, stats={"layers": len(plans)})
