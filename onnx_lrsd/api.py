"""The Python API: `inspect_model`, `compress` and `compress_file`.

This module composes the passes (package `onnx_lrsd.passes`) into the pipeline; the core
modules it draws on never import the passes.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Mapping, Optional, Sequence, Union

import numpy as np
import onnx
from threadpoolctl import threadpool_limits

from .config import CompressConfig
from .plan.cost import count_params, model_macs
from .errors import LrsdError
from .parallel.executor import executor_for
from .model.graph import export_model, import_graph, model_template
from .model.io import (PROTOBUF_LIMIT, ModelSource, check_output_directory, initializer_bytes, load_model, load_source,
                 save_model)
from .model.mapped import weights_in
from .runtime.activations import split_holdout
from .runtime.bench import output_errors_on
from .runtime.feeds import random_feeds
from .report.types import CompressionReport, InspectReport, LayerReport, ModelStats, StageSummary, TargetInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompressionResult:
    model: onnx.ModelProto
    report: CompressionReport


def _context(source: onnx.ModelProto, config: CompressConfig, progress=None):
    from .passes import PassContext

    return PassContext(config=config, source=source, template=model_template(source), progress=progress)


def inspect_model(model: ModelSource) -> InspectReport:
    """List the layers `compress` would factorize and the weight layers it would skip."""
    from .passes import FindTargetsPass, NameNodesPass, PassManager

    source = load_model(model)
    ctx = _context(source, CompressConfig(verify=False))
    PassManager([NameNodesPass(), FindTargetsPass()]).run(import_graph(source), ctx)
    params = count_params(source)
    targets = tuple(TargetInfo(t.name, t.op, tuple(int(d) for d in t.weight.shape), t.params, t.macs,
                               t.params / params if params else 0.0) for t in ctx.targets.values())
    return InspectReport(params=params, macs=model_macs(source), targets=targets, skipped=tuple(ctx.skipped))


Calibration = Union[None, str, os.PathLike, Sequence[Union[str, os.PathLike]], Sequence[Mapping], object]


def calibration_batches(calibration: Calibration, model: onnx.ModelProto, config: CompressConfig) -> List[dict]:
    """Validated calibration batches of `config.calib_batch` samples from any source: a
    reader with `get_next()` (onnxruntime's CalibrationDataReader protocol), a list of feed
    dicts, .npz paths or directories, or "random" (seeded random inputs; a warning)."""
    from .runtime.calibrate import CalibrationSpec, ListReader, iter_batches, open_reader

    if calibration is None:
        return []
    if isinstance(calibration, (str, os.PathLike)):
        calibration = [calibration]
    if hasattr(calibration, "get_next"):
        reader = calibration
    elif isinstance(calibration, Sequence) and calibration and all(isinstance(c, Mapping) for c in calibration):
        reader = ListReader(calibration)
    elif isinstance(calibration, Sequence) and calibration and all(isinstance(c, (str, os.PathLike)) for c in calibration):
        reader = open_reader(CalibrationSpec(sources=tuple(str(c) for c in calibration), n_samples=config.calib_samples,
                                             batch_size=config.calib_batch, dims=config.dims, seed=config.seed), model)
    else:
        raise LrsdError("calibration must be a reader with get_next(), a list of feed dicts, .npz paths or 'random'")
    return list(iter_batches(reader, model, config.calib_samples, config.calib_batch))


Metric = Callable[[onnx.ModelProto], float]
"""A user's task metric of a model (higher is better), e.g. accuracy on their own data. A search
picks the model by it, so it should score on data the user does not report on."""


def compress(model: ModelSource, config: Optional[CompressConfig] = None, calibration: Calibration = None,
             progress=None, metric: Optional[Metric] = None, **options) -> CompressionResult:
    """Compress `model` (path, bytes or ModelProto; never modified) and verify it.

    With `calibration` (see `calibration_batches`) every layer is fitted to reconstruct its
    original feature maps (data-aware); without, the weights are factorized data-free.
    `options` are `CompressConfig` fields applied on top of `config`. `progress(stage, done,
    total)` is called as work advances. With `metric` (or `config.metric_command`) and
    `max_metric_drop`, the global allocation searches the smallest parameter count whose metric
    is at most that much below the original's (`config` must not set another target). A target
    no allocation reaches is an `LrsdError` naming the nearest model's numbers, unless
    `best_effort` (then that model is returned, with a warning).
    """
    config = (config or CompressConfig()).replace(**options) if options else (config or CompressConfig())
    if metric is not None and config.metric_command is not None:
        raise LrsdError("give a metric callable or a metric command, not both")
    if config.metric_command is not None:
        from .runtime.command_metric import CommandMetric

        metric = CommandMetric(config.metric_command)
    if (metric is None) != (config.max_metric_drop is None):
        raise LrsdError("a metric and max_metric_drop go together")
    if metric is not None and (config.target is not None or config.stages > 1):
        raise LrsdError("max_metric_drop is a target of its own: drop the other target and stages")
    if config.stages > 1:
        return _compress_in_stages(model, config, calibration, progress)
    from .passes import CollectActivationsPass, FindTargetsPass, NameNodesPass, PassManager, SelectRanksPass

    start = time.perf_counter()
    source, mapped_dir = load_source(model, int(config.map_weights_above_mb * 2**20))
    if metric is not None:
        config = config.replace(target_params=1.0)  # the search moves it
    ctx = _context(source, config, progress)
    ctx.calibration = calibration_batches(calibration, source, config)
    prepare = [NameNodesPass(), FindTargetsPass(), SelectRanksPass(), CollectActivationsPass()]
    with executor_for(config) as ctx.executor, threadpool_limits(limits=config.blas_threads, user_api="blas"), \
            weights_in(mapped_dir):
        if mapped_dir is not None and config.verify:  # while nothing else is in memory
            from .passes.verify_outputs import reference_outputs
            ctx.reference_outputs = reference_outputs(ctx)
        prepared = PassManager(prepare).run(import_graph(source), ctx)
        done = [p.name for p in prepare]
        if metric is not None:
            ctx, compressed = _compress_to_metric(prepared, ctx, done, metric, config.max_metric_drop)
        elif config.target is not None and config.target[0] == "latency":
            ctx, compressed = _compress_to_latency(prepared, ctx, done)
        elif config.target is not None and config.target[0] == "error" and config.verify:
            ctx, compressed = _compress_to_error(prepared, ctx, done)
        else:
            ctx, compressed = _finish(prepared, ctx, done)
        quantization = None
        if config.then_quantize is not None:
            from .runtime.activations import split_holdout
            from .passes.verify_outputs import verification_batches

            fit = split_holdout(ctx.calibration, config.holdout_every)[0] or ctx.calibration
            verify = verification_batches(ctx)[0] if config.verify else []
            compressed, quantization = _then_quantize(source, compressed, config.then_quantize, fit, verify,
                                                      ctx.output_errors)
            ctx.output_errors = dict(quantization.output_errors) if config.verify else ctx.output_errors
    report = CompressionReport(
        before=_stats(source), after=_stats(compressed), layers=tuple(_layer_reports(ctx)),
        skipped=tuple(ctx.skipped), output_errors=dict(ctx.output_errors),
        seconds=time.perf_counter() - start, timings=dict(ctx.timings), config=dataclasses.asdict(ctx.config),
        allocation=ctx.allocation, verified_on=ctx.verified_on, joint_groups=tuple(ctx.joint_reports),
        quantization=quantization, residual_check=ctx.residual_check)
    return CompressionResult(model=compressed, report=report)


def _then_quantize(source: onnx.ModelProto, compressed: onnx.ModelProto, mode: str, fit_batches, verify_batches,
                   errors_before):
    """(int8 model of `compressed`, its `QuantizationSummary`): static quantization calibrates
    on `fit_batches`; output errors against `source` on `verify_batches` (none: not verified)."""
    from .runtime.quantize import quantize_model, summarize

    quantized = quantize_model(compressed, mode, fit_batches)
    names = [o.name for o in source.graph.output]
    errors = output_errors_on(source, quantized, verify_batches, names) if verify_batches else {}
    log.info("%s quantization: output errors %s", mode, errors)
    return quantized, summarize(quantized, mode, errors_before, errors)


LATENCY_TOLERANCE = 0.10
"""A latency target is met when the measured speedup is within this share of it."""

TARGET_ROUNDS = 6
"""Allocations tried for a latency or error target: each corrects the prediction by what was
measured on the previous round's written model (fits and probes are reused: a round costs a
fit and a rewrite)."""


def _finish(prepared, ctx, done, correction: float = 1.0, **changes):
    """Allocate (with a target), fit, rewrite, clean up and verify on a copy of the prepared
    graph and a fresh copy of the context (`changes`: config fields of this round): returns
    (context, compressed model)."""
    from .passes import (AllocateBudgetPass, CheckResidualModelPass, CleanupGraphPass, DecomposeWeightsPass,
                         FilterResidualSharesPass,
                         FitJointGroupsPass, GroupLayersPass, MeasureLayerLatencyPass, PassManager,
                         ReconstructFeatureMapsPass, RewriteLowRankPass, VerifyOutputsPass)

    ctx = dataclasses.replace(ctx, plans=dict(ctx.plans), plan_options=dict(ctx.plan_options), factorizations={},
                              output_errors={}, sparse_initializers=[], allocation=None, timings=dict(ctx.timings),
                              layer_latency={}, groups={}, joint_ranks={}, joint_reports=[], residual_check=None,
                              config=ctx.config.replace(**changes) if changes else ctx.config)
    passes = [GroupLayersPass(), AllocateBudgetPass(correction), FitJointGroupsPass(), FilterResidualSharesPass(),
              ReconstructFeatureMapsPass(),
              DecomposeWeightsPass(), CheckResidualModelPass(), RewriteLowRankPass(), MeasureLayerLatencyPass(),
              CleanupGraphPass()]
    if ctx.config.verify:
        passes.append(VerifyOutputsPass())
    graph = PassManager(passes, done=done).run(prepared.copy(), ctx)
    return ctx, export_model(graph, ctx.template, ctx.sparse_initializers)


def _unreachable(ctx, what: str, nearest: str) -> None:
    """A target no round reached: an LrsdError naming the nearest model, or, with
    `best_effort`, a warning (the caller returns that model)."""
    if not ctx.config.best_effort:
        raise LrsdError(f"{what}; nearest model: {nearest} (nothing written; --best-effort writes it)")
    log.warning("%s; writing the nearest model (best effort): %s", what, nearest)


def _numbers(ctx, compressed: onnx.ModelProto) -> str:
    """The params ratio and verified output error of a round's model, for messages."""
    error = max(ctx.output_errors.values(), default=float("nan"))
    return f"params {count_params(compressed) / max(count_params(ctx.source), 1):.3f}, output error {error:.3g}"


