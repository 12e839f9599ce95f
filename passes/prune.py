"""Structured width reduction of a model: find the coupled channel groups, collect their
consumers' input statistics on calibration data (onnxruntime), keep a fraction of every
group's channels and refit the consumers by least squares (`onnx_lrsd.plan.width`)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx

from ..decompose.channels import CRITERIA, ConsumerStats, channel_order
from ..errors import LrsdError
from ..model.channel_groups import BlockedGroup, ChannelGroup, find_channel_groups, find_head_groups, weight_target
from ..model.fuse import fuse_elementwise
from ..model.graph import export_model, import_graph, model_template, resolve_constant
from ..model.io import default_opset
from ..model.narrow import GroupPlan, narrow_graph
from ..plan.width import (GroupCost, GroupCurve, allocate_widths, consumer_stats, group_consumers, group_cost,
                         group_error_curve, keep_count, plan_group)
from ..runtime.activations import collect_statistics

log = logging.getLogger(__name__)

CORRECTION_ROUNDS = 6
"""Allocations tried for a params / MACs target, each asking the shortfall of the last one more
(over the share of its predicted saving the last one achieved)."""

TARGET_SLACK = 0.002
"""A params / MACs target is met within this share of the model's total."""

__all__ = ["PruneOptions", "PruneResult", "channel_groups", "channel_orders", "group_statistics", "prune_model",
           "group_sensitivities", "group_costs"]


