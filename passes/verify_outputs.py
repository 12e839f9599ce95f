"""Run the original and the compressed model in onnxruntime on the same inputs."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnx_lrsd.activations import split_holdout
from onnx_lrsd.bench import make_session, relative_output_errors, run_outputs
from onnx_lrsd.feeds import random_feeds
from onnx_lrsd.graph import export_model

from .base import Pass, PassContext, PassResult


class VerifyOutputsPass(Pass):
    """Fills `ctx.output_errors`: ‖y − y′‖ / ‖y‖ per graph output, over the held-out
    calibration batches when there are any, else on seeded random inputs (batch
    `config.verify_batch`, symbolic dims from `config.dims`)."""

    name = "verify_outputs"
    requires = ("cleanup_graph",)

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        config = ctx.config
        batches = split_holdout(ctx.calibration, config.holdout_every)[1] or [
            random_feeds(ctx.source, batch=config.verify_batch, dims=dict(config.dims), seed=config.seed)]
        names = [o.name for o in ctx.source.graph.output]
        original = make_session(ctx.source, threads=1)
        compressed = make_session(export_model(graph, ctx.template, ctx.sparse_initializers), threads=1)
        reference, outputs = [], []
        for feeds in batches:
            reference.append(run_outputs(original, feeds))
            outputs.append(run_outputs(compressed, feeds))
        stacked = [[np.concatenate([np.ravel(run[i]) for run in runs]) for i in range(len(names))]
                   for runs in (reference, outputs)]
        ctx.output_errors = relative_output_errors(stacked[0], stacked[1], names)
        return PassResult(graph, modified=False, stats={"outputs": len(names), "batches": len(batches)})