def _compress_to_latency(prepared, ctx, done):
    """Rounds of allocation until the written model's measured speedup is within
    `LATENCY_TOLERANCE` of the target. The measured speedup grows with the speedup asked of
    the prediction, so the ask is searched in log space: scaled by target / measured until the
    target is bracketed, then bisected. When the fastest allocation measures below the target,
    or no round lands within the tolerance, the target is unreachable (`_unreachable`); the
    round nearest the target is the result."""
    from .runtime.bench import compare_latency
    from .passes.deployment import deployment_feed

    config = ctx.config
    wanted = config.target_latency
    feed = deployment_feed(ctx)
    correction, slow, fast, rounds = 1.0, None, None, []
    for index in range(1, TARGET_ROUNDS + 1):
        result_ctx, compressed = _finish(prepared, ctx, done, correction)
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
    if miss > LATENCY_TOLERANCE:
        _unreachable(result_ctx, f"speedup {wanted:g}x is unreachable: no round of {len(rounds)} measured within "
                                 f"{round(100 * LATENCY_TOLERANCE)}% of it (batch {config.latency_batch}, "
                                 f"{config.latency_threads} threads)",
                     f"{result_ctx.allocation.measured_speedup:.2f}x, {_numbers(result_ctx, compressed)}")
    return result_ctx, compressed


