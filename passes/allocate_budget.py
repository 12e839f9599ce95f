"""Choose every allocatable layer's kind and rank at once for the configured global target."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx_graphsurgeon as gs

from ..plan.allocate import (UNIT, Allocation, Option, Sensitivity, allocate_budget, allocate_damage,
                                compound_frontier)
from ..runtime.bench import model_latency_ms
from ..plan.cost import Cost, count_params, model_macs, node_macs
from ..decompose.joint import joint_error_curves
from ..plan.candidates import LayerCandidate, rank_grid
from ..errors import LrsdError
from ..model.io import initializer_bytes
from ..runtime.latency import LatencyModel, candidate_latencies, shape_key
from ..runtime.sensitivity import probe_batches, probe_candidates
from ..parallel.tasks import error_curves, latency_tasks, sensitivity_probes
from ..plan.rank_select import LayerPlan, dense_plan, with_sparse_request
from ..report.types import AllocationSummary
from ..model.layers import LayerTarget
from ..runtime.deployment import deployment_feed, input_shapes
from ..runtime.feeds import dims_from_feeds

from .base import Pass, PassResult
from .context import PassContext

log = logging.getLogger(__name__)

TINY = 1e-12


class AllocateBudgetPass(Pass):
    """Replaces the plans of `ctx.allocatable` by a global allocation (CMD): each layer's
    candidates (kind × rank, `error_curves`) get a predicted damage D_l(e_l) — e_l the relative
    reconstruction error from the calibration statistics, D_l the layer's `Sensitivity` (the
    model's squared relative output error, measured in onnxruntime by compressing that layer
    alone at two errors) — and a cost (params, MACs, or latency measured per candidate
    shape by `LatencyModel`); `onnx_lrsd.plan.allocate` picks the least total damage for the budget
    (or the fewest params within `max_error`). Dense is always an option.

    `correction` comes from measuring the written model (`onnx_lrsd.api`): it multiplies the
    speedup asked of the prediction (latency target) or the error budget (error target). A latency
    target the prediction cannot reach gets the fastest allocation (`capped`): whether it is
    reachable is for the measurement to say."""

    name = "allocate_budget"
    requires = ("select_ranks", "collect_activations", "group_layers")

    def __init__(self, correction: float = 1.0):
        self.correction = correction
        self.capped = False

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        config = ctx.config
        if config.target is None or not ctx.allocatable:
            return PassResult(graph, modified=False, stats={"allocated": 0})
        kind, value = config.target
        names = list(ctx.allocatable)
        missing = [name for name in names if name not in ctx.curves]
        requests = [(ctx.targets[name], _gram(ctx, name)) for name in missing]
        for done, (name, curve) in enumerate(zip(missing, error_curves(ctx.executor, requests, config)), 1):
            ctx.curves[name] = curve
            ctx.report_progress("error curves", done, len(missing))
        curves = {name: ctx.curves[name] for name in names}
        probed = config.sensitivity and bool(ctx.calibration)
        if probed and not ctx.sensitivities:
            ctx.sensitivities.update(layer_sensitivities(graph, ctx, curves))  # shared with later rounds
        sensitivity = ctx.sensitivities if probed else {name: UNIT for name in names}
        damages = {name: [sensitivity[name].at(c.error) for c in curves[name]] for name in names}
        if kind == "latency":
            allocation, predicted = self._latency(ctx, names, curves, damages, value)
            units = [_Unit((name,), None, tuple(("layer", (i,)) for i in range(len(curves[name]) + 1)))
                     for name in names]
        else:
            allocation, predicted, units = _static(ctx, kind, value, names, curves, damages, sensitivity,
                                                   self.correction)
        joint = []
        for unit, index in zip(units, allocation.choice):
            decision = unit.decode[index]
            if decision[0] == "joint":
                joint.append(_plan_joint(ctx, unit, decision[1], decision[2]))
                continue
            for name, choice in zip(unit.names, decision[1]):
                target, options = ctx.targets[name], curves[name]
                if choice == 0:
                    ctx.plans[name] = dense_plan(target, "the global allocation keeps it dense")
                else:
                    c = options[choice - 1]
                    ctx.plans[name] = with_sparse_request(
                        LayerPlan(name, target.op, c.method, c.ranks, c.cost, ctx.plans[name].dense), target, config)
        for unit in units:
            for name in unit.names:
                ctx.plan_options.pop(name, None)
        ctx.groups = {group: members for group, members in ctx.groups.items() if group in ctx.joint_ranks}
        factorized = sum(ctx.plans[n].factorized for n in names)
        ctx.allocation = AllocationSummary(
            target=kind, value=float(value), predicted=float(predicted),
            predicted_error=float(np.sqrt(allocation.damage)), layers=len(names), factorized=factorized,
            sensitivity=probed, batch=config.latency_batch, threads=config.latency_threads, capped=self.capped,
            joint=tuple(joint))
        log.info("allocation for %s %g: %d of %d layers factorized, predicted %.4g", kind, value, factorized,
                 len(names), predicted)
        return PassResult(graph, modified=False, stats={"allocated": len(names), "factorized": factorized})

    def _latency(self, ctx: PassContext, names: List[str], curves, damages, speedup: float):
        original_ms, times = candidate_ms(ctx, names, curves)
        options, dense_total = [], 0.0
        for name in names:
            dense_ms, ms = times[name]
            dense_total += dense_ms
            options.append([Option(dense_ms, 0.0)] + [Option(t, d) for t, d in zip(ms, damages[name])])
        rest = original_ms - dense_total
        budget = original_ms / (speedup * self.correction) - rest
        cheapest = sum(min(o.cost for o in layer) for layer in options)
        self.capped = budget < cheapest  # predicted out of reach: the fastest allocation, to be measured
        allocation = allocate_budget(options, max(budget, cheapest))
        return allocation, original_ms / max(rest + allocation.cost, TINY)


def candidate_ms(ctx: PassContext, names: Sequence[str], curves) -> Tuple[float, Dict[str, Tuple[float, List[float]]]]:
    """(the source model's latency, per layer (dense ms, each candidate's ms)) in onnxruntime
    at the deployment feed, `latency_threads`: each distinct layer shape measured once
    (`LatencyModel`, cached on disk)."""
    config = ctx.config
    feed = deployment_feed(ctx.source, ctx.calibration, config)
    original_ms = model_latency_ms(ctx.source, feed, config.latency_threads)
    if not names:
        return original_ms, {}
    shapes = input_shapes(ctx.source, [ctx.targets[n] for n in names], feed)
    model = LatencyModel(threads=config.latency_threads)
    keys = {name: shape_key(ctx.targets[name], shapes[name], curves[name]) for name in names}
    first: Dict[tuple, str] = {}  # one measurement per distinct layer, in layer order
    for name in names:
        first.setdefault(keys[name], name)
    requests = [(ctx.targets[name], shapes[name], curves[name]) for name in first.values()]
    memo: Dict[tuple, Tuple[float, List[float]]] = {}
    for done, (key, times) in enumerate(zip(first, latency_tasks(ctx.executor, candidate_latencies, model, requests)), 1):
        memo[key] = times
        ctx.report_progress("latency", done, len(first))
    return original_ms, {name: memo[keys[name]] for name in names}


def macs_scale(ctx: PassContext) -> Dict[str, float]:
    """Per target, its MACs at the run's dims (the first calibration batch's, `config.dims`:
    as the report counts them) over its MACs with symbolic dims 1 (`LayerTarget.macs`)."""
    counted = node_macs(ctx.source, _dims(ctx))
    return {name: counted[name] / t.macs for name, t in ctx.targets.items() if t.macs > 0 and counted.get(name)}


@dataclass(frozen=True)
class _Unit:
    """One decision of the allocation: a layer, or a group of repeated layers (JMD) whose
    options are all dense, the members' separate frontier, and joint fits at shared ranks.
    `decode[i]` says what option i means: ("layer", (choice,)) / ("separate", choices per
    member; 0 dense, c the member's candidate c − 1) / ("joint", side, rank)."""

    names: Tuple[str, ...]
    group: Optional[str]
    decode: tuple


def _static(ctx: PassContext, kind: str, value: float, names: List[str], curves, damages, sensitivity,
            correction: float):
    """Params / MACs budgets and the error target: costs from the cost model's counts."""
    field = "macs" if kind == "macs" else "params"
    scale = macs_scale(ctx) if kind == "macs" else {}
    total = (model_macs(ctx.source, _dims(ctx)) if kind == "macs" else count_params(ctx.source))
    layer_options = {n: [Option(getattr(ctx.plans[n].dense, field) * scale.get(n, 1.0), 0.0)] +
                     [Option(getattr(c.cost, field) * scale.get(n, 1.0) + _shift_params(ctx, n, field), d)
                      for c, d in zip(curves[n], damages[n])] for n in names}
    grouped = {n for members in ctx.groups.values() for n in members}
    units = [_Unit((n,), None, tuple(("layer", (i,)) for i in range(len(layer_options[n]))))
             for n in names if n not in grouped]
    options = [layer_options[u.names[0]] for u in units]
    for group, members in ctx.groups.items():
        unit, unit_options = _group_unit(ctx, group, members, layer_options, field, sensitivity, scale)
        units.append(unit)
        options.append(unit_options)
    others = [plan for name, plan in ctx.plans.items() if name not in names]
    fixed = total - sum(layer[0].cost for layer in options) - sum(
        (getattr(plan.dense, field) - getattr(plan.cost, field)) * scale.get(plan.name, 1.0) for plan in others)
    if kind == "error":
        allocation = allocate_damage(options, (correction * value) ** 2)
        return allocation, float(np.sqrt(allocation.damage)), units
    allocation = _solve_budget(options, value * total - fixed,
                               lambda a: f"the smallest allocation keeps {(fixed + a.cost) / total:.3f}",
                               f"target {kind} {value:g}")
    return allocation, (fixed + allocation.cost) / total, units


JOINT_SIDES = {"left": ("left",), "right": ("right",), "auto": ("left", "right")}
"""The shared sides a group's joint options are offered with, per `config.joint`."""


def _group_unit(ctx: PassContext, group: str, members: List[str], layer_options, field: str, sensitivity,
                scale: Dict[str, float]):
    """(unit, options) of a group: all dense, the separate frontier (`compound_frontier`), and
    for each side of `JOINT_SIDES` the joint fit at every grid rank that saves params and MACs
    over the dense group — its damage Σᵢ Dᵢ(eᵢ(r)) from `joint_error_curves` (MACs scaled by
    `scale`, `macs_scale`)."""
    config = ctx.config
    targets = [ctx.targets[n] for n in members]
    dense = [layer_options[n][0] for n in members]
    decode = [("separate", (0,) * len(members))]
    options = [Option(sum(o.cost for o in dense), 0.0)]
    for option, choice in compound_frontier([layer_options[n] for n in members]):
        if any(choice):
            decode.append(("separate", choice))
            options.append(option)
    weights = [t.matrix() for t in targets]
    grams = [_gram(ctx, n) for n in members]
    shifts = sum(_shift_params(ctx, n, field) for n in members)
    dense_params = sum(t.params for t in targets)
    dense_macs = sum(t.macs for t in targets)
    multiple = config.conv_rank_multiple if targets[0].conv is not None else 1
    for side in JOINT_SIDES[config.joint]:
        per_rank = _joint_cost(targets, side, 1)
        largest = min((dense_params - 1) // per_rank.params, (dense_macs - 1) // per_rank.macs,
                      min(min(w.shape) for w in weights))
        ranks = rank_grid(int(largest), config.min_rank, multiple)
        if not ranks:
            continue
        errors = joint_error_curves(weights, grams, side, max(ranks), config.ridge)
        for rank in ranks:
            cost = (getattr(_joint_cost(targets, side, rank, scale), field) if field == "macs"
                    else _joint_cost(targets, side, rank).params + shifts)
            damage = sum(sensitivity[n].at(float(errors[i, rank])) for i, n in enumerate(members))
            decode.append(("joint", side, rank))
            options.append(Option(float(cost), float(damage)))
    return _Unit(tuple(members), group, tuple(decode)), options


def _joint_cost(targets: Sequence[LayerTarget], side: str, rank: int, scale: Optional[Dict[str, float]] = None) -> Cost:
    """A group's params (the shared factor once) and MACs at a shared rank (each member's
    MACs times `scale[name]`, 1 by default)."""
    if side == "left":
        params = rank * (targets[0].in_features + sum(t.out_features for t in targets))
    else:
        params = rank * (sum(t.in_features for t in targets) + targets[0].out_features)
    return Cost(params=params, macs=round(sum(t.rows * rank * (t.in_features + t.out_features) * (scale or {}).get(t.name, 1.0)
                                              for t in targets)))


def _plan_joint(ctx: PassContext, unit: _Unit, side: str, rank: int) -> str:
    """Members planned as one joint fit at `rank` (fitted by `fit_joint_groups`); a member's
    cost is its own factor plus its share of the shared one."""
    targets = [ctx.targets[n] for n in unit.names]
    total = _joint_cost(targets, side, rank)
    shared = rank * (targets[0].in_features if side == "left" else targets[0].out_features)
    for target in targets:
        own = rank * (target.out_features if side == "left" else target.in_features)
        plan = ctx.plans[target.name]
        method = "svd" if target.conv is None else "channel"
        cost = Cost(params=own + shared // len(targets), macs=target.rows * rank * (target.in_features + target.out_features))
        ctx.plans[target.name] = LayerPlan(target.name, target.op, method, (rank,), cost, plan.dense,
                                           reason=f"joint {side}")
    ctx.joint_ranks[unit.group] = (side, (rank, 0) if side == "left" else (0, rank))
    log.info("group %s: joint %s at rank %d (%d params)", unit.group, side, rank, total.params)
    return f"{unit.group} {side} {rank}"


def _shift_params(ctx: PassContext, name: str, field: str) -> int:
    """A bias correction may add a bias vector to a layer that has none (when no Add follows
    to fold it into): counted, so a params target holds either way."""
    target = ctx.targets[name]
    corrected = ctx.config.bias_correction and bool(ctx.calibration) and name in ctx.statistics
    return target.out_features if field == "params" and corrected and target.bias_tensor is None else 0


def _solve_budget(options, budget: float, best_text, asked: str) -> Allocation:
    try:
        return allocate_budget(options, budget)
    except ValueError:
        cheapest = Allocation((), sum(min(o.cost for o in layer) for layer in options), 0.0)
        raise LrsdError(f"{asked} is unreachable: {best_text(cheapest)}") from None


def _dims(ctx: PassContext) -> Dict[str, int]:
    return {**dims_from_feeds(ctx.source, ctx.calibration[0] if ctx.calibration else None), **dict(ctx.config.dims)}


def _gram(ctx: PassContext, name: str) -> Optional[np.ndarray]:
    stats = ctx.statistics.get(name)
    return None if stats is None else np.asarray(stats.fit.gram)


def layer_sensitivities(graph: gs.Graph, ctx: PassContext,
                        curves: Dict[str, List[LayerCandidate]]) -> Dict[str, Sensitivity]:
    """Each layer's `Sensitivity` from probes (`onnx_lrsd.runtime.sensitivity`): the model's
    squared relative output error with layer l alone replaced by its fit at each probe
    candidate, one executor task per layer (`sensitivity_probes`)."""
    config = ctx.config
    batches, reference = probe_batches(ctx.source, ctx.calibration, config)
    probed = [name for name, candidates in curves.items() if candidates and name in ctx.statistics]
    probes = {name: probe_candidates(curves[name]) for name in probed}
    requests = [(ctx.targets[name], [LayerPlan(name, ctx.targets[name].op, p.method, p.ranks, p.cost,
                                               ctx.plans[name].dense) for p in probes[name]],
                 ctx.statistics[name].fit) for name in probed]
    memory = 3 * initializer_bytes(ctx.source)  # the graph, its probe copy and a session
    results = sensitivity_probes(ctx.executor, graph, ctx.template, requests, config, batches, reference, memory)
    found: Dict[str, Sensitivity] = {name: UNIT for name in curves}
    for done, (name, damages) in enumerate(zip(probed, results), 1):
        found[name] = Sensitivity.fitted([(p.error, d) for p, d in zip(probes[name], damages)])
        log.debug("sensitivity %s: %s", name, found[name])
        ctx.report_progress("sensitivity", done, len(probed))
    return found
