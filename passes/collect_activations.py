"""Stream calibration batches through onnxruntime into each target's input statistics."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from ..runtime.activations import memory_groups, statistics_bytes
from ..runtime.calibrate import has_held_out
from ..parallel.tasks import sharded_statistics

from .base import Pass, PassResult
from .context import PassContext


class CollectActivationsPass(Pass):
    """Fills `ctx.statistics` for the factorized targets (independent mode) and the targets a
    global allocation may factorize (`ctx.allocatable`, any mode) from the original model. Statistics that would exceed `stats_memory_mb` are collected in several passes over
    the data; a single layer over the cap is left to the data-free fit. The batches are sharded
    across the executor's workers and the partial statistics summed."""

    name = "collect_activations"
    requires = ("select_ranks",)

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        config = ctx.config
        if not ctx.calibration:
            return PassResult(graph, modified=False, stats={"layers": 0})
        wanted = set(ctx.allocatable)
        if config.mode != "sequential":  # sequential collects per wave
            wanted |= {p.name for p in ctx.plans.values() if p.factorized}
        targets = [t for name, t in ctx.targets.items() if name in wanted]
        if not targets:
            return PassResult(graph, modified=False, stats={"layers": 0})
        copies = 2 if has_held_out(len(ctx.calibration), config.holdout_every) else 1
        groups = memory_groups(targets, config.stats_memory_mb * 2**20,
                               lambda t: copies * statistics_bytes(t))
        batches = len(ctx.calibration)
        for index, group in enumerate(groups):
            def progress(done, total, index=index):
                ctx.report_progress("calibrate", index * batches + done, len(groups) * batches)

            found = sharded_statistics(ctx.executor, ctx.source, group, ctx.calibration,
                                       holdout_every=config.holdout_every, mask_input=config.mask_input,
                                       max_positions=config.conv_positions, seed=config.seed, progress=progress)
            ctx.statistics.update(found)
        return PassResult(graph, modified=False, stats={"layers": len(ctx.statistics), "passes": len(groups)})