@dataclass(frozen=True)
class PruneOptions:
    """keep: fraction of each group's channels kept; criterion: energy | nystrom | greedy;
    refit: least-squares repair of the consumers (else plain cut); multiple: round widths of
    wide groups to this multiple; max_positions: conv positions sampled per batch;
    heads: narrow attention heads too (else only channel groups);
    sequential: narrow the groups one after another in graph order, each chosen and refitted
    on the inputs the partly narrowed model gives its readers, to reproduce the original's;
    target_params / target_macs: instead of one keep, the widths whose predicted damage is
    least for the model's params (MACs) at this fraction (`allocate_widths`), each group's
    damage scaled by its sensitivity measured in onnxruntime at `probe_keep`; dims: the
    symbolic input dims MACs are counted at (as the report counts them)."""

    keep: float = 0.5
    criterion: str = "greedy"
    refit: bool = True
    multiple: int = 1
    max_positions: int = 4096
    mask_input: Optional[str] = None
    heads: bool = True
    sequential: bool = False
    target_params: Optional[float] = None
    target_macs: Optional[float] = None
    probe_keep: float = 0.5
    dims: Tuple[Tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        for name in ("target_params", "target_macs"):
            value = getattr(self, name)
            if value is not None and not 0 < value < 1:
                raise LrsdError(f"{name} must be in (0, 1), got {value}")
        if self.target_params is not None and self.target_macs is not None:
            raise LrsdError("give one of target_params and target_macs")
        if not 0 < self.keep <= 1:
            raise LrsdError(f"--keep must be in (0, 1], got {self.keep}")
        if self.criterion not in CRITERIA:
            raise LrsdError(f"criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")


@dataclass(frozen=True)
class PruneResult:
    model: onnx.ModelProto
    plans: Tuple[GroupPlan, ...]
    blocked: Tuple[BlockedGroup, ...]


def channel_groups(model: onnx.ModelProto) -> Tuple[List[ChannelGroup], List[BlockedGroup]]:
    """The model's coupled channel groups and attention-head groups, and the blocked ones
    (with reasons; a projection blocked as channels but narrowed as heads is not listed)."""
    return _groups(import_graph(model), model)


def _groups(graph, model: onnx.ModelProto):
    opset = default_opset(model) or 17
    groups, blocked = find_channel_groups(graph)
    heads, heads_blocked = find_head_groups(graph, opset)
    in_heads = {name for g in heads for name in g.producers + g.consumers}
    blocked = [b for b in blocked if not in_heads.intersection(b.producers)] + heads_blocked
    return groups + heads, blocked


def group_statistics(model: onnx.ModelProto, groups: Sequence[ChannelGroup], batches: Sequence[Mapping],
                     mask_input: Optional[str] = None, max_positions: int = 4096) -> Dict[str, ConsumerStats]:
    """Every consumer's input statistics, one onnxruntime pass over `batches`."""
    graph = import_graph(model)
    nodes = {n.name: n for n in graph.nodes}
    blocks = {name: g.block for g in groups for name in g.consumers}
    targets = [weight_target(nodes[name], graph) for name in blocks]
    stats = collect_statistics(model, targets, batches, mask_input=mask_input, max_positions=max_positions)
    return {t.name: consumer_stats(t, stats[t.name].fit, blocks[t.name]) for t in targets}


def channel_orders(groups: Sequence[ChannelGroup], stats: Mapping[str, ConsumerStats], criterion: str
                   ) -> Dict[str, np.ndarray]:
    """Every group's channels in the order `criterion` keeps them (the first k: width k)."""
    return {g.name: channel_order(group_consumers(g, stats), criterion) for g in groups}


def prune_model(model: onnx.ModelProto, batches: Sequence[Mapping], options: PruneOptions = PruneOptions(),
                stats: Optional[Dict[str, ConsumerStats]] = None, widths: Optional[Mapping[str, int]] = None,
                orders: Optional[Mapping[str, np.ndarray]] = None) -> PruneResult:
    """Narrow every channel group of `model` to `options.keep` of its channels (or to
    `widths[group]` where given); `stats` from `group_statistics` and channel `orders` (per
    group, `channel_orders`) may be passed in to reuse them across widths."""
    graph = import_graph(model)
    groups, blocked = _groups(graph, model)
    if not options.heads:
        groups = [g for g in groups if g.block == 1]
    if not groups:
        raise LrsdError("no channel group can be narrowed in this model"
                        + (f" (e.g. {blocked[0].name}: {blocked[0].reason})" if blocked else ""))
    targeted = widths is None and (options.target_params or options.target_macs)
    if stats is None and (targeted or not options.sequential):
        stats = group_statistics(model, groups, batches, options.mask_input, options.max_positions)
    if targeted:
        if orders is None:
            orders = channel_orders(groups, stats, options.criterion)
        widths = target_widths(model, graph, groups, stats, orders, batches, options)
    keeps = {g.name: (widths or {}).get(g.name, keep_count(g.channels, options.keep, options.multiple))
             for g in groups}
    if options.sequential:
        return _prune_sequentially(model, groups, blocked, keeps, batches, options)
    plans = []
    for group in groups:
        plans.append(plan_group(group, stats, keeps[group.name], options.criterion, options.refit,
                                (orders or {}).get(group.name)))
        log.debug("%s: %d of %d channels", group.name, plans[-1].width, group.channels)
    return PruneResult(_narrowed(model, graph, plans), tuple(plans), tuple(blocked))


def _narrowed(model: onnx.ModelProto, graph, plans: Sequence[GroupPlan]) -> onnx.ModelProto:
    narrow_graph(graph, plans)
    narrowed = export_model(graph, model_template(model))
    del narrowed.graph.value_info[:]
    return narrowed


def _prune_sequentially(model: onnx.ModelProto, groups: Sequence[ChannelGroup], blocked, keeps: Mapping[str, int],
                        batches: Sequence[Mapping], options: PruneOptions) -> PruneResult:
    """Groups narrowed one at a time in graph order; each group's readers are chosen and
    refitted on paired statistics (their input in the current model, X̂, against the
    original's, X: `collect_paired_statistics`), so later groups repair earlier damage."""
    from ..runtime.activations import collect_paired_statistics

    current, plans = model, []
    for group in groups:
        if keeps[group.name] >= group.channels:
            plans.append(GroupPlan(group, np.arange(group.channels)))
            continue
        graph = import_graph(current)
        group = {g.name: g for g in _groups(graph, current)[0]}[group.name]  # earlier refits may add biases
        nodes = {n.name: n for n in graph.nodes}
        targets = [weight_target(nodes[name], graph) for name in group.consumers]
        paired = collect_paired_statistics(model, current, targets, batches, mask_input=options.mask_input,
                                           max_positions=options.max_positions,
                                           columns=_original_columns(targets, groups, plans))
        stats = {t.name: consumer_stats(t, paired[t.name].fit, group.block) for t in targets}
        plan = plan_group(group, stats, keeps[group.name], options.criterion, options.refit)
        plans.append(plan)
        current = _narrowed(current, graph, [plan])
        log.info("%s: %d of %d channels (sequential)", group.name, plan.width, group.channels)
    return PruneResult(current, tuple(plans), tuple(blocked))


def _original_columns(targets, groups: Sequence[ChannelGroup], plans: Sequence[GroupPlan]) -> Dict[str, np.ndarray]:
    """For a reader of a channel Concat whose other parts earlier plans narrowed: the input
    features (im2col columns) of the original reader that its current inputs are (`groups`
    as found on the original model, so offsets are the original's)."""
    original = {g.name: g for g in groups}
    columns = {}
    for target in targets:
        dropped, channels = [], None
        for plan in plans:
            group = original[plan.group.name]
            if target.name in group.consumers and plan.width < group.channels:
                offset, channels = group.read_at(target.name)
                dropped.append(offset + np.setdiff1d(np.arange(group.channels), plan.kept))
        if dropped:
            block = int(np.prod(target.conv.kernel_shape)) if target.conv is not None else 1
            kept = np.setdiff1d(np.arange(channels), np.concatenate(dropped))
            columns[target.name] = (kept[:, None] * block + np.arange(block)).reshape(-1)
    return columns


def group_costs(graph, groups: Sequence[ChannelGroup], macs: Optional[Mapping[str, int]] = None
                ) -> Dict[str, GroupCost]:
    """Params and MACs per channel of every group (`plan.width.GroupCost`); `macs`: MACs per
    node at the run's dims (`plan.cost.node_macs`), else batch 1 with symbolic dims 1."""
    nodes = {n.name: n for n in graph.nodes}
    costs = {}
    for group in groups:
        targets = {name: _resolved(weight_target(nodes[name], graph), macs)
                   for name in group.producers + group.consumers}
        sizes = {}
        for p in dict.fromkeys(group.params):
            resolved = resolve_constant(nodes[p.node].inputs[p.index])
            sizes[(p.node, p.index)] = int(resolved.values.size)
        costs[group.name] = group_cost(group, targets, sizes, depthwise_macs(graph, group, macs))
    return costs


def depthwise_macs(graph, group: ChannelGroup, macs: Optional[Mapping[str, int]] = None) -> float:
    """MACs of the group's depthwise convs at full width (`macs` per node where given)."""
    nodes = {n.name: n for n in graph.nodes}
    total = 0.0
    for name in group.depthwise:
        if macs is not None and name in macs:
            total += float(macs[name])
            continue
        node = nodes[name]
        shape = node.outputs[0].shape
        positions = np.prod([d for d in (shape or [])[2:] if isinstance(d, (int, np.integer))] or [1])
        kernel = resolve_constant(node.inputs[1]).values.shape[2:]
        total += float(positions * np.prod(kernel) * group.channels)
    return total


def _resolved(target, macs: Optional[Mapping[str, int]]):
    """`target` with its rows at the run's dims (from its node's MACs), where known."""
    import dataclasses

    if macs is None or target.name not in macs or target.width <= 0:
        return target
    return dataclasses.replace(target, rows=max(1, round(macs[target.name] / target.width)))


def _output_error(sessions_outputs, reference) -> float:
    """Squared relative error of all outputs, summed over the batches."""
    num = sum(float(np.sum((np.asarray(a, np.float64) - b) ** 2)) for out, ref in zip(sessions_outputs, reference)
              for a, b in zip(out, ref))
    den = sum(float(np.sum(b ** 2)) for ref in reference for b in ref)
    return num / max(den, 1e-300)


def _run(model: onnx.ModelProto, batches: Sequence[Mapping]) -> List[List[np.ndarray]]:
    from ..runtime.activations import ActivationRunner

    names = [o.name for o in model.graph.output]
    runner = ActivationRunner(model, names)
    return [[np.asarray(v, np.float64) for v in runner.run(feeds).values()] for feeds in batches]


def group_sensitivities(model: onnx.ModelProto, groups: Sequence[ChannelGroup], stats: Mapping[str, ConsumerStats],
                        orders: Mapping[str, np.ndarray], curves: Mapping[str, GroupCurve], batches: Sequence[Mapping],
                        options: PruneOptions) -> Dict[str, float]:
    """Each group's sensitivity: the measured squared relative output error of the model with
    that group alone narrowed to `options.probe_keep` (on the first two batches), over its
    predicted (curve) error there. A group too narrow to probe is left out (1 by default)."""
    probes = batches[:2]
    reference = _run(model, probes)
    sensitivity = {}
    for group in groups:
        k = keep_count(group.channels, options.probe_keep, options.multiple)
        if k >= group.channels:
            continue
        alone = {g.name: g.channels for g in groups}
        alone[group.name] = k
        probe = prune_model(model, probes, PruneOptions(criterion=options.criterion, refit=options.refit,
                                                        multiple=options.multiple), stats=stats, widths=alone,
                            orders=orders).model
        measured = _output_error(_run(probe, probes), reference)
        sensitivity[group.name] = measured / max(float(curves[group.name].errors[k]), 1e-30)
        log.info("%s: sensitivity %.3g", group.name, sensitivity[group.name])
    return sensitivity


def target_widths(model: onnx.ModelProto, graph, groups: Sequence[ChannelGroup], stats: Mapping[str, ConsumerStats],
                  orders: Mapping[str, np.ndarray], batches: Sequence[Mapping], options: PruneOptions
                  ) -> Dict[str, int]:
    """Per-group widths for `options.target_params` / `target_macs` (MACs at `options.dims`):
    error curves from the statistics, each group's sensitivity (`group_sensitivities`), then
    `allocate_widths`, the saving raised by the shortfall measured on the narrowed model over
    the share of its predicted saving that model achieved (a weight narrowed on both sides is
    counted twice by the linear costs, so the achieved share is below 1) for up to
    `CORRECTION_ROUNDS` allocations. A target still missed after them is an LrsdError."""
    from ..plan.cost import count_params, model_macs, node_macs

    kind, target = ("params", options.target_params) if options.target_params else ("macs", options.target_macs)
    dims = dict(options.dims)
    total = count_params(model) if kind == "params" else model_macs(model, dims)
    curves = {g.name: group_error_curve(g, stats, options.criterion, orders[g.name]) for g in groups}
    costs = group_costs(graph, groups, node_macs(model, dims) if kind == "macs" else None)
    sensitivity = group_sensitivities(model, groups, stats, orders, curves, batches, options)
    measure = count_params if kind == "params" else (lambda m: model_macs(m, dims))
    saving = (1 - target) * total
    for _ in range(CORRECTION_ROUNDS):
        try:
            widths = allocate_widths(curves, costs, saving, sensitivity, kind, options.multiple)
        except ValueError as exc:
            raise LrsdError(f"target_{kind} {target}: {exc}") from None
        narrowed = prune_model(model, batches[:2], PruneOptions(criterion=options.criterion, refit=False),
                               stats=stats, widths=widths, orders=orders).model
        kept = measure(narrowed)
        shortfall = kept - target * total
        if shortfall <= TARGET_SLACK * total:
            return widths
        predicted = sum((costs[g].params_saved if kind == "params" else costs[g].macs_saved)(k)
                        for g, k in widths.items())
        achieved = min(max((total - kept) / max(predicted, 1e-30), 0.25), 1.0)
        saving += shortfall / achieved
    raise LrsdError(f"target_{kind} {target} missed: the nearest width allocation keeps "
                    f"{measure(narrowed) / total:.3f} after {CORRECTION_ROUNDS} corrections")


def group_infos(model: onnx.ModelProto) -> Tuple[tuple, tuple]:
    """What `inspect` lists: (ChannelGroupInfo, …), (BlockedGroupInfo, …)."""
    from ..report.types import BlockedGroupInfo, ChannelGroupInfo

    groups, blocked = channel_groups(model)
    return (tuple(ChannelGroupInfo(g.name, "heads" if g.block > 1 else "channels", g.channels, g.block, g.producers,
                                   g.consumers, g.depthwise, g.residual_adds, g.concats) for g in groups),
            tuple(BlockedGroupInfo(b.name, b.channels, b.reason) for b in blocked))


def compress_widths(model, config, calibration) -> Tuple[onnx.ModelProto, "CompressionReport"]:
    """A compression run with ``method="prune"`` (`CompressConfig`): every coupled channel
    group and attention-head group keeps `config.keep` of its channels, or per-group widths
    meet `target_params` / `target_macs`; the readers are refitted on the calibration batches
    (held-out batches verify), group after group with `mode="sequential"`. Returns the model
    and its report."""
    import dataclasses
    import time

    from ..model.io import load_model
    from ..plan.cost import unresolved_dims
    from ..report.types import CompressionReport, GroupWidth
    from ..runtime.bench import output_errors_on
    from ..runtime.calibrate import calibration_batches, split_holdout
    from .search import macs_dims, model_stats

    start = time.perf_counter()
    if config.target is not None and config.target[0] not in ("params", "macs"):
        raise LrsdError(f"method prune takes keep, target_params or target_macs, not target_{config.target[0]}")
    source = load_model(model)
    batches = calibration_batches(calibration, source, config)
    if not batches:
        raise LrsdError("method prune needs calibration data: the layers reading the kept channels are refitted on it")
    fit, held = split_holdout(batches, config.holdout_every)
    dims = macs_dims(source, config, batches)
    options = PruneOptions(keep=config.keep, criterion=config.width_criterion, mask_input=config.mask_input,
                           max_positions=config.conv_positions, target_params=config.target_params,
                           target_macs=config.target_macs, sequential=config.mode == "sequential",
                           dims=tuple(sorted(dims.items())))
    result = prune_model(source, fit or batches, options)
    if config.fuse_elementwise:
        result = dataclasses.replace(result, model=fuse_elementwise(result.model))
    errors, verified_on = {}, ""
    if config.verify:
        check, verified_on = (held, "held-out calibration batches") if held else \
            (batches[:2], "calibration batches (none held out)")
        errors = output_errors_on(source, result.model, check, [o.name for o in source.graph.output])
    widths = tuple(GroupWidth(p.group.name, "heads" if p.group.block > 1 else "channels", p.group.channels, p.width)
                   for p in result.plans)
    report = CompressionReport(before=model_stats(source, dims), after=model_stats(result.model, dims), layers=(),
                               skipped=(), macs_unresolved=unresolved_dims(source, dims),
                               output_errors=errors, seconds=time.perf_counter() - start,
                               config=dataclasses.asdict(config), verified_on=verified_on, widths=widths)
    return result.model, report
