"""A compression run with ``method="prune+lowrank"``: channel-group widths and low-rank
factorizations chosen in one global allocation (`onnx_lrsd.plan.width_and_rank`; with
``method="prune"`` and a latency, error or metric target, the same allocation over widths
alone), then
executed narrow-first: the groups narrowed to their widths and their readers refitted
(`passes.prune.prune_model`, in sequence with ``mode="sequential"``), then every layer given a
rank factorized at that rank on the narrowed model (a low-rank run with the ranks forced,
fitted on the narrowed model's feature maps).

The allocation draws on the low-rank run's preparation (targets, statistics, error curves,
sensitivities, per-candidate latency; `passes.allocate_budget`) and on the groups' refit error
curves and probed sensitivities (`passes.prune`). Its targets are the run's: params or MACs
(counted as the report counts them), a speedup measured in onnxruntime, an output error or a
user metric; the last three go through the rounds of `passes.search`, each correcting the
prediction by what the written model measured.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx
from threadpoolctl import threadpool_limits

from ..config import PRUNE_AND_LOW_RANK, CompressConfig, LayerOverride
from ..errors import LrsdError
from ..model.fuse import fuse_elementwise
from ..model.graph import import_graph, resolve_constant
from ..model.io import load_model
from ..parallel.executor import executor_for
from ..parallel.tasks import error_curves
from ..plan.allocate import UNIT
from ..plan.candidates import LayerCandidate
from ..plan.cost import count_params, model_macs, node_macs, unresolved_dims
from ..plan.width import group_error_curve, width_options
from ..plan.width_and_rank import RankUnit, WidthRankAllocation, WidthUnit, allocate_width_and_rank, width_units
from ..report.types import AllocationSummary, CompressionReport, GroupWidth
from ..runtime.bench import output_errors_on
from ..runtime.calibrate import calibration_batches, split_holdout
from .allocate_budget import candidate_ms, layer_sensitivities, macs_scale
from .context import PassContext, new_context
from .pipeline import prepare
from .prune import (PruneOptions, channel_groups, channel_orders, depthwise_macs, group_sensitivities,
                    group_statistics, prune_model)
from .verify_outputs import verification_batches
from .search import CompressionResult, Metric, compress_model, macs_dims, model_stats, to_error, to_latency, to_metric

log = logging.getLogger(__name__)

MATMUL_WIDTH_MULTIPLE = 8
"""Widths of MatMul / Gemm channel groups are multiples of this (conv groups: `conv_rank_multiple`)."""

TARGET_SLACK = 0.002
"""A params / MACs target is met within this share of the model's total."""

LOW_RANK_KINDS = ("svd", "channel", "spatial")
"""Factorization kinds the allocation offers (one rank each: a forced rank executes them)."""

__all__ = ["compress_width_and_rank", "WidthRankProblem"]


@dataclass(frozen=True)
class WidthRankProblem:
    """The allocation's units in one cost (params, MACs at the run's dims, or milliseconds):
    `total` of the model, `fixed` the part no unit holds."""

    field: str
    groups: Tuple[WidthUnit, ...]
    layers: Tuple[RankUnit, ...]
    total: float
    fixed: float


