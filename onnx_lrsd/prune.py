"""Structured width reduction of a model: find the coupled channel groups, collect their
consumers' input statistics on calibration data (onnxruntime), keep a fraction of every
group's channels and refit the consumers by least squares (`onnx_lrsd.plan.width`)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx

from .decompose.channels import CRITERIA, ConsumerStats, channel_order
from .errors import LrsdError
from .model.channel_groups import BlockedGroup, ChannelGroup, find_channel_groups, weight_target
from .model.graph import export_model, import_graph, model_template
from .model.narrow import GroupPlan, narrow_graph
from .plan.width import consumer_stats, keep_count, plan_group
from .runtime.activations import collect_statistics

log = logging.getLogger(__name__)

__all__ = ["PruneOptions", "PruneResult", "channel_groups", "channel_orders", "group_statistics", "prune_model"]


@dataclass(frozen=True)
class PruneOptions:
    """keep: fraction of each group's channels kept; criterion: energy | nystrom | greedy;
    refit: least-squares repair of the consumers (else plain cut); multiple: round widths of
    wide groups to this multiple; max_positions: conv positions sampled per batch."""

    keep: float = 0.5
    criterion: str = "greedy"
    refit: bool = True
    multiple: int = 1
    max_positions: int = 4096
    mask_input: Optional[str] = None

    def __post_init__(self) -> None:
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
    """The model's coupled channel groups and the blocked ones (with reasons)."""
    return find_channel_groups(import_graph(model))


def group_statistics(model: onnx.ModelProto, groups: Sequence[ChannelGroup], batches: Sequence[Mapping],
                     mask_input: Optional[str] = None, max_positions: int = 4096) -> Dict[str, ConsumerStats]:
    """Every consumer's input statistics, one onnxruntime pass over `batches`."""
    graph = import_graph(model)
    nodes = {n.name: n for n in graph.nodes}
    targets = [weight_target(nodes[name], graph) for g in groups for name in g.consumers]
    stats = collect_statistics(model, targets, batches, mask_input=mask_input, max_positions=max_positions)
    return {t.name: consumer_stats(t, stats[t.name].fit) for t in targets}


def channel_orders(groups: Sequence[ChannelGroup], stats: Mapping[str, ConsumerStats], criterion: str
                   ) -> Dict[str, np.ndarray]:
    """Every group's channels in the order `criterion` keeps them (the first k: width k)."""
    return {g.name: channel_order([stats[c] for c in g.consumers], criterion) for g in groups}


def prune_model(model: onnx.ModelProto, batches: Sequence[Mapping], options: PruneOptions = PruneOptions(),
                stats: Optional[Dict[str, ConsumerStats]] = None, widths: Optional[Mapping[str, int]] = None,
                orders: Optional[Mapping[str, np.ndarray]] = None) -> PruneResult:
    """Narrow every channel group of `model` to `options.keep` of its channels (or to
    `widths[group]` where given); `stats` from `group_statistics` and channel `orders` (per
    group, `channel_orders`) may be passed in to reuse them across widths."""
    graph = import_graph(model)
    groups, blocked = find_channel_groups(graph)
    if not groups:
        raise LrsdError("no channel group can be narrowed in this model"
                        + (f" (e.g. {blocked[0].name}: {blocked[0].reason})" if blocked else ""))
    if stats is None:
        stats = group_statistics(model, groups, batches, options.mask_input, options.max_positions)
    plans = []
    for group in groups:
        keep = (widths or {}).get(group.name, keep_count(group.channels, options.keep, options.multiple))
        plans.append(plan_group(group, stats, keep, options.criterion, options.refit, (orders or {}).get(group.name)))
        log.info("%s: %d of %d channels", group.name, plans[-1].width, group.channels)
    narrow_graph(graph, plans)
    narrowed = export_model(graph, model_template(model))
    del narrowed.graph.value_info[:]
    return PruneResult(narrowed, tuple(plans), tuple(blocked))
