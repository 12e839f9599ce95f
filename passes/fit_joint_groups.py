"""Fit each group of repeated layers jointly, sharing one factor (JMD)."""
from __future__ import annotations

import dataclasses
import logging
from typing import List, Optional

import numpy as np
import onnx_graphsurgeon as gs

from ..plan.cost import Cost
from ..decompose import data_error, relative_tail_errors, whitened_spectrum
from ..decompose.joint import JointFactors, joint_fit, joint_ranks
from ..plan.factorize import LayerFactorization
from ..report.types import JointGroupReport

from .base import Pass, PassResult
from .context import PassContext

log = logging.getLogger(__name__)

CONV_ROLES = {"U": "W1", "V": "W2"}
"""The rewrite's names of a channel chain's factors (first k×k conv, second 1×1 conv)."""


def _equal_params_rank(w: np.ndarray, plan) -> int:
    """The rank of a separate chain with the plan's parameters."""
    return int(min(plan.cost.params // sum(w.shape), min(w.shape)))


class FitJointGroupsPass(Pass):
    """Fills `ctx.factorizations` for the members of `ctx.groups`: at the side and ranks the
    global allocation chose (`ctx.joint_ranks`), or else at the group's parameter budget (the
    sum of its members' plans) with the configured side ("both": MatMul groups only; its
    alternating fit costs minutes on 384-wide layers), or with "auto" the side of "left" and
    "right" with the lowest summed squared held-out error — kept only if it beats the separate
    fits, which are then left to `reconstruct_feature_maps`. A side whose ranks would cost any
    member more MACs than its dense layer is not tried (as for separate fits: a factorization
    must save both). Bias correction as for separate fits; a member's plan shows its own params
    plus its share of the shared factor."""

    name = "fit_joint_groups"
    requires = ("collect_activations", "group_layers")

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        joint = 0
        for done, (group, names) in enumerate(ctx.groups.items(), 1):
            joint += self._fit_group(ctx, group, names)
            ctx.report_progress("joint groups", done, len(ctx.groups))
        return PassResult(graph, modified=False, stats={"groups": len(ctx.groups), "joint": joint})

    def _fit_group(self, ctx: PassContext, group: str, names: List[str]) -> bool:
        config = ctx.config
        targets = [ctx.targets[n] for n in names]
        plans = [ctx.plans[n] for n in names]
        ws = [t.matrix() for t in targets]
        stats = [ctx.statistics.get(n) for n in names]
        grams = [None if s is None else np.asarray(s.fit.gram) for s in stats]
        checks = [g if s is None or s.holdout is None or not s.holdout.count else np.asarray(s.holdout.gram)
                  for s, g in zip(stats, grams)]
        checks = [np.eye(w.shape[0]) if c is None else c for w, c in zip(ws, checks)]
        budget = sum(p.cost.params for p in plans)
        separate = float(sum(relative_tail_errors(whitened_spectrum(w, np.eye(w.shape[0]) if g is None else g,
                                                                    config.ridge))[_equal_params_rank(w, p)] ** 2
                             for w, g, p in zip(ws, grams, plans)))
        if config.joint == "both" and not (targets[0].op == "MatMul" and targets[0].weight_side == "right"):
            return self._separate(ctx, group, names, budget, separate, None)
        allocated = ctx.joint_ranks.get(group)
        sides = [allocated[0]] if allocated else [config.joint] if config.joint != "auto" else ["left", "right"]
        best: Optional[tuple] = None
        for side in sides:
            ranks = allocated[1] if allocated else joint_ranks(side, [w.shape for w in ws], budget)
            if (side != "right" and ranks[0] < 1) or (side != "left" and ranks[1] < 1):
                continue
            if any(t.rows * sum(ranks) * (t.in_features + t.out_features) >= t.macs for t in targets):
                continue  # the shared factor buys a rank whose chains cost more MACs than the dense layers
            fit = joint_fit(ws, grams, side, ranks, config.ridge)
            errors = [data_error(w, fit.to_dense(i), c) for i, (w, c) in enumerate(zip(ws, checks))]
            score = float(sum(e * e for e in errors))
            if best is None or score < best[0]:
                best = (score, side, ranks, fit, errors)
        if best is None or (config.joint == "auto" and not allocated and best[0] >= separate):
            return self._separate(ctx, group, names, budget, separate, None if best is None else best[0])
        score, side, ranks, fit, errors = best
        self._apply(ctx, group, targets, plans, stats, fit, ranks, errors)
        ctx.joint_reports.append(JointGroupReport(group, tuple(names), side, ranks, fit.n_params, separate, score))
        log.info("joint group %s (%d layers): %s ranks %s, summed squared error %.4g (separate %.4g)", group,
                 len(names), side, ranks, score, separate)
        return True

    @staticmethod
    def _separate(ctx: PassContext, group: str, names: List[str], budget: int, separate: float,
                  joint: Optional[float]) -> bool:
        """The group stays with separate fits (recorded with the best joint error tried)."""
        ctx.joint_reports.append(JointGroupReport(group, tuple(names), "separate", (), budget, separate,
                                                  separate if joint is None else joint))
        return False

    def _apply(self, ctx: PassContext, group: str, targets, plans, stats, fit: JointFactors, ranks, errors) -> None:
        roles = [CONV_ROLES[r] if targets[0].conv is not None else r for r in fit.shared_roles]
        shared_params = (0 if fit.U is None else fit.U.size) + (0 if fit.V is None else fit.V.size)
        rank = sum(ranks)
        for i, (target, plan) in enumerate(zip(targets, plans)):
            approx = fit.to_dense(i)
            shift = None
            if ctx.config.bias_correction and stats[i] is not None:
                shift = stats[i].fit.mean @ (target.matrix() - approx)
            own = (fit.V_own[i].size if fit.U is not None else 0) + (fit.U_own[i].size if fit.V is not None else 0)
            ctx.factorizations[target.name] = LayerFactorization(
                name=target.name, method=plan.method, factors=fit.member(i), bias_shift=shift, data_error=errors[i],
                shared=tuple((role, f"{group}/{role}") for role in roles))
            cost = Cost(params=own + shared_params // len(targets),
                        macs=target.rows * rank * (target.in_features + target.out_features))
            ctx.plans[target.name] = dataclasses.replace(plan, ranks=(rank,), cost=cost, reason=f"joint {fit.side}")
