"""Keep a layer's automatic sparse share to the ones whose residual costs little time."""
from __future__ import annotations

import dataclasses

import onnx_graphsurgeon as gs

from onnx_lrsd.config import AUTO_SHARE
from onnx_lrsd.decompose import split_budget
from onnx_lrsd.latency import RESIDUAL, LatencyModel

from .base import Pass, PassContext, PassResult
from .deployment import deployment_feed, input_shapes


class FilterResidualSharesPass(Pass):
    """For every plan asking for an automatic share of a rows residual (CMD's sparse
    coefficient), time the chain of each share at the layer's budget in onnxruntime — share 0
    is the plain chain, share s the rank-r_s chain with k_s gathered rows (`split_budget`) — and
    keep the shares whose time is at most (1 + `residual_latency_limit`) × the plain chain's.
    The fit then picks among them by held-out error. Measured at `latency_batch` and
    `latency_threads` on this machine (cached, `LatencyModel`)."""

    name = "filter_residual_shares"
    requires = ("select_ranks",)

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        config = ctx.config
        wanted = [p for p in ctx.plans.values()
                  if p.sparse is not None and p.sparse.share == AUTO_SHARE and p.sparse.structure == "rows"]
        if not wanted:
            return PassResult(graph, modified=False, stats={"layers": 0})
        shapes = input_shapes(ctx, [p.name for p in wanted], deployment_feed(ctx))
        model = LatencyModel(threads=config.latency_threads)
        dropped = 0
        for done, plan in enumerate(wanted, 1):
            target = ctx.targets[plan.name]
            splits = {s: split_budget(target.in_features, target.out_features, plan.cost.params, s, "rows")
                      for s in plan.sparse.auto_shares}
            candidates = {s: (plan.method, (rank,)) if k == 0 else (plan.method + RESIDUAL, (rank, k // target.out_features))
                          for s, (rank, k) in splits.items() if rank >= 1}
            shares = sorted(candidates)
            times = dict(zip(shares, model.measure(target, shapes[plan.name], [candidates[s] for s in shares])))
            chain = times.get(0.0, min(times.values()))
            allowed = tuple(s for s in shares if times[s] <= (1 + config.residual_latency_limit) * chain)
            dropped += len(plan.sparse.auto_shares) - len(allowed)
            ctx.plans[plan.name] = dataclasses.replace(
                plan, sparse=dataclasses.replace(plan.sparse, auto_shares=allowed or (0.0,)))
            ctx.report_progress("residual latency", done, len(wanted))
        return PassResult(graph, modified=False, stats={"layers": len(wanted), "shares_dropped": dropped})