def _compress_to_error(prepared, ctx, done):
    """Rounds of allocation until the verified output error (the largest over the outputs)
    is at most `max_error`: each round shrinks the error budget by the excess measured. If no
    round gets there the target is unreachable (`_unreachable`; the lowest-error round)."""
    wanted = ctx.config.max_error
    correction = 1.0
    rounds = []
    for index in range(1, TARGET_ROUNDS + 1):
        result_ctx, compressed = _finish(prepared, ctx, done, correction)
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


def _quantized_for_metric(ctx, compressed: onnx.ModelProto) -> onnx.ModelProto:
    """The model the metric judges: with `then_quantize`, the int8 model that will be written
    (the search then finds the smallest params whose quantized model keeps the metric)."""
    mode = ctx.config.then_quantize
    if mode is None:
        return compressed
    from .runtime.activations import split_holdout
    from .runtime.quantize import quantize_model

    return quantize_model(compressed, mode, split_holdout(ctx.calibration, ctx.config.holdout_every)[0]
                          or ctx.calibration)


METRIC_STEPS = 7
"""Bisection steps of the metric search (the params ratio to 1/128)."""


def _compress_to_metric(prepared, ctx, done, metric: Metric, max_drop: float):
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
            round_ctx, compressed = _finish(prepared, ctx, done, target_params=mid)
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


