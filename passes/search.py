"""Runs of the pipeline (`passes.pipeline`): one run per compression, its rounds searched to
meet the global target (a measured speedup, a measured output error, a user's metric), MUSCO
stages (runs on the previous stage's model) and the sweep (one round per params ratio).
A round's allocation is a prediction; the searches correct it by what the written model
measures."""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
from threadpoolctl import threadpool_limits

from ..config import SWEEP_POINTS, CompressConfig
from ..errors import LrsdError
from ..model.io import PROTOBUF_LIMIT, ModelSource, initializer_bytes, load_model, load_source
from ..model.mapped import weights_in
from ..parallel.executor import executor_for
from ..plan.cost import count_params, model_macs, unresolved_dims
from ..report.types import (CompressionReport, LayerReport, ModelStats, StageSummary, SweepPoint, SweepReport)
from ..runtime.bench import compare_latency, output_errors_on
from ..runtime.calibrate import RANDOM, Calibration, calibration_batches, split_holdout
from ..runtime.feeds import dims_from_feeds, random_feeds, resolve_input_shapes
from ..runtime.quantize import quantize_model, summarize
from ..runtime.deployment import deployment_feed
from .context import PassContext, new_context
from .pipeline import prepare, run_round
from .verify_outputs import reference_outputs, verification_batches

log = logging.getLogger(__name__)

Metric = Callable[[onnx.ModelProto], float]
"""A user's task metric of a model (higher is better), e.g. accuracy on their own data. A search
picks the model by it, so it should score on data the user does not report on."""


@dataclass(frozen=True)
class CompressionResult:
    model: onnx.ModelProto
    report: CompressionReport


LATENCY_TOLERANCE = 0.10
"""A latency target is met when the measured speedup is within this share of it."""

TARGET_ROUNDS = 6
"""Allocations tried for a latency or error target: each corrects the prediction by what was
measured on the previous round's written model (fits and probes are reused: a round costs a
fit and a rewrite)."""

METRIC_STEPS = 7
"""Bisection steps of the metric search (the params ratio to 1/128)."""

STAGE_TARGETS = (None, "params", "macs")
"""Targets that MUSCO stages can split (none: `keep`)."""


def compress_model(model: ModelSource, config: CompressConfig, calibration: Calibration = None, progress=None,
                   metric: Optional[Metric] = None, max_metric_drop: Optional[float] = None) -> CompressionResult:
    """One run: prepare, then the rounds the config's target asks for (`metric` with
    `max_metric_drop`: the metric search), then `then_quantize`; the report of the round kept."""
    start = time.perf_counter()
    source, mapped_dir = load_source(model, int(config.map_weights_above_mb * 2**20))
    if metric is not None:
        config = config.replace(target_params=1.0)  # the search moves it
    ctx = new_context(source, config, progress)
    ctx.calibration = calibration_batches(calibration, source, config)
    if config.verify and not ctx.calibration:  # random inputs will be needed: every unknown dim named now
        resolve_input_shapes(source, batch=config.verify_batch, dims=dict(config.dims))
    with executor_for(config) as ctx.executor, threadpool_limits(limits=config.blas_threads, user_api="blas"), \
            weights_in(mapped_dir):
        if mapped_dir is not None and config.verify:  # while nothing else is in memory
            ctx.reference_outputs = reference_outputs(ctx)
        prepared = prepare(ctx)
        if metric is not None:
            ctx, compressed = to_metric(prepared, ctx, metric, max_metric_drop)
        elif config.target is not None and config.target[0] == "latency":
            ctx, compressed = to_latency(prepared, ctx)
        elif config.target is not None and config.target[0] == "error" and config.verify:
            ctx, compressed = to_error(prepared, ctx)
        else:
            ctx, compressed = run_round(prepared, ctx)
        recovery = None
        if config.recovers:
            if mapped_dir is not None:
                raise LrsdError("recovery needs the model's weights in memory: raise map_weights_above_mb")
            fit = split_holdout(ctx.calibration, config.holdout_every).fit
            compressed, recovery = recover_compressed(source, compressed, calibration, fit, config, progress,
                                                      executor=ctx.executor)
            if config.verify:
                held, _ = verification_batches(ctx)
                ctx.output_errors = output_errors_on(source, compressed, held, [o.name for o in source.graph.output])
        quantization = None
        if config.then_quantize is not None:
            fit = split_holdout(ctx.calibration, config.holdout_every).fit
            verify = verification_batches(ctx)[0] if config.verify else []
            compressed, quantization = then_quantize(source, compressed, config.then_quantize, fit, verify,
                                                     ctx.output_errors)
            ctx.output_errors = dict(quantization.output_errors) if config.verify else ctx.output_errors
    dims = macs_dims(source, config, ctx.calibration)
    report = CompressionReport(
        before=model_stats(source, dims), after=model_stats(compressed, dims), layers=tuple(layer_reports(ctx)),
        macs_unresolved=unresolved_dims(source, dims),
        skipped=tuple(ctx.skipped), output_errors=dict(ctx.output_errors),
        seconds=time.perf_counter() - start, timings=dict(ctx.timings), config=dataclasses.asdict(ctx.config),
        allocation=ctx.allocation, verified_on=ctx.verified_on, joint_groups=tuple(ctx.joint_reports),
        quantization=quantization, residual_check=ctx.residual_check, recovery=recovery)
    return CompressionResult(model=compressed, report=report)


