"""The Python API: `inspect_model`, `compress`, `compress_file` and `sweep`.

The pipeline they run (which passes, in which order, per round) is `onnx_lrsd.passes.pipeline`;
the searches over its rounds (targets, stages, the sweep) are `onnx_lrsd.passes.search`. The
core modules they draw on never import the passes.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

from .config import PRUNE, PRUNE_AND_LOW_RANK, SWEEP_POINTS, CompressConfig
from .errors import LrsdError, NothingToCompress, OutputErrorTooLarge
from .model.io import ModelSource, check_output_directory, load_model, save_model
from .passes.context import new_context
from .passes.pipeline import inspect
from .passes.search import (CompressionResult, Metric, compress_in_stages, compress_model, quantize_result,
                            recover_result)
from .passes.search import sweep as sweep_rounds
from .plan.cost import count_params, node_macs, unresolved_dims
from .passes.prune import compress_widths, group_infos
from .passes.width_and_rank import compress_width_and_rank
from .report.types import InspectReport, TargetInfo
from .runtime.calibrate import Calibration, calibration_batches
from .runtime.command_metric import CommandMetric
from .runtime.feeds import check_dim_names

__all__ = ["inspect_model", "compress", "compress_file", "sweep", "CompressionResult", "Calibration", "Metric",
           "calibration_batches", "SWEEP_POINTS"]


def inspect_model(model: ModelSource, dims: Sequence[Tuple[str, int]] = ()) -> InspectReport:
    """List the layers `compress` would factorize and the weight layers it would skip, with
    MACs at batch 1 and the symbolic input dims `dims` (None where dims are still unknown)."""
    source = load_model(model)
    config = CompressConfig(verify=False, dims=tuple(dims))
    check_dim_names(source, dict(dims))
    ctx = new_context(source, config)
    inspect(source, ctx)
    params = count_params(source)
    unresolved = unresolved_dims(source, dims)
    per_node = node_macs(source, dict(dims)) if not unresolved else {}
    targets = tuple(TargetInfo(t.name, t.op, tuple(int(d) for d in t.weight.shape), t.params,
                               per_node.get(t.name, t.macs) if not unresolved else None,
                               t.params / params if params else 0.0) for t in ctx.targets.values())
    groups, blocked = group_infos(source)
    return InspectReport(params=params, macs=sum(per_node.values()) if not unresolved else None, targets=targets,
                         skipped=tuple(ctx.skipped), unresolved=unresolved,
                         channel_groups=groups, blocked_groups=blocked)


def compress(model: ModelSource, config: Optional[CompressConfig] = None, calibration: Calibration = None,
             progress=None, metric: Optional[Metric] = None, **options) -> CompressionResult:
    """Compress `model` (path, bytes or ModelProto; never modified) and verify it.

    With `calibration` (see `calibration_batches`) every layer is fitted to reconstruct its
    original feature maps (data-aware); without, the weights are factorized data-free.
    `options` are `CompressConfig` fields applied on top of `config`. `progress(stage, done,
    total)` is called as work advances. With `metric` (or `config.metric_command`) and
    `max_metric_drop`, the global allocation searches the smallest parameter count whose metric
    is at most that much below the original's (`config` must not set another target); the metric
    should score on data the caller does not report on. A target no allocation reaches is an
    `LrsdError` naming the nearest model's numbers, unless `best_effort` (then that model is
    returned, with a warning).
    """
    config = (config or CompressConfig()).replace(**options) if options else (config or CompressConfig())
    if metric is not None and config.metric_command is not None:
        raise LrsdError("give a metric callable or a metric command, not both")
    if config.metric_command is not None:
        metric = CommandMetric(config.metric_command)
    if (metric is None) != (config.max_metric_drop is None):
        raise LrsdError("a metric and max_metric_drop go together")
    if metric is not None and (config.target is not None or config.stages > 1):
        raise LrsdError("max_metric_drop is a target of its own: drop the other target and stages")
    if config.method in (PRUNE, PRUNE_AND_LOW_RANK):
        if config.stages > 1:
            return compress_in_stages(model, config, calibration, progress, run=_width_run)
        result = _width_run(model, config.replace(recover=None, recover_time=None, then_quantize=None), calibration,
                            progress, metric, config.max_metric_drop)
        if config.recovers:
            result = recover_result(model, result, config, calibration, progress)
        return quantize_result(model, result, config, calibration) if config.then_quantize is not None else result
    if config.stages > 1:
        return compress_in_stages(model, config, calibration, progress)
    return compress_model(model, config, calibration, progress, metric, config.max_metric_drop)


def _width_run(model: ModelSource, config: CompressConfig, calibration: Calibration, progress,
               metric: Optional[Metric] = None, max_metric_drop: Optional[float] = None) -> CompressionResult:
    """One run of method prune (keep, params or MACs: `compress_widths`) or prune+lowrank (and
    prune with a searched target: `compress_width_and_rank`), without recovery."""
    searched = metric is not None or (config.target is not None and config.target[0] in ("latency", "error"))
    if config.method == PRUNE and not searched:
        return CompressionResult(*compress_widths(model, config, calibration))
    return compress_width_and_rank(model, config, calibration, progress, metric, max_metric_drop)


def sweep(model: ModelSource, values: Sequence[float] = SWEEP_POINTS, config: Optional[CompressConfig] = None,
          calibration: Calibration = None, metric: Optional[Metric] = None, progress=None,
          keep_models: bool = False, **options):
    """Global allocations at each `target_params` in `values`, each written and measured:
    params / MACs / file ratios, speedup against the original in onnxruntime (interleaved, at
    `latency_batch` and `latency_threads`), output error, and `metric` when given. Statistics,
    error curves and sensitivities are computed once. Returns the `SweepReport` and, with
    `keep_models`, the compressed models in the order of the points."""
    config = (config or CompressConfig()).replace(**options) if options else (config or CompressConfig())
    values = sorted({float(v) for v in values}, reverse=True)
    if not values or any(not 0 < v <= 1 for v in values):
        raise LrsdError(f"sweep values are params ratios in (0, 1], got {values}")
    if config.method in (PRUNE, PRUNE_AND_LOW_RANK):
        raise LrsdError(f"a sweep allocates low-rank factors: method {config.method} is not swept yet")
    if config.target is not None and config.target[0] != "params" or config.stages > 1:
        raise LrsdError("a sweep sets target_params itself: drop other targets and stages")
    return sweep_rounds(model, values, config, calibration, metric, progress, keep_models)


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
    check_worth_writing(result.report)
    config = result.report.config
    save_model(result.model, output_path, external_data=bool(config.get("external_data")),
               source_dir=input_path.parent.resolve())
    written = output_path.stat().st_size + _data_file_size(output_path)
    before = dataclasses.replace(result.report.before,
                                 file_bytes=input_path.stat().st_size + _data_file_size(input_path))
    after = dataclasses.replace(result.report.after, file_bytes=written)
    return CompressionResult(result.model, dataclasses.replace(result.report, before=before, after=after))


def check_worth_writing(report) -> None:
    """Raise `NothingToCompress` when nothing changed (no layer factorized in any stage, no
    quantization), `OutputErrorTooLarge` when the verified output error exceeds the config's
    `max_output_error` (unless `accept_error`)."""
    config = report.config
    factorized = any(layer.method != "dense" for layer in report.layers)
    if not factorized and report.after.params >= report.before.params and report.quantization is None:
        why = "; ".join(sorted({s.reason for s in report.skipped}))[:160] if report.skipped else ""
        raise NothingToCompress("nothing to compress: no layer was factorized"
                                + (f" (skipped: {why})" if why else "") + "; no output written")
    limit = config.get("max_output_error")
    if limit is None or config.get("accept_error") or not report.output_errors:
        return
    name, error = max(report.output_errors.items(), key=lambda item: item[1])
    if error > limit:  # NaN (an original whose outputs are not finite) is not judged
        hint = ("fit the layers to real inputs with --calib, or keep more (--keep, --max-error)"
                if "random" in report.verified_on else "keep more (--keep, --max-error) or add calibration data")
        raise OutputErrorTooLarge(f"output {name}: relative error {error:.3g} on {report.verified_on} is above "
                                  f"{limit:g}; not written ({hint}; --accept-error writes it anyway)")


def _data_file_size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return data.stat().st_size if data.is_file() else 0
