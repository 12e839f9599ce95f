"""Choose each target's factorization kind and ranks."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from ..errors import LrsdError
from ..plan.rank_select import candidate_plans

from .base import Pass, PassResult
from .context import PassContext


class SelectRanksPass(Pass):
    """Fills `ctx.plans` from the keep ratio / energy / overrides of the config (the kind with
    the fewest MACs) and `ctx.plan_options` with the other kinds a data-aware fit may pick. A layer
    override naming no target is an error (a misspelt name would silently do nothing).

    With a global target (`config.target`), the layers without an override and above
    `min_layer_share` go to `ctx.allocatable`: `allocate_budget` replaces their plans."""

    name = "select_ranks"
    requires = ("find_targets",)

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        known = list(ctx.targets) + [s.name for s in ctx.skipped]
        unmatched = ctx.config.unmatched_overrides(known)
        if unmatched:
            raise LrsdError(f"config names no layer of this model: {', '.join(o.pattern for o in unmatched)} "
                            f"(see `onnx-lrsd inspect` for layer names)")
        total = sum(t.params for t in ctx.targets.values())
        for target in ctx.targets.values():
            options = candidate_plans(target, ctx.config, total)
            ctx.plans[target.name] = min(options, key=lambda p: (p.cost.macs, p.cost.params))
            if len(options) > 1:
                ctx.plan_options[target.name] = options
        if ctx.config.target is not None:
            ctx.allocatable = [t.name for t in ctx.targets.values()
                               if ctx.config.override_for(t.name) is None
                               and t.params >= ctx.config.min_layer_share * total]
        chosen = sum(p.factorized for p in ctx.plans.values())
        return PassResult(graph, modified=False, stats={"factorized": chosen, "dense": len(ctx.plans) - chosen})