def recover_compressed(source: onnx.ModelProto, compressed: onnx.ModelProto, calibration: Calibration, batches,
                       config: CompressConfig, progress, share: float = 1.0, executor=None):
    """(recovered model, `RecoveryReport`): `compressed` fine-tuned against `source` on
    `batches` (the fit split of the calibration data) with `config.recover` steps ("auto": the
    default) and `config.recover_time`, both scaled by `share` (a MUSCO stage's part), at
    `config.recover_level`; its gradient shards run on `executor` (the run's, still open) or on
    one opened from `config`'s executor options."""
    from ..recover import RecoverConfig, recover_at_level
    from ..recover.types import DEFAULT_STEPS

    given = [calibration] if isinstance(calibration, str) else calibration
    if not batches or (isinstance(given, Sequence) and RANDOM in given):
        raise LrsdError("recovery needs real unlabeled inputs (--calib DATA), not random ones")
    if isinstance(config.recover, int):
        steps = max(1, round(config.recover * share)) if config.recover else 0
    else:  # "auto": the time budget alone, else the default number of steps
        steps = None if config.recover_time is not None else max(1, round(DEFAULT_STEPS * share))
    options = RecoverConfig(steps=steps, time_budget=config.recover_time * share if config.recover_time else None,
                            seed=config.seed, mask_input=config.mask_input, threads=config.latency_threads,
                            level=config.recover_level, block_size=config.recover_block_size,
                            warmup=config.recover_warmup, step_scale=config.recover_step_scale,
                            executor=config.executor, workers=config.workers,
                            ray_address=config.ray_address)

    def on_step(p) -> None:
        if progress is not None:
            total = p.total or int(p.time_budget)
            progress("recover", min(p.step if p.total else int(p.seconds), total), total)
    result = recover_at_level(compressed, source, batches, options, on_step, executor)
    return result.model, result.report


def recover_result(model: ModelSource, result: CompressionResult, config: CompressConfig, calibration: Calibration,
                   progress) -> CompressionResult:
    """`result` (a finished run, e.g. width reduction) fine-tuned against the original `model`
    on the fit split of the calibration batches, its report updated: the model's stats, the
    output errors on the batches the run verified on, the recovery, the time."""
    start = time.perf_counter()
    source = load_model(model)
    batches = calibration_batches(calibration, source, config)
    fit, held = split_holdout(batches, config.holdout_every)
    recovered, recovery = recover_compressed(source, result.model, calibration, fit or batches, config, progress)
    report = result.report
    errors = dict(report.output_errors)
    if config.verify and errors:
        errors = output_errors_on(source, recovered, held or batches[:2], [o.name for o in source.graph.output])
    dims = macs_dims(source, config, batches)
    return CompressionResult(recovered, dataclasses.replace(
        report, after=model_stats(recovered, dims), output_errors=errors, recovery=recovery,
        seconds=report.seconds + time.perf_counter() - start))


