"""Keep a layer's automatic sparse share to the ones whose residual costs little time."""
from __future__ import annotations

import dataclasses

import onnx_graphsurgeon as gs

from ..config import AUTO_SHARE
from ..decompose import split_budget
from ..runtime.latency import RESIDUAL, LatencyModel
from ..plan.rank_select import residual_group
from ..runtime.deployment import deployment_feed, input_shapes

from .base import Pass, PassResult
from .context import PassContext


class FilterResidualSharesPass(Pass):
    """For every plan asking for an automatic share of a rows residual (CMD's sparse
    coefficient), time the chain of each share at the layer's budget in onnxruntime against
    the plain chain — share 0 is the plain chain, share s the rank-r_s chain with k_s gathered
    rows or channels (`split_budget`) — interleaved, as the median ratio of several blocks
    (`LatencyModel.measure_ratios`), and keep the shares whose ratio is at most
    1 + `residual_latency_limit`. A layer whose plain chain runs in under
    `residual_min_chain_ms` keeps share 0 only: the Gather and Concat (or the residual conv)
    cost a few µs whatever their size, more than the limit allows on such a layer.
    The fit then picks among the kept shares by held-out error. Measured at `latency_batch`
    and `latency_threads` on this machine (cached)."""

    name = "filter_residual_shares"
    requires = ("select_ranks",)

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        """Filters the plan of every layer and its other candidate kinds (`ctx.plan_options`:
        a k×k conv's channel plan may win over its plan's kind in the fit)."""
        config = ctx.config
        wanted = [p for name, plan in ctx.plans.items() for p in ctx.plan_options.get(name) or [plan]
                  if p.sparse is not None and p.sparse.share == AUTO_SHARE and p.sparse.structure == "rows"]
        if not wanted:
            return PassResult(graph, modified=False, stats={"layers": 0})
        shapes = input_shapes(ctx.source, [ctx.targets[n] for n in sorted({p.name for p in wanted})],
                              deployment_feed(ctx.source, ctx.calibration, config))
        model = LatencyModel(threads=config.latency_threads)
        dropped = too_small = 0
        filtered = {}
        for done, plan in enumerate(wanted, 1):
            target = ctx.targets[plan.name]
            group = residual_group(target)
            splits = {s: split_budget(target.in_features, target.out_features, plan.cost.params, s, "rows", group)
                      for s in plan.sparse.auto_shares}
            candidates = {s: (plan.method, (rank,)) if k == 0 else (plan.method + RESIDUAL, (rank, k // target.out_features))
                          for s, (rank, k) in splits.items() if rank >= 1 and s > 0}
            plain = (plan.method, (max(split_budget(target.in_features, target.out_features, plan.cost.params, 0.0)[0], 1),))
            shares = sorted(candidates)
            chain_ms, ratios = model.measure_ratios(target, shapes[plan.name], plain, [candidates[s] for s in shares])
            if chain_ms < config.residual_min_chain_ms:
                allowed, too_small = (0.0,), too_small + 1
            else:
                allowed = (0.0, *(s for s, r in zip(shares, ratios) if r <= 1 + config.residual_latency_limit))
            dropped += len(set(plan.sparse.auto_shares) - set(allowed))
            filtered[id(plan)] = dataclasses.replace(plan, sparse=dataclasses.replace(plan.sparse, auto_shares=allowed))
            ctx.report_progress("residual latency", done, len(wanted))
        ctx.plans = {name: filtered.get(id(plan), plan) for name, plan in ctx.plans.items()}
        ctx.plan_options = {name: [filtered.get(id(p), p) for p in options] for name, options in ctx.plan_options.items()}
        return PassResult(graph, modified=False,
                          stats={"layers": len(wanted), "shares_dropped": dropped, "too_small": too_small})