STAGE_TARGETS = (None, "params", "macs")


def _compress_in_stages(model: ModelSource, config: CompressConfig, calibration: Calibration, progress):
    """MUSCO's multi-stage compression: `config.stages` rounds, each compressing the previous
    round's model further and refitting on its own feature maps (calibration through the
    current model). Round k keeps keep^(1/N) of each layer (chains are re-factored, never
    re-expanded), or reaches target^(k/N) of the original; errors are against the original."""
    kind = config.target[0] if config.target is not None else None
    if kind not in STAGE_TARGETS:
        raise LrsdError("stages work with keep, target_params and target_macs")
    start = time.perf_counter()
    source = load_model(model)
    batches = calibration_batches(calibration, source, config)
    verify_batches = split_holdout(batches, config.holdout_every)[1] or batches[:2]
    names = [o.name for o in source.graph.output]
    before = _stats(source)
    current, stages, result = source, [], None
    for stage in range(1, config.stages + 1):
        began = time.perf_counter()
        if kind is None:
            stage_config = config.replace(stages=1, keep=config.keep ** (1 / config.stages))
        else:
            field = "target_params" if kind == "params" else "target_macs"
            total = before.params if kind == "params" else before.macs
            now = count_params(current) if kind == "params" else model_macs(current)
            wanted = getattr(config, field) ** (stage / config.stages) * total / now
            stage_config = config.replace(stages=1, **{field: min(1.0, wanted)})
        result = compress(current, stage_config.replace(then_quantize=None), batches or None, progress)
        current = result.model
        errors = (output_errors_on(source, current, verify_batches, names) if verify_batches
                  else dict(result.report.output_errors))
        after = _stats(current)
        stages.append(StageSummary(stage, after.params / before.params, after.macs / max(before.macs, 1), errors,
                                   time.perf_counter() - began))
        log.info("stage %d: params %.3f, output errors %s", stage, stages[-1].params_ratio, errors)
    quantization = None
    if config.then_quantize is not None:
        fit = split_holdout(batches, config.holdout_every)[0] or batches
        checked = verify_batches or [random_feeds(source, batch=config.verify_batch, dims=dict(config.dims),
                                                  seed=config.seed)]
        current, quantization = _then_quantize(source, current, config.then_quantize, fit, checked,
                                               stages[-1].output_errors)
        result = CompressionResult(current, dataclasses.replace(result.report, after=_stats(current)))
    report = dataclasses.replace(result.report, before=before, quantization=quantization,
                                 output_errors=dict(quantization.output_errors) if quantization
                                 else stages[-1].output_errors,
                                 stages=tuple(stages), seconds=time.perf_counter() - start,
                                 config=dataclasses.asdict(config),
                                 verified_on="held-out calibration batches, against the original"
                                 if verify_batches else result.report.verified_on)
    return CompressionResult(model=current, report=report)