def quantize_result(model: ModelSource, result: CompressionResult, config: CompressConfig,
                    calibration: Calibration) -> CompressionResult:
    """`result` (a finished run, e.g. width reduction) quantized by `config.then_quantize`
    (static: calibrated on the fit split), its report updated: the model's stats, the output
    errors against the original on the batches the run verified on, the quantization."""
    source = load_model(model)
    batches = calibration_batches(calibration, source, config)
    fit, held = split_holdout(batches, config.holdout_every)
    verify = (held or batches[:2]) if config.verify and result.report.output_errors else []
    quantized, summary = then_quantize(source, result.model, config.then_quantize, fit or batches, verify,
                                       result.report.output_errors)
    dims = macs_dims(source, config, batches)
    return CompressionResult(quantized, dataclasses.replace(
        result.report, after=model_stats(quantized, dims), quantization=summary,
        output_errors=dict(summary.output_errors) if verify else dict(result.report.output_errors)))


def then_quantize(source: onnx.ModelProto, compressed: onnx.ModelProto, mode: str, fit_batches, verify_batches,
                  errors_before):
    """(int8 model of `compressed`, its `QuantizationSummary`): static quantization calibrates
    on `fit_batches`; output errors against `source` on `verify_batches` (none: not verified)."""
    quantized = quantize_model(compressed, mode, fit_batches)
    names = [o.name for o in source.graph.output]
    errors = output_errors_on(source, quantized, verify_batches, names) if verify_batches else {}
    log.info("%s quantization: output errors %s", mode, errors)
    return quantized, summarize(quantized, mode, errors_before, errors)


def _unreachable(ctx: PassContext, what: str, nearest: str) -> None:
    """A target no round reached: an LrsdError naming the nearest model, or, with
    `best_effort`, a warning (the caller returns that model)."""
    if not ctx.config.best_effort:
        raise LrsdError(f"{what}; nearest model: {nearest} (nothing written; --best-effort writes it)")
    log.warning("%s; writing the nearest model (best effort): %s", what, nearest)


def _numbers(ctx: PassContext, compressed: onnx.ModelProto) -> str:
    """The params ratio and verified output error of a round's model, for messages."""
    error = max(ctx.output_errors.values(), default=float("nan"))
    return f"params {count_params(compressed) / max(count_params(ctx.source), 1):.3f}, output error {error:.3g}"


def to_latency(prepared, ctx: PassContext, round_fn=run_round) -> Tuple[PassContext, onnx.ModelProto]:
    """Rounds of allocation until the written model's measured speedup is within
    `LATENCY_TOLERANCE` of the target. The measured speedup grows with the speedup asked of
    the prediction, so the ask is searched in log space: scaled by target / measured until the
    target is bracketed, then bisected. The target is a floor: when no round lands within the
    tolerance, the slowest round measured above the target is the result (with a warning); when
    every round measures below it, the target is unreachable (`_unreachable`, nearest round).
    `round_fn` (as `run_round`) runs a round: another run type's (`passes.width_and_rank`)."""
    config = ctx.config
    wanted = config.target_latency
    feed = deployment_feed(ctx.source, ctx.calibration, ctx.config)
    correction, slow, fast, rounds = 1.0, None, None, []
    for index in range(1, TARGET_ROUNDS + 1):
        result_ctx, compressed = round_fn(prepared, ctx, correction)
        measured = compare_latency(ctx.source, compressed, feed, threads=config.latency_threads, runs=60).speedup
        result_ctx.allocation = dataclasses.replace(result_ctx.allocation, measured_speedup=measured, rounds=index)
        log.info("latency round %d: asked %.3fx of the prediction, measured %.3fx (target %.3fx)", index,
                 wanted * correction, measured, wanted)
        rounds.append((abs(measured / wanted - 1), result_ctx, compressed))
        if rounds[-1][0] <= LATENCY_TOLERANCE:
            break
        if measured < wanted:
            if result_ctx.allocation.capped:
                break  # the fastest allocation is too slow
            slow = correction
        else:
            fast = correction
        if slow is not None and fast is not None:
            correction = float(np.sqrt(slow * fast))
        else:
            correction *= wanted / measured
    miss, result_ctx, compressed = min(rounds, key=lambda r: r[0])
    faster = [r for r in rounds if r[1].allocation.measured_speedup >= wanted]
    if miss > LATENCY_TOLERANCE and faster:  # the target is a floor: the slowest round above it serves
        miss, result_ctx, compressed = min(faster, key=lambda r: r[1].allocation.measured_speedup)
        log.warning("no round measured within %d%% of %.3gx; the nearest above it measured %.3gx",
                    round(100 * LATENCY_TOLERANCE), wanted, result_ctx.allocation.measured_speedup)
    elif miss > LATENCY_TOLERANCE:
        _unreachable(result_ctx, f"speedup {wanted:g}x is unreachable: no round of {len(rounds)} measured within "
                                 f"{round(100 * LATENCY_TOLERANCE)}% of it (batch {config.latency_batch}, "
                                 f"{config.latency_threads} threads)",
                     f"{result_ctx.allocation.measured_speedup:.2f}x, {_numbers(result_ctx, compressed)}")
    return result_ctx, compressed


