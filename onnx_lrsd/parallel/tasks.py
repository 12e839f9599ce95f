"""The pipeline's independent work as executor tasks (`onnx_lrsd.parallel.executor`).

- Calibration is sharded: the batches are cut into as many contiguous shards as the executor
  runs at once; each task runs onnxruntime on its shard and returns partial Gram statistics,
  which the driver sums in shard order (G = Σ_shards Σ_batches XᵀX, so the sum is the
  one-pass statistic up to float rounding; with one shard it is the same computation).
  The model goes to the workers once (`Executor.share`).
- Per-layer fits (data-free or data-aware), error curves, sensitivity probes and latency
  microbenchmarks are one task per layer (or per distinct layer shape), each with an estimate
  of its peak memory.

Results are applied by the caller in the order of the layers, whatever ran where.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..runtime.activations import (Feeds, LayerStatistics, add_statistics, collect_paired_statistics, collect_statistics,
                          own_statistics, statistics_bytes)
from ..config import CompressConfig
from ..plan.candidates import LayerCandidate, layer_candidates
from .executor import Executor, Task
from ..plan.factorize import LayerFactorization, factorize_data_aware, factorize_data_free, layer_ridge
from ..model.graph import export_model
from ..model.io import initializer_bytes
from ..runtime.calibrate import has_held_out
from ..runtime.latency import LatencyModel
from ..runtime.sensitivity import probe_layer
from ..plan.rank_select import LayerPlan
from ..decompose.stats import GramAccumulator
from ..model.layers import LayerTarget

Progress = Optional[Callable[[int, int], None]]


def shard_ranges(count: int, parts: int) -> List[range]:
    """`count` items cut into min(parts, count) contiguous ranges of near-equal size."""
    parts = max(1, min(parts, count))
    bounds = np.linspace(0, count, parts + 1).round().astype(int)
    return [range(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def geometry_only(target: LayerTarget) -> LayerTarget:
    """The target without its weight (what statistics read is the geometry: the activation,
    widths, Gemm / Conv attributes), so calibration tasks do not carry every weight."""
    return dataclasses.replace(target, weight=np.empty((0,) * target.weight.ndim, target.weight.dtype))


def _statistics_memory(model: onnx.ModelProto, targets: Sequence[LayerTarget], holdout: bool, cross: bool) -> int:
    """Peak bytes of a calibration task: its accumulators, the model and one onnxruntime copy."""
    grams = sum(statistics_bytes(t, cross) for t in targets) * (2 if holdout else 1)
    return grams + 3 * initializer_bytes(model)


def _shard_progress(progress: Progress, shards: List[range], total: int):
    def done(index: int) -> None:
        if progress is not None:
            progress(shards[index].stop, total)
    return done


def sharded_statistics(executor: Executor, model: onnx.ModelProto, targets: Sequence[LayerTarget],
                       batches: Sequence[Feeds], holdout_every: int = 0, mask_input: Optional[str] = None,
                       max_positions: int = 4096, seed: int = 0,
                       progress: Progress = None) -> Dict[str, LayerStatistics]:
    """`collect_statistics` over `batches`, sharded across the executor's workers."""
    shards = shard_ranges(len(batches), executor.slots)
    shared = executor.share(model)
    light = [geometry_only(t) for t in targets]
    has_holdout = has_held_out(len(batches), holdout_every)
    memory = _statistics_memory(model, targets, has_holdout, cross=False)
    in_process = executor.local(progress)
    tasks = [Task((shared, light, [batches[i] for i in shard], holdout_every, mask_input, max_positions, seed,
                   in_process, shard.start, len(batches), executor.task_threads), memory=memory)
             for shard in shards]
    done = _shard_progress(None if in_process else progress, shards, len(batches))
    return _summed(executor.imap(collect_statistics, tasks), len(shards), done)


def sharded_paired_statistics(executor: Executor, original: onnx.ModelProto, compressed: onnx.ModelProto,
                              targets: Sequence[LayerTarget], batches: Sequence[Feeds], holdout_every: int = 0,
                              mask_input: Optional[str] = None, max_positions: int = 4096,
                              seed: int = 0) -> Dict[str, LayerStatistics]:
    """`collect_paired_statistics` (sequential reconstruction), sharded the same way; the
    original model is shared once per call, as is the partly compressed one."""
    shards = shard_ranges(len(batches), executor.slots)
    shared_original, shared_compressed = executor.share(original), executor.share(compressed)
    light = [geometry_only(t) for t in targets]
    has_holdout = has_held_out(len(batches), holdout_every)
    memory = _statistics_memory(original, targets, has_holdout, cross=True) + 3 * initializer_bytes(compressed)
    tasks = [Task((shared_original, shared_compressed, light, [batches[i] for i in shard], holdout_every, mask_input,
                   max_positions, seed, shard.start, len(batches), executor.task_threads), memory=memory)
             for shard in shards]
    return _summed(executor.imap(collect_paired_statistics, tasks), len(shards), lambda index: None)


