"""Layer-input statistics from calibration data run through onnxruntime.

The wanted tensors are appended to `graph.output` of a copy of the model, which runs with all
graph optimisations off (fusions would hide them). Each batch's activations are turned into
the rows the layer multiplies (`layer_rows`) and streamed into float64 Gram accumulators.
onnxruntime runs the next batch on a second thread while the current one is accumulated (both
release the GIL), so at most two batches' activations are alive at once.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, TypeVar, Union

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import LrsdError, runtime_message
from ..model.io import serialize_for_runtime
from ..model.mapped import runtime_options
from ..decompose.stats import GramAccumulator, TokenCounts, im2col
from ..model.layers import ConvGeometry, LayerTarget
from .calibrate import has_held_out, is_held_out

log = logging.getLogger(__name__)

Feeds = Mapping[str, np.ndarray]


Accumulator = Union[GramAccumulator, TokenCounts]


@dataclass
class LayerStatistics:
    """Calibration statistics of one layer's input rows: `fit` for fitting, `holdout` (when
    held-out batches exist) for an honest reconstruction error. A lookup table's are its
    token counts (`TokenCounts`: the diagonal of its one-hot inputs' Gram)."""

    fit: Accumulator
    holdout: Optional[Accumulator] = None

    @property
    def nbytes(self) -> int:
        one = 8 * self.fit.dim if isinstance(self.fit, TokenCounts) else gram_bytes(self.fit.dim, self.fit.track_cross)
        return one * (2 if self.holdout is not None else 1)


def gram_bytes(dim: int, cross: bool = False) -> int:
    return 8 * dim * dim * (2 if cross else 1)


def statistics_bytes(target: LayerTarget, cross: bool = False) -> int:
    """Bytes of one accumulator of the target's statistics: a Gram (and cross term), or a
    lookup's counts."""
    return 8 * target.in_features if target.lookup else gram_bytes(target.in_features, cross)


def new_accumulator(target: LayerTarget, cross: bool = False) -> Accumulator:
    """Empty statistics for the target: token counts for a lookup, else a Gram accumulator."""
    return TokenCounts(target.in_features) if target.lookup else GramAccumulator(target.in_features, track_cross=cross)


def explicit_pads(geometry: ConvGeometry, in_spatial: Sequence[int]) -> tuple:
    """Pads (begins..., ends...) of a Conv for an input of `in_spatial`, resolving auto_pad."""
    n = len(geometry.kernel_shape)
    if geometry.auto_pad in ("NOTSET", ""):
        return geometry.pads
    if geometry.auto_pad == "VALID":
        return (0,) * (2 * n)
    begins, ends = [], []
    for size, k, s, d in zip(in_spatial, geometry.kernel_shape, geometry.strides, geometry.dilations):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begin, end = (small, large) if geometry.auto_pad == "SAME_UPPER" else (large, small)
        begins.append(begin)
        ends.append(end)
    return tuple(begins + ends)


def layer_rows(target: LayerTarget, x: np.ndarray, mask: Optional[np.ndarray], max_positions: int,
               rng: np.random.Generator):
    """The rows X [..., in] that the layer multiplies by its [in, out] weight, and the row
    mask (a [...] boolean array, or None) derived from the user's padding mask. A lookup's
    rows are its indices themselves (one-hot rows, counted by `TokenCounts`)."""
    if target.lookup:
        return x, (mask if mask is not None and x.shape == mask.shape else None)
    if target.conv is not None:
        g = target.conv
        pads = explicit_pads(g, x.shape[2:])
        return im2col(x, g.kernel_shape, g.strides, pads, g.dilations, max_positions=max_positions, rng=rng), None
    if target.gemm is not None:
        return (x.T if target.gemm.trans_a else x), None
    if target.weight_side == "left":
        x = np.swapaxes(x, -1, -2)
    if mask is not None and x.shape[:-1] == mask.shape:
        return x, mask
    return x, None


def pruned_to(model: onnx.ModelProto, tensor_names: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` whose outputs are `tensor_names`, without the nodes they do not need
    (models with subgraphs keep every node: their bodies read outer tensors implicitly)."""
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    graph = pruned.graph
    del graph.output[:]
    graph.output.extend(onnx.ValueInfoProto(name=name) for name in tensor_names)
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return pruned
    needed = set(tensor_names)
    kept = []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    return pruned


class ActivationRunner:
    """Runs `model` in onnxruntime (optimisations off) returning the named tensors; the model
    is pruned to what they need."""

    def __init__(self, model: onnx.ModelProto, tensor_names: Sequence[str], threads: int = 0):
        augmented = pruned_to(model, tensor_names)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3  # pruned copies leave unused initializers: not worth a warning
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        runtime_options(options)
        try:
            self.session = ort.InferenceSession(serialize_for_runtime(augmented), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises several unrelated types
            raise LrsdError(f"onnxruntime cannot run the model for calibration: {runtime_message(exc)}") from None
        self.names = list(tensor_names)
        self.inputs = {i.name for i in self.session.get_inputs()}

    def run(self, feeds: Feeds) -> Dict[str, np.ndarray]:
        try:
            values = self.session.run(self.names, {k: v for k, v in feeds.items() if k in self.inputs})
        except Exception as exc:  # invalid feeds surface here as onnxruntime errors
            raise LrsdError(f"onnxruntime failed on a calibration batch: {runtime_message(exc)}") from None
        return dict(zip(self.names, values))


Result = TypeVar("Result")


def prefetched(run: Callable[[Feeds], Result], batches: Sequence[Feeds]) -> Iterator[Tuple[Feeds, Result]]:
    """(feeds, run(feeds)) for each batch in order, run(batch i + 1) computing on a second
    thread while the caller works on batch i."""
    if not batches:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lrsd-calibration") as ahead:
        pending = ahead.submit(run, batches[0])
        for position, feeds in enumerate(batches):
            result = pending.result()
            if position + 1 < len(batches):
                pending = ahead.submit(run, batches[position + 1])
            yield feeds, result


def _row_mask(feeds: Feeds, mask_input: Optional[str]) -> Optional[np.ndarray]:
    if mask_input is None:
        return None
    if mask_input not in feeds:
        raise LrsdError(f"mask input '{mask_input}' is not among the calibration inputs ({', '.join(feeds)})")
    return np.asarray(feeds[mask_input]) != 0


def memory_groups(targets: Sequence[LayerTarget], budget_bytes: int, per_layer_bytes) -> List[List[LayerTarget]]:
    """Split targets into consecutive groups whose statistics fit in `budget_bytes`; a layer
    that alone exceeds the budget is left out (it falls back to data-free)."""
    groups: List[List[LayerTarget]] = [[]]
    used = 0
    for target in targets:
        size = per_layer_bytes(target)
        if size > budget_bytes:
            log.warning("%s: statistics need %.0f MB, over the %.0f MB cap; fitted without data",
                        target.name, size / 2**20, budget_bytes / 2**20)
            continue
        if used + size > budget_bytes and groups[-1]:
            groups.append([])
            used = 0
        groups[-1].append(target)
        used += size
    return [g for g in groups if g]


def collect_statistics(model: onnx.ModelProto, targets: Sequence[LayerTarget], batches: Iterable[Feeds],
                       holdout_every: int = 0, mask_input: Optional[str] = None, max_positions: int = 4096,
                       seed: int = 0, progress=None, first_index: int = 0, total_batches: Optional[int] = None,
                       threads: int = 0) -> Dict[str, LayerStatistics]:
    """Gram statistics of every target's input over `batches` (one onnxruntime pass).

    Batch i goes to the held-out statistics when `holdout_every` > 0 and
    i % holdout_every == holdout_every − 1. `batches` may be a shard of a larger set: its first
    batch is number `first_index` of `total_batches`; conv positions are drawn per batch and
    layer (generator seeded with (seed, i)), so shards summed give the statistics of one pass.
    """
    batches = list(batches)
    total = len(batches) if total_batches is None else total_batches
    runner = ActivationRunner(model, sorted({t.activation for t in targets}), threads)
    has_holdout = has_held_out(total, holdout_every)
    stats = {t.name: LayerStatistics(new_accumulator(t), new_accumulator(t) if has_holdout else None)
             for t in targets}
    for index, (feeds, activations) in enumerate(prefetched(runner.run, batches), first_index):
        mask = _row_mask(feeds, mask_input)
        held_out = is_held_out(index, total, holdout_every)
        for target in targets:
            rows, row_mask = layer_rows(target, activations[target.activation], mask, max_positions,
                                        np.random.default_rng([seed, index]))
            layer = stats[target.name]
            (layer.holdout if held_out else layer.fit).update(rows, row_mask)
        if progress is not None:
            progress(index + 1 - first_index, len(batches))
    return stats


def own_statistics(stats: Dict[str, LayerStatistics]) -> Dict[str, LayerStatistics]:
    """`stats` with every accumulator's arrays writable (`GramAccumulator.own`)."""
    for layer in stats.values():
        for acc in (layer.fit, layer.holdout):
            if acc is not None:
                acc.own()
    return stats


def add_statistics(total: Dict[str, LayerStatistics], part: Dict[str, LayerStatistics]) -> None:
    """Add a shard's statistics into `total`, layer by layer, in place (same layers, same
    held-out layout)."""
    for name, stats in total.items():
        stats.fit.add(part[name].fit)
        if stats.holdout is not None:
            stats.holdout.add(part[name].holdout)


def collect_paired_statistics(original: onnx.ModelProto, compressed: onnx.ModelProto,
                              targets: Sequence[LayerTarget], batches: Sequence[Feeds], holdout_every: int = 0,
                              mask_input: Optional[str] = None, max_positions: int = 4096,
                              seed: int = 0, first_index: int = 0, total_batches: Optional[int] = None,
                              threads: int = 0, columns: Optional[Mapping[str, np.ndarray]] = None
                              ) -> Dict[str, LayerStatistics]:
    """X̂ᵀX̂, X̂ᵀX and the means, where X are a target's input rows in the original model and
    X̂ the same rows in the partly compressed one (sequential reconstruction); held-out
    batches and shards as in `collect_statistics`. `columns[name]`: the original's input
    features (im2col columns) that the compressed layer's are, where earlier narrowing cut
    some of its input (a reader of a channel Concat)."""
    names = sorted({t.activation for t in targets})
    reference, current = ActivationRunner(original, names, threads), ActivationRunner(compressed, names, threads)
    total = len(batches) if total_batches is None else total_batches
    has_holdout = has_held_out(total, holdout_every)
    stats = {t.name: LayerStatistics(new_accumulator(t, cross=True),
                                     new_accumulator(t, cross=True) if has_holdout else None) for t in targets}

    def both(feeds: Feeds) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
        return reference.run(feeds), current.run(feeds)

    for index, (feeds, (x, x_hat)) in enumerate(prefetched(both, batches), first_index):
        mask = _row_mask(feeds, mask_input)
        held_out = is_held_out(index, total, holdout_every)
        for target in targets:
            # the same positions must be drawn for both: one generator state per batch and layer
            rows, row_mask = layer_rows(target, x[target.activation], mask, max_positions,
                                        np.random.default_rng([seed, index]))
            if columns is not None and target.name in columns:
                rows = rows[..., columns[target.name]]
            rows_hat, _ = layer_rows(target, x_hat[target.activation], mask, max_positions,
                                     np.random.default_rng([seed, index]))
            layer = stats[target.name]
            (layer.holdout if held_out else layer.fit).update_pair(rows_hat, rows, row_mask)
    return stats