def to_error(prepared, ctx: PassContext, round_fn=run_round) -> Tuple[PassContext, onnx.ModelProto]:
    """Rounds of allocation until the verified output error (the largest over the outputs)
    is at most `max_error`: each round shrinks the error budget by the excess measured. If no
    round gets there the target is unreachable (`_unreachable`; the lowest-error round)."""
    wanted = ctx.config.max_error
    correction = 1.0
    rounds = []
    for index in range(1, TARGET_ROUNDS + 1):
        result_ctx, compressed = round_fn(prepared, ctx, correction)
        measured = max(result_ctx.output_errors.values(), default=0.0)
        result_ctx.allocation = dataclasses.replace(result_ctx.allocation, rounds=index)
        log.info("error round %d: predicted %.4g, measured %.4g (target %.4g)", index,
                 result_ctx.allocation.predicted_error, measured, wanted)
        rounds.append((measured if np.isfinite(measured) else float("inf"), result_ctx, compressed))
        if measured <= wanted or not np.isfinite(measured) or measured == 0:
            break
        correction *= wanted / measured
    measured, result_ctx, compressed = min(rounds, key=lambda r: r[0])
    if measured > wanted:
        _unreachable(result_ctx, f"output error {wanted:g} is unreachable: above it after {len(rounds)} rounds",
                     _numbers(result_ctx, compressed))
    return result_ctx, compressed


def _quantized_for_metric(ctx: PassContext, compressed: onnx.ModelProto) -> onnx.ModelProto:
    """The model the metric judges: with `then_quantize`, the int8 model that will be written
    (the search then finds the smallest params whose quantized model keeps the metric)."""
    mode = ctx.config.then_quantize
    if mode is None:
        return compressed
    return quantize_model(compressed, mode, split_holdout(ctx.calibration, ctx.config.holdout_every).fit)


def to_metric(prepared, ctx: PassContext, metric: Metric, max_drop: float,
              round_fn=run_round) -> Tuple[PassContext, onnx.ModelProto]:
    """The smallest params ratio whose model's metric is at most `max_drop` below the
    original's, by bisection over `target_params` in (0, 1] (the metric is assumed to fall as
    the model shrinks; a ratio below the smallest allocation counts as too small). With
    `then_quantize` the metric is measured on the quantized model. When no allocation tried
    qualifies the target is unreachable (`_unreachable`; the best-scoring model)."""
    reference = float(metric(ctx.source))
    lo, hi = 0.0, 1.0
    best, nearest = None, None
    for _ in range(METRIC_STEPS):
        mid = 0.5 * (lo + hi)
        try:
            round_ctx, compressed = round_fn(prepared, ctx, target_params=mid)
        except LrsdError:  # unreachable: the allocation refuses before fitting anything
            lo = mid
            continue
        value = float(metric(_quantized_for_metric(round_ctx, compressed)))
        log.info("metric search: params %.3f -> metric %.4g (original %.4g)", mid, value, reference)
        if nearest is None or value > nearest[2]:
            nearest = (round_ctx, compressed, value)
        if reference - value <= max_drop:
            best, hi = (round_ctx, compressed, value), mid
        else:
            lo = mid
    if best is None:
        if nearest is None:
            raise LrsdError("the metric target is unreachable: no params target could be allocated")
        round_ctx, compressed, value = nearest
        _unreachable(round_ctx, f"the metric target is unreachable: no allocation keeps it within {max_drop:g} of "
                                f"the original's {reference:.4g} (tried down to params ratio {hi:.3f})",
                     f"metric {value:.4g}, {_numbers(round_ctx, compressed)}")
        best = nearest
    round_ctx, compressed, value = best
    round_ctx.allocation = dataclasses.replace(round_ctx.allocation, metric=value, metric_original=reference)
    return round_ctx, compressed