def _summed(parts, count: int, done) -> Dict[str, LayerStatistics]:
    """The `count` shards' statistics summed in shard order, in place into the first shard's
    (made writable before the next shard is fetched, when there is one), each shard dropped
    once added: the driver holds at most two shards' statistics at a time."""
    total = None
    for index, part in enumerate(parts):
        if total is None:
            total = own_statistics(part) if count > 1 else part
        else:
            add_statistics(total, part)
        del part
        done(index)
    return total or {}


def fit_memory(target: LayerTarget) -> int:
    """Rough peak bytes of fitting one layer in float64: its Gram and whitening factor
    (in²; a lookup's diagonal: in), the weight and its whitened and reconstructed copies
    (in·out), the SVD factors."""
    n, m = target.in_features, target.out_features
    return 8 * ((4 * n if target.lookup else 4 * n * n) + 6 * n * m + 2 * min(n, m) * (n + m))


def best_fit(target: LayerTarget, options: Sequence[LayerPlan], fit: GramAccumulator,
             holdout: Optional[GramAccumulator], ridge: float, bias_correction: bool,
             residual_min_gain: float = 0.0, solver: str = "auto") -> Tuple[LayerFactorization, LayerPlan]:
    """The data-aware fit of every candidate plan of the layer with the lowest (held-out)
    data error, ties to the fewest MACs, and its plan."""
    fits = [(factorize_data_aware(target, plan, fit, ridge, bias_correction, holdout, residual_min_gain, solver),
             plan) for plan in options]
    return min(fits, key=lambda pair: (pair[0].data_error, pair[1].cost.macs))


FitRequest = Tuple[LayerTarget, Sequence[LayerPlan], LayerStatistics]


def fit_layers(executor: Executor, requests: Sequence[FitRequest], config: CompressConfig):
    """(factorization, chosen plan) of every request, one task per layer, yielded in order."""
    tasks = [Task((target, list(options), stats.fit, stats.holdout, layer_ridge(target, config), config.bias_correction,
                   config.residual_min_gain, config.svd_solver), memory=fit_memory(target))
             for target, options, stats in requests]
    return executor.imap(best_fit, tasks)


def decompose_layers(executor: Executor, requests: Sequence[Tuple[LayerTarget, LayerPlan]], seed: int,
                     solver: str = "auto"):
    """Data-free factorizations, one task per layer, yielded in order."""
    tasks = [Task((target, plan, seed, solver), memory=fit_memory(target)) for target, plan in requests]
    return executor.imap(factorize_data_free, tasks)


def error_curves(executor: Executor, requests: Sequence[Tuple[LayerTarget, Optional[np.ndarray]]],
                 config: CompressConfig):
    """`layer_candidates` of every (target, Gram or None), one task per layer, yielded in order."""
    tasks = [Task((target, gram, config), memory=fit_memory(target)) for target, gram in requests]
    return executor.imap(layer_candidates, tasks)


Measure = Callable[[LatencyModel, LayerTarget, Tuple[int, ...], Sequence[LayerCandidate]], object]


def _measured(measure: Measure, model: LatencyModel, target: LayerTarget, shape: Tuple[int, ...],
              candidates: Sequence[LayerCandidate]):
    """`measure(model, ...)` and the times the model holds afterwards (for the driver's cache)."""
    return measure(model, target, shape, candidates), model.times


def latency_tasks(executor: Executor, measure: Measure, model: LatencyModel,
                  requests: Sequence[Tuple[LayerTarget, Tuple[int, ...], Sequence[LayerCandidate]]]):
    """`measure(model, target, shape, candidates)` per request, one task each asking for the
    model's threads (so a node runs no more timings at once than it has cores for them);
    times measured by workers are added to `model` (and its cache file). Yielded in order."""
    tasks = [Task((measure, model, target, shape, list(candidates)), memory=3 * target.weight.nbytes,
                  cpus=model.threads) for target, shape, candidates in requests]
    for result, times in executor.imap(_measured, tasks):
        model.record(times)
        yield result


ProbeRequest = Tuple[LayerTarget, Sequence[LayerPlan], GramAccumulator]


def sensitivity_probes(executor: Executor, graph: gs.Graph, template: onnx.ModelProto,
                       requests: Sequence[ProbeRequest], config: CompressConfig, batches: Sequence[Feeds],
                       reference: list, memory: int):
    """`probe_layer` of every (target, plans, fit statistics), one task per layer of `memory`
    bytes, yielded in order. The prepared graph (as a model, where tasks run elsewhere), the
    template, batches and reference outputs are shared once."""
    if not requests:
        return iter(())
    source = executor.local(graph)
    if source is None:
        source = executor.share(export_model(graph.copy(), template))
    template, batches, reference = (executor.share(v) for v in (template, batches, reference))
    tasks = [Task((source, template, target, list(plans), fit, config, batches, reference), memory=memory)
             for target, plans, fit in requests]
    return executor.imap(probe_layer, tasks)