class _Run:
    """The state found once: the low-rank preparation (`ctx`, `prepared`), the groups with
    their statistics, channel orders, error curves and sensitivities, the layers' candidates
    (`curves`, tucker2 left out) and sensitivities, and the problems built so far per cost."""

    def __init__(self, ctx: PassContext, prepared, config: CompressConfig, low_rank: bool = True):
        self.ctx, self.prepared, self.config = ctx, prepared, config
        self.source = ctx.source
        self.batches = ctx.calibration
        self.fit = split_holdout(self.batches, config.holdout_every).fit or self.batches
        self.dims = macs_dims(self.source, config, self.batches)
        self.graph = import_graph(self.source)
        self.groups, self.blocked = channel_groups(self.source)
        if not self.groups:
            raise LrsdError("no channel group can be narrowed in this model"
                            + (f" (e.g. {self.blocked[0].name}: {self.blocked[0].reason})" if self.blocked else ""))
        self.prune = PruneOptions(criterion=config.width_criterion, mask_input=config.mask_input,
                                  max_positions=config.conv_positions, sequential=config.mode == "sequential")
        self.stats = group_statistics(self.source, self.groups, self.fit, config.mask_input, config.conv_positions)
        self.orders = channel_orders(self.groups, self.stats, config.width_criterion)
        self.group_curves = {g.name: group_error_curve(g, self.stats, config.width_criterion, self.orders[g.name])
                             for g in self.groups}
        self.group_sensitivity = group_sensitivities(self.source, self.groups, self.stats, self.orders,
                                                     self.group_curves, self.fit, self.prune)
        names = list(ctx.allocatable) if low_rank else []
        requests = [(ctx.targets[n], np.asarray(ctx.statistics[n].fit.gram) if n in ctx.statistics else None)
                    for n in names]
        self.curves: Dict[str, List[LayerCandidate]] = {}
        for done, (name, curve) in enumerate(zip(names, error_curves(ctx.executor, requests, config)), 1):
            self.curves[name] = [c for c in curve if c.method in LOW_RANK_KINDS]
            ctx.report_progress("error curves", done, len(names))
        ctx.curves.update(self.curves)
        self.probed = config.sensitivity and bool(self.batches)
        if self.probed and names:
            ctx.sensitivities.update(layer_sensitivities(prepared, ctx, self.curves))
        self.sensitivity = {n: ctx.sensitivities.get(n, UNIT) if self.probed else UNIT for n in names}
        self.problems: Dict[str, WidthRankProblem] = {}
        self.executed: Dict[int, Tuple[WidthRankAllocation, Optional[CompressionReport]]] = {}

    # ---------------------------------------------------------------- costs
    def problem(self, field: str) -> WidthRankProblem:
        if field not in self.problems:
            self.problems[field] = self._problem(field)
        return self.problems[field]

    def _problem(self, field: str) -> WidthRankProblem:
        """Units costed in `field`: params, MACs (at the run's dims) or ms (measured dense and
        candidate latencies; layers and depthwise convs not measured at the rest's ms per MAC)."""
        ctx, groups = self.ctx, self.groups
        targets = ctx.targets
        nodes = {n.name: n for n in self.graph.nodes}
        counted = node_macs(self.source, self.dims)
        scale = macs_scale(ctx)
        macs = {name: t.macs * scale.get(name, 1.0) for name, t in targets.items()}
        reads = {c: g.name for g in groups for c in g.consumers if g.read_at(c) == (0, g.channels)}
        parts: Dict[str, List[Tuple[str, float]]] = {}  # readers of a channel Concat: (group, share of the input)
        for g in groups:
            for c in g.consumers:
                if c not in reads:
                    parts.setdefault(c, []).append((g.name, g.channels / g.read_at(c)[1]))
        writes = {p: g.name for g in groups for p in g.producers}
        total_macs = float(model_macs(self.source, self.dims))
        times, rate = {}, 0.0
        if field == "ms":
            original_ms, times = candidate_ms(ctx, list(self.curves), self.curves)
            measured_macs = sum(macs[n] for n in times)
            rate = max(original_ms - sum(t[0] for t in times.values()), 0.0) / max(total_macs - measured_macs, 1.0)
            total = original_ms
        else:
            total = float(count_params(self.source)) if field == "params" else total_macs
        layers = []
        for name, t in targets.items():
            candidates = self.curves.get(name, [])
            damages = tuple(self.sensitivity[name].at(c.error) for c in candidates)
            if field == "params":
                dense, costs = float(t.params), tuple(float(c.cost.params) for c in candidates)
            elif field == "macs":
                factor = scale.get(name, 1.0)
                dense, costs = macs[name], tuple(c.cost.macs * factor for c in candidates)
            elif name in times:
                dense, costs = float(times[name][0]), tuple(float(ms) for ms in times[name][1])
            else:  # not allocatable, not measured
                dense, costs, damages = macs[name] * rate, (), ()
            layers.append(RankUnit(name, t.in_features, t.out_features, dense, costs, damages, reads.get(name),
                                   writes.get(name), tuple(parts.get(name, ()))))
        per_channel = {}
        for group in groups:
            # members no unit costs, with the share of them the group holds (a Concat reader: its rows of the group)
            members = {m: group.channels / group.read_at(m)[1] if m in group.consumers else 1.0
                       for m in dict.fromkeys(group.producers + group.consumers) if m not in targets}
            if field == "params":
                weights = {targets[n].weight_tensor for n in group.producers + group.consumers if n in targets}
                sizes = {}
                for p in dict.fromkeys(group.params):
                    tensor = nodes[p.node].inputs[p.index]
                    if tensor.name not in weights:
                        sizes[tensor.name] = int(resolve_constant(tensor).values.size)
                for m, share in members.items():
                    sizes[nodes[m].inputs[1].name] = resolve_constant(nodes[m].inputs[1]).values.size * share
                per_channel[group.name] = sum(sizes.values()) / group.channels
            else:
                held = depthwise_macs(self.graph, group, counted) + \
                    sum(counted.get(m, 0) * share for m, share in members.items())
                per_channel[group.name] = held / group.channels * (rate if field == "ms" else 1.0)
        widths = {g.name: width_options(g.channels, self._multiple(g)) for g in groups}
        units = width_units({g.name: self.group_curves[g.name].errors for g in groups}, self.group_sensitivity,
                            per_channel, widths)
        held = sum(u.cost_per_channel * u.channels for u in units) + sum(u.dense for u in layers)
        return WidthRankProblem(field, tuple(units), tuple(layers), total, total - held)

    def _multiple(self, group) -> int:
        if group.block > 1:
            return 1
        return self.config.conv_rank_multiple if group.channel_first else MATMUL_WIDTH_MULTIPLE

    # ---------------------------------------------------------------- rounds
    def allocate(self, config: CompressConfig, correction: float) -> Tuple[WidthRankAllocation, float, bool]:
        """(allocation, predicted value of the target, capped) for `config.target`."""
        kind, value = config.target
        if kind == "error":
            problem = self.problem("params")
            found = allocate_width_and_rank(problem.groups, problem.layers, max_damage=(correction * value) ** 2)
            return found, float(np.sqrt(found.damage)), False
        problem = self.problem({"latency": "ms"}.get(kind, kind))
        if kind == "latency":
            budget = problem.total / (value * correction) - problem.fixed
        else:
            budget = value * problem.total - problem.fixed
        found = allocate_width_and_rank(problem.groups, problem.layers, budget=budget)
        whole = problem.fixed + found.cost
        if kind == "latency":
            return found, problem.total / max(whole, 1e-12), not found.reached
        if not found.reached:
            raise LrsdError(f"target {kind} {value:g} is unreachable: the smallest allocation of widths and ranks "
                            f"keeps {whole / problem.total:.3f}")
        return found, whole / problem.total, False

    def execute(self, found: WidthRankAllocation) -> Tuple[onnx.ModelProto, Optional[CompressionReport]]:
        """The narrowed model at `found.widths`, then its layers factorized at `found.choices`
        (a choice that no longer saves params on the narrowed layer leaves it dense)."""
        narrowed = prune_model(self.source, self.fit, self.prune, stats=None if self.prune.sequential else self.stats,
                               widths=found.widths, orders=None if self.prune.sequential else self.orders).model
        if self.config.fuse_elementwise:
            narrowed = fuse_elementwise(narrowed)
        units = {u.name: u for u in self.problem("params").layers}
        scale = {g.name: found.widths[g.name] / g.channels for g in self.groups}
        overrides = []
        for name, choice in found.choices.items():
            if not choice:
                continue
            unit, candidate = units[name], self.curves[name][choice - 1]
            a, b = unit.in_scale(lambda g: scale.get(g, 1.0)), scale.get(unit.out_group, 1.0)
            n, m = unit.in_features, unit.out_features
            if candidate.cost.params * (a * n + b * m) / (n + m) < unit.dense * a * b:
                overrides.append(LayerOverride(name, rank=int(candidate.ranks[0]), method=candidate.method))
        if not overrides:
            return narrowed, None
        config = self.config.replace(
            method="auto", overrides=tuple(overrides) + (LayerOverride("*", skip=True),), target_params=None,
            target_macs=None, target_latency=None, max_error=None, max_metric_drop=None, metric_command=None,
            verify=False, max_output_error=None, recover=None, recover_time=None, then_quantize=None, stages=1)
        result = compress_model(narrowed, config, self.batches)
        return result.model, result.report

    def round(self, prepared, ctx: PassContext, correction: float = 1.0, **changes):
        """One allocation and its execution, as `passes.pipeline.run_round` (for `passes.search`)."""
        round_ctx = ctx.next_round(**changes)
        config = round_ctx.config
        kind, value = config.target
        found, predicted, capped = self.allocate(config, correction)
        model, inner = self.execute(found)
        factorized = sum(1 for c in found.choices.values() if c)
        round_ctx.allocation = AllocationSummary(
            target=kind, value=float(value), predicted=float(predicted), predicted_error=float(np.sqrt(found.damage)),
            layers=len(self.curves), factorized=factorized, sensitivity=self.probed, batch=config.latency_batch,
            threads=config.latency_threads, capped=capped)
        narrowed = sum(1 for g in self.groups if found.widths[g.name] < g.channels)
        log.info("width and rank allocation for %s %g: %d of %d groups narrowed, %d of %d layers factorized, "
                 "predicted %.4g", kind, value, narrowed, len(self.groups), factorized, len(self.curves), predicted)
        if config.verify:
            check, round_ctx.verified_on = verification_batches(round_ctx)
            round_ctx.output_errors = output_errors_on(self.source, model, check,
                                                       [o.name for o in self.source.graph.output])
        self.executed[id(model)] = (found, inner)
        return round_ctx, model