def compress_in_stages(model: ModelSource, config: CompressConfig, calibration: Calibration,
                       progress, run=compress_model) -> CompressionResult:
    """MUSCO's multi-stage compression: `config.stages` runs, each compressing the previous
    run's model further and refitting on its own feature maps (calibration through the
    current model). Stage k keeps keep^(1/N) of each layer (chains are re-factored, never
    re-expanded; a width method: of each group), or reaches target^(k/N) of the original;
    errors are against the original. With `config.recovers`, each stage's model is fine-tuned
    against the original before the next stage fits on it (a 1/N share of the recovery budget
    each). `run(model, config, calibration, progress)` is one stage (`compress_model`, or a
    width method's run); the groups' widths are reported against the original's channels."""
    kind = config.target[0] if config.target is not None else None
    if kind not in STAGE_TARGETS:
        raise LrsdError("stages work with keep, target_params and target_macs")
    start = time.perf_counter()
    source = load_model(model)
    batches = calibration_batches(calibration, source, config)
    verify_batches = split_holdout(batches, config.holdout_every).judging(2)
    names = [o.name for o in source.graph.output]
    dims = macs_dims(source, config, batches)
    before = model_stats(source, dims)
    current, stages, result, recoveries, widths = source, [], None, [], ()
    for stage in range(1, config.stages + 1):
        began = time.perf_counter()
        if kind is None:
            stage_config = config.replace(stages=1, keep=config.keep ** (1 / config.stages))
        else:
            field = "target_params" if kind == "params" else "target_macs"
            total = before.params if kind == "params" else before.macs
            now = count_params(current) if kind == "params" else model_macs(current, dims)
            wanted = getattr(config, field) ** (stage / config.stages) * total / now
            stage_config = config.replace(stages=1, **{field: min(1.0, wanted)})
        result = run(current, stage_config.replace(then_quantize=None, recover=None, recover_time=None),
                     batches or None, progress)
        current = result.model
        widths = _widths_against(widths if stage > 1 else result.report.widths, result.report.widths)
        if config.recovers:  # MUSCO: recover against the original before the next stage
            fit = split_holdout(batches, config.holdout_every).fit
            current, recovery = recover_compressed(source, current, calibration, fit, config, progress,
                                                   share=1 / config.stages)
            recoveries.append(recovery)
        errors = (output_errors_on(source, current, verify_batches, names) if verify_batches
                  else dict(result.report.output_errors))
        after = model_stats(current, dims)
        stages.append(StageSummary(stage, after.params / before.params, after.macs / max(before.macs, 1), errors,
                                   time.perf_counter() - began))
        log.info("stage %d: params %.3f, output errors %s", stage, stages[-1].params_ratio, errors)
    quantization = None
    if config.then_quantize is not None:
        fit = split_holdout(batches, config.holdout_every).fit
        checked = verify_batches or [random_feeds(source, batch=config.verify_batch, dims=dict(config.dims),
                                                  seed=config.seed)]
        current, quantization = then_quantize(source, current, config.then_quantize, fit, checked,
                                              stages[-1].output_errors)
        result = CompressionResult(current, dataclasses.replace(result.report, after=model_stats(current, dims)))
    report = dataclasses.replace(result.report, before=before, quantization=quantization,
                                 output_errors=dict(quantization.output_errors) if quantization
                                 else stages[-1].output_errors,
                                 stages=tuple(stages), seconds=time.perf_counter() - start,
                                 recovery=recoveries[-1] if recoveries else None, widths=widths,
                                 config=dataclasses.asdict(config),
                                 verified_on="held-out calibration batches, against the original"
                                 if verify_batches else result.report.verified_on)
    return CompressionResult(model=current, report=report)


def _widths_against(first, last) -> tuple:
    """The groups' widths of the last stage (`last`) against the channels they had before the
    first (`first`; a group is named by its first producer, which keeps its name)."""
    channels = {w.name: w.channels for w in first}
    return tuple(dataclasses.replace(w, channels=channels.get(w.name, w.channels)) for w in last)


