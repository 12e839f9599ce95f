"""Run the original and the compressed model in onnxruntime on the same inputs."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from onnx_lrsd.bench import make_session, relative_output_errors, run_outputs
from onnx_lrsd.feeds import random_feeds
from onnx_lrsd.graph import export_model

from .base import Pass, PassContext, PassResult


class VerifyOutputsPass(Pass):
    """Fills `ctx.output_errors`: ‖y − y′‖ / ‖y‖ per graph output, on seeded random inputs
    (batch `config.verify_batch`, symbolic dims from `config.dims`)."""

    name = "verify_outputs"
    requires = ("cleanup_graph",)

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        config = ctx.config
        feeds = random_feeds(ctx.source, batch=config.verify_batch, dims=dict(config.dims), seed=config.seed)
        compressed = export_model(graph, ctx.template)
        names = [o.name for o in ctx.source.graph.output]
        reference = run_outputs(make_session(ctx.source, threads=1), feeds)
        outputs = run_outputs(make_session(compressed, threads=1), feeds)
        ctx.output_errors = relative_output_errors(reference, outputs, names)
        return PassResult(graph, modified=False, stats={"outputs": len(names)})
