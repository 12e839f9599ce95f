"""Run the original and the compressed model in onnxruntime on the same inputs."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from onnx_lrsd.activations import split_holdout
from onnx_lrsd.bench import output_errors_on
from onnx_lrsd.feeds import random_feeds
from onnx_lrsd.graph import export_model

from .base import Pass, PassContext, PassResult


UNHELD_BATCHES = 2
"""Calibration batches verified on when none are held out."""


class VerifyOutputsPass(Pass):
    """Fills `ctx.output_errors`: ‖y − y′‖ / ‖y‖ per graph output, over the held-out
    calibration batches when there are any, else over the first calibration batches (seen by
    the fit), else on seeded random inputs (batch `config.verify_batch`, symbolic dims from
    `config.dims`); `ctx.verified_on` says which."""

    name = "verify_outputs"
    requires = ("cleanup_graph",)

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        batches, ctx.verified_on = verification_batches(ctx)
        names = [o.name for o in ctx.source.graph.output]
        compressed = export_model(graph, ctx.template, ctx.sparse_initializers)
        ctx.output_errors = output_errors_on(ctx.source, compressed, batches, names)
        return PassResult(graph, modified=False, stats={"outputs": len(names), "batches": len(batches)})


def verification_batches(ctx: PassContext):
    """(feed dicts, what they are): the batches `VerifyOutputsPass` verifies on."""
    config = ctx.config
    held_out = split_holdout(ctx.calibration, config.holdout_every)[1]
    if held_out:
        return held_out, "held-out calibration batches"
    if ctx.calibration:
        return ctx.calibration[:UNHELD_BATCHES], "calibration batches (none held out)"
    return [random_feeds(ctx.source, batch=config.verify_batch, dims=dict(config.dims), seed=config.seed)], \
        "random inputs"