def sweep(model: ModelSource, values: Sequence[float] = SWEEP_POINTS, config: Optional[CompressConfig] = None,
          calibration: Calibration = None, metric: Optional[Metric] = None, progress=None,
          keep_models: bool = False):
    """One round per `target_params` in `values` (descending, validated) on one prepared
    graph, each written and measured (see `onnx_lrsd.api.sweep`): the `SweepReport` and,
    with `keep_models`, the compressed models in the order of the points."""
    start = time.perf_counter()
    source = load_model(model)
    config = config.replace(target_params=values[0])
    ctx = new_context(source, config, progress)
    ctx.calibration = calibration_batches(calibration, source, config)
    reference = float(metric(source)) if metric is not None else None
    points: List[SweepPoint] = []
    models, verified_on = [], ""
    with executor_for(config) as ctx.executor, threadpool_limits(limits=config.blas_threads, user_api="blas"):
        prepared = prepare(ctx)
        feed = deployment_feed(ctx.source, ctx.calibration, ctx.config)
        dims = macs_dims(source, config, ctx.calibration)
        before = model_stats(source, dims)
        for index, value in enumerate(values, 1):
            try:
                round_ctx, compressed = run_round(prepared, ctx, target_params=value)
            except LrsdError as exc:
                log.warning("sweep point %g skipped: %s", value, exc)
                continue
            after = model_stats(compressed, dims)
            speedup = compare_latency(source, compressed, feed, threads=config.latency_threads, runs=30).speedup
            points.append(SweepPoint(
                target_params=value, params_ratio=after.params / before.params,
                macs_ratio=after.macs / max(before.macs, 1), size_ratio=after.file_bytes / before.file_bytes,
                speedup=speedup, output_error=max(round_ctx.output_errors.values(), default=float("nan")),
                metric=float(metric(compressed)) if metric is not None else None))
            verified_on = round_ctx.verified_on
            if keep_models:
                models.append(compressed)
            if progress is not None:
                progress("sweep", index, len(values))
    if not points:
        raise LrsdError("no sweep point is reachable (all targets are below the smallest allocation)")
    report = SweepReport(points=tuple(_mark_pareto(points)), batch=config.latency_batch,
                         threads=config.latency_threads, verified_on=verified_on, metric_original=reference,
                         seconds=time.perf_counter() - start)
    return (report, models) if keep_models else report


def _mark_pareto(points):
    """Points no other point beats on both speedup and output error."""
    def beaten(p):
        return any(q.speedup > p.speedup and q.output_error < p.output_error for q in points)
    return [dataclasses.replace(p, pareto=not beaten(p)) for p in points]


def model_stats(model: onnx.ModelProto, dims: Optional[Dict[str, int]] = None) -> ModelStats:
    """Params, MACs (shapes inferred with `dims`, see `model_macs`), ops (nodes but Constants:
    roughly the kernels onnxruntime runs) and the serialized size
    (the initializers' bytes above half the protobuf limit, where serializing would fail or
    cost a copy of the weights)."""
    size = initializer_bytes(model)
    if size < PROTOBUF_LIMIT // 2:
        size = model.ByteSize()
    return ModelStats(params=count_params(model), macs=model_macs(model, dims), file_bytes=size,
                      ops=sum(node.op_type != "Constant" for node in model.graph.node))


def macs_dims(source: onnx.ModelProto, config: CompressConfig, calibration) -> Dict[str, int]:
    """The symbolic input dims MACs are counted at: the first calibration batch's, overridden
    by `config.dims` (batch 1 always)."""
    return {**dims_from_feeds(source, calibration[0] if calibration else None), **dict(config.dims)}


def layer_reports(ctx: PassContext):
    """One `LayerReport` per target of the round in `ctx`."""
    for name, target in ctx.targets.items():
        plan = ctx.plans[name]
        fact = ctx.factorizations.get(name)
        residual = plan.residual
        yield LayerReport(name=name, op=target.op, method=plan.method, ranks=plan.ranks,
                          params_before=plan.dense.params, params_after=plan.cost.params,
                          macs_before=plan.dense.macs, macs_after=plan.cost.macs, reason=plan.reason,
                          data_error=fact.data_error if fact else None,
                          residual=residual.structure if residual else "",
                          residual_size=residual.size if residual else 0, latency=ctx.layer_latency.get(name))
