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
from typing import List, Mapping, Optional, Sequence, Union

import numpy as np
import onnx
from threadpoolctl import threadpool_limits

from .config import CompressConfig
from .cost import count_params, model_macs
from .errors import LrsdError
from .graph import export_model, import_graph, model_template
from .io import PROTOBUF_LIMIT, ModelSource, check_output_directory, initializer_bytes, load_model, save_model
from .report import CompressionReport, InspectReport, LayerReport, ModelStats, TargetInfo

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
    from .calibrate import CalibrationSpec, ListReader, iter_batches, open_reader

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


def compress(model: ModelSource, config: Optional[CompressConfig] = None, calibration: Calibration = None,
             progress=None, **options) -> CompressionResult:
    """Compress `model` (path, bytes or ModelProto; never modified) and verify it.

    With `calibration` (see `calibration_batches`) every layer is fitted to reconstruct its
    original feature maps (data-aware); without, the weights are factorized data-free.
    `options` are `CompressConfig` fields applied on top of `config`. `progress(stage, done,
    total)` is called as work advances.
    """
    from .passes import CollectActivationsPass, FindTargetsPass, NameNodesPass, PassManager, SelectRanksPass

    config = (config or CompressConfig()).replace(**options) if options else (config or CompressConfig())
    start = time.perf_counter()
    source = load_model(model)
    ctx = _context(source, config, progress)
    ctx.calibration = calibration_batches(calibration, source, config)
    prepare = [NameNodesPass(), FindTargetsPass(), SelectRanksPass(), CollectActivationsPass()]
    with threadpool_limits(limits=config.blas_threads, user_api="blas"):
        prepared = PassManager(prepare).run(import_graph(source), ctx)
        done = [p.name for p in prepare]
        if config.target is not None and config.target[0] == "latency":
            ctx, compressed = _compress_to_latency(prepared, ctx, done)
        elif config.target is not None and config.target[0] == "error" and config.verify:
            ctx, compressed = _compress_to_error(prepared, ctx, done)
        else:
            ctx, compressed = _finish(prepared, ctx, done)
    report = CompressionReport(
        before=_stats(source), after=_stats(compressed), layers=tuple(_layer_reports(ctx)),
        skipped=tuple(ctx.skipped), output_errors=dict(ctx.output_errors),
        seconds=time.perf_counter() - start, timings=dict(ctx.timings), config=dataclasses.asdict(config),
        allocation=ctx.allocation)
    return CompressionResult(model=compressed, report=report)


LATENCY_TOLERANCE = 0.10
"""A latency target is met when the measured speedup is within this share of it."""

TARGET_ROUNDS = 3
"""Allocations tried for a latency or error target: each corrects the prediction by what was
measured on the previous round's written model."""


def _finish(prepared, ctx, done, correction: float = 1.0):
    """Allocate (with a target), fit, rewrite, clean up and verify on a copy of the prepared
    graph and a fresh copy of the context: returns (context, compressed model)."""
    from .passes import (AllocateBudgetPass, CleanupGraphPass, DecomposeWeightsPass, PassManager,
                         ReconstructFeatureMapsPass, RewriteLowRankPass, VerifyOutputsPass)

    ctx = dataclasses.replace(ctx, plans=dict(ctx.plans), plan_options=dict(ctx.plan_options), factorizations={},
                              output_errors={}, sparse_initializers=[], allocation=None, timings=dict(ctx.timings))
    passes = [AllocateBudgetPass(correction), ReconstructFeatureMapsPass(), DecomposeWeightsPass(),
              RewriteLowRankPass(), CleanupGraphPass()]
    if ctx.config.verify:
        passes.append(VerifyOutputsPass())
    graph = PassManager(passes, done=done).run(prepared.copy(), ctx)
    return ctx, export_model(graph, ctx.template, ctx.sparse_initializers)


def _compress_to_latency(prepared, ctx, done):
    """Rounds of allocation until the written model's measured speedup is within
    `LATENCY_TOLERANCE` of the target: the measured savings rescale the predicted ones."""
    from .bench import compare_latency
    from .passes.allocate_budget import deployment_feed

    config = ctx.config
    wanted = config.target_latency
    feed = deployment_feed(ctx)
    scale = 1.0
    for rounds in range(1, TARGET_ROUNDS + 1):
        result_ctx, compressed = _finish(prepared, ctx, done, scale)
        measured = compare_latency(ctx.source, compressed, feed, threads=config.latency_threads, runs=40).speedup
        allocation = dataclasses.replace(result_ctx.allocation, measured_speedup=measured, rounds=rounds)
        result_ctx.allocation = allocation
        log.info("latency round %d: predicted %.3fx, measured %.3fx (target %.3fx)", rounds, allocation.predicted,
                 measured, wanted)
        if abs(measured / wanted - 1) <= LATENCY_TOLERANCE or rounds == TARGET_ROUNDS:
            break
        predicted_saving = 1 - 1 / allocation.predicted
        measured_saving = 1 - 1 / measured
        if predicted_saving <= 0 or measured_saving <= 0:
            break
        scale *= measured_saving / predicted_saving
    if abs(measured / wanted - 1) > LATENCY_TOLERANCE:
        log.warning("measured speedup %.2fx is not within %d%% of the target %.2fx after %d rounds", measured,
                    round(100 * LATENCY_TOLERANCE), wanted, rounds)
    return result_ctx, compressed


def _compress_to_error(prepared, ctx, done):
    """Rounds of allocation until the verified output error (the largest over the outputs)
    is at most `max_error`: each round shrinks the error budget by the excess measured."""
    wanted = ctx.config.max_error
    correction = 1.0
    for rounds in range(1, TARGET_ROUNDS + 1):
        result_ctx, compressed = _finish(prepared, ctx, done, correction)
        measured = max(result_ctx.output_errors.values(), default=0.0)
        result_ctx.allocation = dataclasses.replace(result_ctx.allocation, rounds=rounds)
        log.info("error round %d: predicted %.4g, measured %.4g (target %.4g)", rounds,
                 result_ctx.allocation.predicted_error, measured, wanted)
        if measured <= wanted or not np.isfinite(measured) or measured == 0:
            break
        correction *= wanted / measured
    if measured > wanted:
        log.warning("measured output error %.3g is above the target %.3g after %d rounds", measured, wanted, rounds)
    return result_ctx, compressed


def compress_file(input_path: Union[str, os.PathLike], output_path: Union[str, os.PathLike],
                  config: Optional[CompressConfig] = None, calibration: Calibration = None, progress=None,
                  **options) -> CompressionResult:
    """`compress` a model file and write the result atomically to `output_path` (the file
    size in the report is the written file's)."""
    input_path, output_path = Path(input_path), Path(output_path)
    if output_path.exists() and input_path.exists() and output_path.resolve() == input_path.resolve():
        raise LrsdError("output path is the input path; refusing to overwrite the input model")
    if output_path.is_dir():
        raise LrsdError(f"output path is a directory: {output_path}")
    check_output_directory(output_path)
    result = compress(input_path, config, calibration, progress, **options)
    config = result.report.config
    save_model(result.model, output_path, external_data=bool(config.get("external_data")))
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
                          residual_size=residual.size if residual else 0)
