"""Run the original and the compressed model in onnxruntime on the same inputs."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from ..runtime.calibrate import split_holdout
from ..runtime.bench import outputs_on, relative_output_errors
from ..runtime.feeds import random_feeds
from ..model.graph import export_model

from .base import Pass, PassResult
from .context import PassContext


UNHELD_BATCHES = 2
"""Calibration batches verified on when none are held out."""


def verification_batches(ctx: PassContext):
    """(batches, what they are) the outputs are compared on: see `VerifyOutputsPass`."""
    config = ctx.config
    held_out = split_holdout(ctx.calibration, config.holdout_every).held_out
    if held_out:
        return held_out, "held-out calibration batches"
    if ctx.calibration:
        return ctx.calibration[:UNHELD_BATCHES], ("the calibration data the layers were fitted on (none held out: "
                                                  "give more than one batch of samples)")
    return [random_feeds(ctx.source, batch=config.verify_batch, dims=dict(config.dims), seed=config.seed)], "random inputs"


def reference_outputs(ctx: PassContext):
    """The original model's outputs on the verification batches."""
    return outputs_on(ctx.source, verification_batches(ctx)[0])


class VerifyOutputsPass(Pass):
    """Fills `ctx.output_errors`: ‖y − y′‖ / ‖y‖ per graph output, over the held-out
    calibration batches when there are any, else over the first calibration batches (seen by
    the fit), else on seeded random inputs (batch `config.verify_batch`, symbolic dims from
    `config.dims`); `ctx.verified_on` says which. The original's outputs are taken from
    `ctx.reference_outputs` when set (computed before the fits for a memory-mapped model)."""

    name = "verify_outputs"
    requires = ("cleanup_graph",)

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        batches, ctx.verified_on = verification_batches(ctx)
        names = [o.name for o in ctx.source.graph.output]
        # before the export: the two models are never in memory together
        reference = ctx.reference_outputs if ctx.reference_outputs is not None else outputs_on(ctx.source, batches)
        compressed = export_model(graph, ctx.template, ctx.sparse_initializers)
        ctx.output_errors = relative_output_errors(reference, outputs_on(compressed, batches), names)
        return PassResult(graph, modified=False, stats={"outputs": len(names), "batches": len(batches)})

