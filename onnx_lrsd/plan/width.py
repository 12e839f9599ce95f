"""Width plans: how many channels each coupled group keeps, which ones, and the consumers'
least-squares refits, from the consumers' calibration statistics.

The statistics of a group are its consumers' input rows (a k×k conv consumer's im2col rows:
one block of k² columns per channel); `onnx_lrsd.decompose.channels` does the maths.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Tuple

import numpy as np

from ..decompose.channels import (ConsumerStats, channel_order, refit_consumer, output_energy, select_channels,
                                  width_errors)
from ..decompose.stats import GramAccumulator
from ..model.channel_groups import ChannelGroup
from ..model.layers import LayerTarget
from ..model.narrow import ConsumerRefit, GroupPlan

__all__ = ["consumer_stats", "group_consumers", "keep_count", "plan_group", "group_error_curve", "GroupCurve",
           "GroupCost", "group_cost", "width_options", "allocate_widths"]


def group_cost(group: ChannelGroup, targets: Mapping[str, LayerTarget], param_sizes: Mapping[Tuple[str, int], int],
               depthwise_macs: float = 0.0) -> GroupCost:
    """`GroupCost` from the producers' and consumers' targets, the sizes of the group's sliced
    constants (`param_sizes[(node, input)]`) and the depthwise convs' MACs at full width."""
    C = group.channels
    share = {c: C / group.read_at(c)[1] for c in group.consumers}  # a Concat reader: the group's share of its input
    params = sum(size for key, size in param_sizes.items()) + \
        sum(targets[c].weight.size * share[c] for c in group.consumers)
    macs = sum(targets[p].macs for p in group.producers) + sum(targets[c].macs * share[c] for c in group.consumers)
    return GroupCost(group.name, C, params / C, (macs + depthwise_macs) / C)


def consumer_stats(target: LayerTarget, acc: GramAccumulator, channel_block: int = 1) -> ConsumerStats:
    """`ConsumerStats` of one consumer from its input Gram accumulator (`channel_block`
    features per channel, e.g. the head size, times a conv's kernel positions)."""
    block = channel_block * (int(np.prod(target.conv.kernel_shape)) if target.conv is not None else 1)
    cross = (np.asarray(acc.cross), acc.target_mean * acc.count) if acc.track_cross else (None, None)
    return ConsumerStats(gram=np.asarray(acc.gram), total=acc.mean * acc.count, count=acc.count,
                         weight=target.matrix(), block=block, cross=cross[0], target_total=cross[1])


def group_consumers(group: ChannelGroup, stats: Mapping[str, ConsumerStats]) -> List[ConsumerStats]:
    """Each consumer's statistics on the group's channels (`stats`: its whole input; a reader
    of a channel Concat sees the group's rows from its offset, `ConsumerStats.part`)."""
    out = []
    for name in group.consumers:
        offset, width = group.read_at(name)
        out.append(stats[name] if (offset, width) == (0, group.channels) else stats[name].part(offset, group.channels))
    return out


def keep_count(channels: int, fraction: float, multiple: int = 1) -> int:
    """Channels kept at `fraction` of `channels`, rounded to a multiple of `multiple` (when
    the group is that wide), at least 1 and at most `channels`."""
    if not 0 < fraction <= 1:
        raise ValueError(f"keep fraction must be in (0, 1], got {fraction}")
    k = fraction * channels
    if multiple > 1 and channels >= 2 * multiple:
        k = multiple * round(k / multiple)
    return int(min(channels, max(1, round(k))))


def plan_group(group: ChannelGroup, stats: Mapping[str, ConsumerStats], keep: int, criterion: str = "greedy",
               refit: bool = True, order: np.ndarray | None = None) -> GroupPlan:
    """Keep `keep` channels chosen by `criterion` over all consumers (or the first `keep` of a
    precomputed `order`); refit each consumer by least squares with an intercept (`refit`),
    or cut it plainly."""
    consumers = group_consumers(group, stats)
    if keep >= group.channels:
        return GroupPlan(group, np.arange(group.channels))
    kept = np.sort(order[:keep]) if order is not None else select_channels(consumers, keep, criterion)
    refits = ()
    if refit:
        refits = tuple(ConsumerRefit(name, *refit_consumer(part, kept)) for name, part in zip(group.consumers,
                                                                                               consumers))
    return GroupPlan(group, kept, refits)


@dataclass(frozen=True)
class GroupCurve:
    """Relative output error (Σ consumers' refit error / Σ their output energy) at each width
    0..C, for channels taken in `order`."""

    group: str
    order: np.ndarray
    errors: np.ndarray


def group_error_curve(group: ChannelGroup, stats: Mapping[str, ConsumerStats], criterion: str = "greedy",
                      order: np.ndarray | None = None) -> GroupCurve:
    """Closed-form error of every width of a group (nested selections of one criterion, or
    of a precomputed `order`)."""
    consumers = group_consumers(group, stats)
    order = channel_order(consumers, criterion) if order is None else order
    errors = sum(width_errors(c, order) for c in consumers)
    energy = sum(output_energy(c) for c in consumers)
    return GroupCurve(group.name, order, errors / max(energy, 1e-300))


@dataclass(frozen=True)
class GroupCost:
    """Params and MACs (batch 1; symbolic dims count 1) a group holds at full width, and the
    share that scales with its width: cost(k) = fixed + k · per_channel."""

    group: str
    channels: int
    params_per_channel: float
    macs_per_channel: float

    def params_saved(self, width: int) -> float:
        return (self.channels - width) * self.params_per_channel

    def macs_saved(self, width: int) -> float:
        return (self.channels - width) * self.macs_per_channel


def width_options(channels: int, multiple: int = 8) -> List[int]:
    """Candidate widths of a group: multiples of `multiple` (all widths when it is narrow), and full."""
    step = multiple if channels >= 2 * multiple else 1
    return sorted(set(range(step, channels, step)) | {channels})


def allocate_widths(curves: Mapping[str, GroupCurve], costs: Mapping[str, GroupCost], saving: float,
                    sensitivity: Mapping[str, float] | None = None, kind: str = "params",
                    multiple: int = 8) -> Dict[str, int]:
    """Each group's width for the least predicted damage Σ_g s_g · e_g(k_g) (e_g: the group's
    relative squared refit error, s_g: its measured sensitivity, 1 without) that saves at
    least `saving` params (or MACs) in total (`allocate.allocate_budget`). The costs are linear
    in each width, so a weight narrowed on both sides (a producer that also consumes) counts
    its corner twice: callers correct the saving by measuring (`prune.target_widths`)."""
    from .allocate import Option, allocate_budget

    names = list(curves)
    options, widths = [], []
    for name in names:
        cost, curve = costs[name], curves[name]
        scale = (sensitivity or {}).get(name, 1.0)
        ks = width_options(cost.channels, multiple)
        per = cost.params_saved if kind == "params" else cost.macs_saved
        options.append([Option(cost=-per(k), damage=scale * float(curve.errors[k])) for k in ks])
        widths.append(ks)
    total = sum(max(-o.cost for o in layer) for layer in options)
    if saving > total:
        raise ValueError(f"width reduction can save at most {total:.0f} {kind}, {saving:.0f} asked")
    allocation = allocate_budget(options, -saving)
    return {name: widths[i][c] for i, (name, c) in enumerate(zip(names, allocation.choice))}
