"""Keep the automatic residuals only if the written model is better for them."""
from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from ..runtime.bench import relative_output_errors, time_sessions
from ..config import AUTO_SHARE
from ..report.types import ResidualCheck
from ..runtime.deployment import deployment_feed
from ..runtime.session import make_session, rewritten_model, run_outputs

from .base import Pass, PassResult
from .context import PassContext
from .verify_outputs import verification_batches

log = logging.getLogger(__name__)

LATENCY_BLOCKS = 5
"""Interleaved blocks the two models are timed in (the ratio is the median of the blocks')."""


class CheckResidualModelPass(Pass):
    """With ``sparse_share="auto"``, decides on the written model which residuals to keep.

    The layers the fits gave a residual are ranked by their held-out gain over the plain chain
    of the same budget (1 − error / plain error); the model is written with the residuals of
    the best 1, 2, 4, … and all of them, the rest as plain chains, and the prefix with the
    least mean relative output error on the verification batches is kept if that error is
    below the L-only model's (every layer a plain chain) and the model runs at most
    1 + `residual_model_tolerance` times the L-only model's time (`latency_batch`,
    `latency_threads`, interleaved blocks, median ratio). Otherwise every residual layer falls
    back to its plain chain. Per-layer checks cannot see either: a layer's held-out error
    ignores how errors combine downstream, and a layer timed alone misses what its extra nodes
    cost inside the network."""

    name = "check_residual_model"
    requires = ("reconstruct_feature_maps",)

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        config = ctx.config
        facts = ctx.factorizations
        chosen = [name for name, fact in facts.items()
                  if fact.fallback is not None and ctx.plans[name].sparse is not None
                  and ctx.plans[name].sparse.share == AUTO_SHARE]
        if not chosen or not ctx.calibration:
            return PassResult(graph, modified=False, stats={"layers": len(chosen)})
        chosen.sort(key=lambda n: (facts[n].data_error or 0.0) / max(facts[n].fallback.data_error or 0.0, 1e-300))
        sizes = sorted({min(2 ** i, len(chosen)) for i in range(len(chosen).bit_length() + 1)})
        variants = [dict(facts, **{n: facts[n].fallback for n in chosen[size:]}) for size in [0, *sizes]]
        models = [rewritten_model(graph, ctx.template, ctx.targets, v.values()) for v in variants]
        errors = self._errors(ctx, models, verification_batches(ctx)[0])
        best = 1 + int(np.argmin(errors[1:]))
        feed = deployment_feed(ctx.source, ctx.calibration, config)
        ratio = self._latency_ratio([models[best], models[0]], feed, config.latency_threads)
        kept = errors[best] < errors[0] and ratio <= 1 + config.residual_model_tolerance
        size = sizes[best - 1] if kept else 0
        ctx.residual_check = ResidualCheck(layers=len(chosen), kept_layers=size, error=errors[best],
                                           plain_error=errors[0], latency_ratio=ratio, kept=kept)
        log.info("residual check: best %d of %d residual layers, output error %.4g vs L only %.4g, latency %.3f "
                 "of L only: %s", sizes[best - 1], len(chosen), errors[best], errors[0], ratio,
                 "kept" if kept else "fall back to L only")
        for name in chosen[size:]:
            fallback = facts[name].fallback
            facts[name] = fallback
            ctx.plans[name] = ctx.plans[name].with_residual(ctx.targets[name], fallback.low_rank.rank, None)
        return PassResult(graph, modified=False, stats={"layers": len(chosen), "kept": size})

    @staticmethod
    def _errors(ctx: PassContext, models, batches):
        """Mean over outputs of ‖y − y′‖ / ‖y‖ on `batches`, for each model."""
        names = [o.name for o in ctx.source.graph.output]
        sessions = [make_session(m, threads=ctx.config.latency_threads) for m in (ctx.source, *models)]
        outputs = [[run_outputs(s, feeds) for feeds in batches] for s in sessions]
        stacked = [[np.concatenate([np.ravel(run[i]) for run in side]) for i in range(len(names))] for side in outputs]
        return [float(np.mean(list(relative_output_errors(stacked[0], side, names).values()))) for side in stacked[1:]]

    @staticmethod
    def _latency_ratio(models, feed, threads: int) -> float:
        sessions = [make_session(m, threads) for m in models]
        blocks = [time_sessions(sessions, feed, runs=20, warmup=5 if b == 0 else 1) for b in range(LATENCY_BLOCKS)]
        return float(np.median([b[0].median_ms / b[1].median_ms for b in blocks]))