def compress_width_and_rank(model, config: CompressConfig, calibration=None, progress=None,
                            metric: Optional[Metric] = None,
                            max_metric_drop: Optional[float] = None) -> CompressionResult:
    """A run with ``method="prune+lowrank"`` (or ``"prune"``: widths alone): one allocation of
    group widths and layer ranks for the config's target (params, MACs, latency, error) or the
    metric search, executed narrow-first. The report lists the widths (`widths`) and the
    low-rank layers of the narrowed model (`layers`); params / MACs / output errors are against
    the original. Layers a skip override names stay dense (they are no candidates)."""
    start = time.perf_counter()
    method = config.method
    if config.stages > 1 or config.recovers or config.then_quantize is not None:
        raise LrsdError(f"method {method} takes a target or the metric search (no stages, recovery or "
                        "quantization yet)")
    if any(not o.skip for o in config.overrides):
        raise LrsdError(f"method {method} allocates every layer itself: only --skip overrides apply")
    if metric is None and config.target is None:
        raise LrsdError(f"method {method} needs a target: --target-params, --target-macs, --target-latency, "
                        "--max-error or a metric")
    source = load_model(model)
    run_config = config.replace(method="auto", **({"target_params": 1.0} if metric is not None else {}))
    ctx = new_context(source, run_config, progress)
    ctx.calibration = calibration_batches(calibration, source, config)
    if not ctx.calibration:
        raise LrsdError(f"method {method} needs calibration data: the readers of narrowed groups are refitted on it")
    with executor_for(config) as ctx.executor, threadpool_limits(limits=config.blas_threads, user_api="blas"):
        prepared = prepare(ctx)
        run = _Run(ctx, prepared, run_config, low_rank=method == PRUNE_AND_LOW_RANK)
        kind = run_config.target[0]
        if metric is not None:
            round_ctx, compressed = to_metric(prepared, ctx, metric, max_metric_drop, round_fn=run.round)
        elif kind == "latency":
            round_ctx, compressed = to_latency(prepared, ctx, round_fn=run.round)
        elif kind == "error" and config.verify:
            round_ctx, compressed = to_error(prepared, ctx, round_fn=run.round)
        else:
            round_ctx, compressed = run.round(prepared, ctx)
    found, inner = run.executed[id(compressed)]
    dims = run.dims
    before, after = model_stats(source, dims), model_stats(compressed, dims)
    if kind in ("params", "macs") and metric is None:
        _check_met(kind, run_config.target[1], after, before)
    widths = tuple(GroupWidth(g.name, "heads" if g.block > 1 else "channels", g.channels, found.widths[g.name])
                   for g in run.groups)
    report = CompressionReport(
        before=before, after=after, layers=inner.layers if inner else (), skipped=tuple(ctx.skipped),
        macs_unresolved=unresolved_dims(source, dims), output_errors=dict(round_ctx.output_errors),
        seconds=time.perf_counter() - start, config=dataclasses.asdict(config), allocation=round_ctx.allocation,
        verified_on=round_ctx.verified_on, widths=widths)
    return CompressionResult(compressed, report)


def _check_met(kind: str, value: float, after, before) -> None:
    """A params / MACs target the written model misses by more than `TARGET_SLACK` is said."""
    got = after.params / before.params if kind == "params" else after.macs / max(before.macs, 1)
    if got > value + TARGET_SLACK:
        log.warning("target %s %g missed: the written model keeps %.3f (the cost model's prediction was off)",
                    kind, value, got)

