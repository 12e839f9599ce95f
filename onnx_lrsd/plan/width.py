"""Width plans: how many channels each coupled group keeps, which ones, and the consumers'
least-squares refits, from the consumers' calibration statistics.

The statistics of a group are its consumers' input rows (a k×k conv consumer's im2col rows:
one block of k² columns per channel); `onnx_lrsd.decompose.channels` does the maths.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np

from ..decompose.channels import (ConsumerStats, channel_order, refit_consumer, output_energy, select_channels,
                                  width_errors)
from ..decompose.stats import GramAccumulator
from ..model.channel_groups import ChannelGroup
from ..model.layers import LayerTarget
from ..model.narrow import ConsumerRefit, GroupPlan

__all__ = ["consumer_stats", "keep_count", "plan_group", "group_error_curve", "GroupCurve"]


def consumer_stats(target: LayerTarget, acc: GramAccumulator) -> ConsumerStats:
    """`ConsumerStats` of one consumer from its input Gram accumulator."""
    block = int(np.prod(target.conv.kernel_shape)) if target.conv is not None else 1
    return ConsumerStats(gram=np.asarray(acc.gram), total=acc.mean * acc.count, count=acc.count,
                         weight=target.matrix(), block=block)


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
    consumers = [stats[name] for name in group.consumers]
    if keep >= group.channels:
        return GroupPlan(group, np.arange(group.channels))
    kept = np.sort(order[:keep]) if order is not None else select_channels(consumers, keep, criterion)
    refits = ()
    if refit:
        refits = tuple(ConsumerRefit(name, *refit_consumer(stats[name], kept)) for name in group.consumers)
    return GroupPlan(group, kept, refits)


@dataclass(frozen=True)
class GroupCurve:
    """Relative output error (Σ consumers' refit error / Σ their output energy) at each width
    0..C, for channels taken in `order`."""

    group: str
    order: np.ndarray
    errors: np.ndarray


def group_error_curve(group: ChannelGroup, stats: Mapping[str, ConsumerStats], criterion: str = "greedy"
                      ) -> GroupCurve:
    """Closed-form error of every width of a group (nested selections of one criterion)."""
    consumers = [stats[name] for name in group.consumers]
    order = channel_order(consumers, criterion)
    errors = sum(width_errors(c, order) for c in consumers)
    energy = sum(output_energy(c) for c in consumers)
    return GroupCurve(group.name, order, errors / max(energy, 1e-300))