SWEEP_POINTS = (0.9, 0.75, 0.6, 0.5, 0.4, 0.3, 0.2)
"""Default `target_params` values of a sweep."""


def sweep(model: ModelSource, values: Sequence[float] = SWEEP_POINTS, config: Optional[CompressConfig] = None,
          calibration: Calibration = None, metric: Optional[Metric] = None, progress=None,
          keep_models: bool = False, **options):
    """Global allocations at each `target_params` in `values`, each written and measured:
    params / MACs / file ratios, speedup against the original in onnxruntime (interleaved, at
    `latency_batch` and `latency_threads`), output error, and `metric` when given. Statistics,
    error curves and sensitivities are computed once. Returns the `SweepReport` and, with
    `keep_models`, the compressed models in the order of the points."""
    from .runtime.bench import compare_latency
    from .passes import CollectActivationsPass, FindTargetsPass, NameNodesPass, PassManager, SelectRanksPass
    from .passes.deployment import deployment_feed
    from .report.types import SweepPoint, SweepReport

    config = (config or CompressConfig()).replace(**options) if options else (config or CompressConfig())
    values = sorted({float(v) for v in values}, reverse=True)
    if not values or any(not 0 < v <= 1 for v in values):
        raise LrsdError(f"sweep values are params ratios in (0, 1], got {values}")
    if config.target is not None and config.target[0] != "params" or config.stages > 1:
        raise LrsdError("a sweep sets target_params itself: drop other targets and stages")
    start = time.perf_counter()
    source = load_model(model)
    config = config.replace(target_params=values[0])
    ctx = _context(source, config, progress)
    ctx.calibration = calibration_batches(calibration, source, config)
    reference = float(metric(source)) if metric is not None else None
    points, models, verified_on = [], [], ""
    with executor_for(config) as ctx.executor, threadpool_limits(limits=config.blas_threads, user_api="blas"):
        prepare = [NameNodesPass(), FindTargetsPass(), SelectRanksPass(), CollectActivationsPass()]
        prepared = PassManager(prepare).run(import_graph(source), ctx)
        feed = deployment_feed(ctx)
        before = _stats(source)
        for index, value in enumerate(values, 1):
            try:
                round_ctx, compressed = _finish(prepared, ctx, [p.name for p in prepare], target_params=value)
            except LrsdError as exc:
                log.warning("sweep point %g skipped: %s", value, exc)
                continue
            after = _stats(compressed)
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


def compress_file(input_path: Union[str, os.PathLike], output_path: Union[str, os.PathLike],
                  config: Optional[CompressConfig] = None, calibration: Calibration = None, progress=None,
                  **options) -> CompressionResult:
    """`compress` a model file and write the result atomically to `output_path` (the file
    size in the report is the written file's). A model compressed through memory maps
    (`CompressConfig.map_weights_above_mb`) is written with external data, and the returned
    model refers to the written data file instead of holding its weights."""
    input_path, output_path = Path(input_path), Path(output_path)
    if output_path.exists() and input_path.exists() and output_path.resolve() == input_path.resolve():
        raise LrsdError("output path is the input path; refusing to overwrite the input model")
    if output_path.is_dir():
        raise LrsdError(f"output path is a directory: {output_path}")
    check_output_directory(output_path)
    result = compress(input_path, config, calibration, progress, **options)
    config = result.report.config
    save_model(result.model, output_path, external_data=bool(config.get("external_data")),
               source_dir=input_path.parent.resolve())
    written = output_path.stat().st_size + _data_file_size(output_path)
    before = dataclasses.replace(result.report.before,
                                 file_bytes=input_path.stat().st_size + _data_file_size(input_path))
    after = dataclasses.replace(result.report.after, file_bytes=written)
    return CompressionResult(result.model, dataclasses.replace(result.report, before=before, after=after))


def _data_file_size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return data.stat().st_size if data.is_file() else 0


def _stats(model: onnx.ModelProto) -> ModelStats:
    size = initializer_bytes(model)
    if size < PROTOBUF_LIMIT // 2:
        size = model.ByteSize()
    return ModelStats(params=count_params(model), macs=model_macs(model), file_bytes=size)


def _layer_reports(ctx):
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
