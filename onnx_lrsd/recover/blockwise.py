"""Block-wise reconstruction: the compressed model (student) cut into blocks at tensors that
alone carry everything later nodes read from earlier ones (besides tensors of the graph inputs
alone, such as a transformer's attention-mask bias read by every layer, which become extra
block inputs), each block holding compressed layers; block b is trained to reproduce the original's (teacher's) tensor y_b at its end from
the student's tensor x̂_b at its start, blocks in graph order (x̂_b comes from the blocks
before it as already trained, so errors do not accumulate):

    L_b = mean((f_b(x̂_b; θ_b) − y_b)²) / mean(y_b²)

A block's inputs and targets are computed once for it (two onnxruntime passes over the
samples) and its Adam steps stream batches of them (`distill.adam_loop`; the inputs are
activations, not augmented). A boundary whose tensor has another shape in the teacher (inside
a narrowed channel group) is not used. The step and time budgets are shared equally by the
blocks; each keeps its best held-out step and warms its step size up anew.

Blocks run one after the other, not as parallel tasks: block b learns from x̂_b as the trained
blocks before it produce it, which the fitted prefix does not (training every block from the
fitted prefix would make them independent, but each would then be fitted to inputs it never
sees once the blocks before it change). What runs on the executor is each step's gradient,
cut into shards of the batch (`shards`), as in end-to-end distillation.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx

from ..errors import LrsdError
from .distill import (RecoveryResult, _build_gradient, _chunks, _relative_error, _take, adam_loop, recover_models,
                      split_samples, support_masks, trainable_tensors, with_values)
from ..parallel.executor import Executor
from .gradients import TARGET, prepared_copy
from .shards import open_for, parent_batch, shard_count, sharded
from .types import LeftAsFitted, RecoverConfig, RecoverProgress, RecoveryReport

log = logging.getLogger(__name__)


def side_tensors(model: onnx.ModelProto) -> set:
    """Tensors computed from the graph inputs and small constants alone (no float constant of
    more than one element on their way): a graph input itself, or an attention mask turned into
    an additive bias once and read by every layer. A block takes those it reads as extra inputs,
    so they do not prevent a cut."""
    graph = model.graph
    weights = {t.name for t in graph.initializer
               if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)
               and int(np.prod(t.dims)) > 1}
    weights |= {n.output[0] for n in graph.node if n.op_type == "Constant"
                and any(a.name == "value" and a.t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)
                        and int(np.prod(a.t.dims)) > 1 for a in n.attribute)}
    constants = {t.name for t in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
    side = {i.name for i in graph.input if i.name not in constants}
    for node in graph.node:
        if node.op_type != "Constant" and all(not name or name in side or (name in constants and name not in weights)
                                              for name in node.input):
            side.update(node.output)
    return side


def cut_points(model: onnx.ModelProto) -> List[Tuple[int, str]]:
    """(node index, tensor) for every point of the (topologically sorted) graph after which a
    single non-constant tensor, besides `side_tensors`, is read by later nodes or is a graph
    output: the graph splits there into a prefix and a suffix joined by that tensor (and side
    tensors the suffix reads as inputs)."""
    graph = model.graph
    constants = {t.name for t in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
    side = side_tensors(model)
    last_use: Dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            if name and name not in constants:
                last_use[name] = index
    for out in graph.output:
        last_use[out.name] = len(graph.node)
    live = {i.name for i in graph.input if last_use.get(i.name, -1) >= 0}
    cuts = []
    for index, node in enumerate(graph.node[:-1]):
        live |= {o for o in node.output if last_use.get(o, -1) > index}
        live = {t for t in live if last_use.get(t, -1) > index}
        carried = live - side
        if len(carried) == 1:
            cuts.append((index, next(iter(carried))))
    return cuts


def choose_blocks(model: onnx.ModelProto, trainable: Sequence[str], usable: Callable[[str], bool], size: int
                  ) -> List[Tuple[Optional[str], str]]:
    """(start tensor or None for the graph inputs, end tensor) of each block: a block starts at
    the last usable cut point before its first node reading a trainable tensor and ends at the
    first usable cut point after `size` such nodes; the last block ends at the first graph
    output. (A block of one low-rank layer would only repeat its least-squares fit: blocks need
    several layers and the nonlinearities between them.)"""
    readers = {i for i, n in enumerate(model.graph.node) if set(n.input) & set(trainable)}
    cuts = {i: t for i, t in cut_points(model) if usable(t)}
    blocks, start, seen = [], None, 0
    for index in range(len(model.graph.node)):
        seen += index in readers
        if index in cuts and cuts[index] != start:
            if seen >= size:
                blocks.append((start, cuts[index]))
                start, seen = cuts[index], 0
            elif seen == 0:
                start = cuts[index]
    if seen or not blocks:
        blocks.append((start, model.graph.output[0].name))
    return blocks


def _block_model(model: onnx.ModelProto, start: Optional[str], end: str) -> onnx.ModelProto:
    """The sub-model from `start` (None: the graph inputs), and the side tensors its nodes
    read (`side_tensors`), to `end`."""
    from onnx.utils import Extractor

    initializers = {t.name for t in model.graph.initializer}
    inputs = [start] if start is not None else [i.name for i in model.graph.input if i.name not in initializers]
    if start is not None:
        nodes = list(model.graph.node)
        first = next(i for i, n in enumerate(nodes) if start in n.output) + 1
        last = next((i for i, n in enumerate(nodes) if end in n.output), len(nodes) - 1)
        read = {name for n in nodes[first:last + 1] for name in n.input}
        produced = {o for n in nodes[first:last + 1] for o in n.output}
        inputs += sorted((side_tensors(model) & read) - produced - {start})
    inferred = onnx.shape_inference.infer_shapes(model)
    try:
        return Extractor(inferred).extract_model(inputs, [end])
    except Exception as exc:  # onnx raises KeyError / ValueError for a tensor it cannot place
        raise LrsdError(f"cannot cut the block {start} -> {end}: {' '.join(str(exc).split())}") from None


def _run_all(model: onnx.ModelProto, names: Sequence[str], samples: Mapping[str, np.ndarray], batch: int,
             threads: int) -> Dict[str, np.ndarray]:
    from ..runtime.activations import ActivationRunner

    runner = ActivationRunner(model, list(names), threads)
    n = len(next(iter(samples.values())))
    parts = [runner.run(_take(samples, p)) for p in _chunks(n, batch)]
    return {name: np.concatenate([p[name] for p in parts]) for name in names}


def _with_shape_only_inputs_fixed(block: onnx.ModelProto, inputs: Dict[str, np.ndarray], n: int, batch: int
                                  ) -> Tuple[onnx.ModelProto, Dict[str, np.ndarray]]:
    """A side input without the batch axis (position ids, computed from shapes alone) comes
    out of `_run_all` once per chunk of `batch` samples, not once per sample: it is the same
    in every chunk (all samples share one padded shape), so the block gets the first chunk's
    value as a constant and stops taking it as an input."""
    from onnx import numpy_helper

    chunks = len(_chunks(n, batch))
    fixed = {k: v[: len(v) // chunks] for k, v in inputs.items() if len(v) != n and len(v) % chunks == 0}
    if not fixed:
        return block, inputs
    block = onnx.ModelProto.FromString(block.SerializeToString())
    kept = [i for i in block.graph.input if i.name not in fixed]
    del block.graph.input[:]
    block.graph.input.extend(kept)
    block.graph.initializer.extend(numpy_helper.from_array(np.ascontiguousarray(v), k) for k, v in fixed.items())
    return block, {k: v for k, v in inputs.items() if k not in fixed}


def recover_blockwise(student: onnx.ModelProto, teacher: onnx.ModelProto,
                      calibration: Sequence[Mapping[str, np.ndarray]], config: Optional[RecoverConfig] = None,
                      on_step: Optional[Callable[[RecoverProgress], None]] = None,
                      executor: Optional[Executor] = None) -> RecoveryResult:
    """Block-wise reconstruction of `student` against `teacher` on `calibration` (unlabeled feed
    dicts); neither model is modified. The report's losses and curve are the sum over blocks of
    their normalized held-out losses; its output errors are of the model output. Gradient
    shards run on `executor` (None: one opened from `config`)."""
    config = config or RecoverConfig()
    if executor is None:
        with open_for(config) as executor:
            return recover_blockwise(student, teacher, calibration, config, on_step, executor)
    start_time = time.perf_counter()
    samples, held_idx, train_idx, rng = split_samples(calibration, config)
    n, n_held = len(next(iter(samples.values()))), len(held_idx)
    output = config.output or teacher.graph.output[0].name
    current = prepared_copy(student)
    reference = prepared_copy(teacher)
    trainable = trainable_tensors(current, config.trainable)
    if not trainable:
        raise LrsdError("nothing to train: the model has no compressed or narrowed layers (tensors named "
                        "'<node>/lrsd/...'); use trainable='all'")
    teacher_names = {o for node in reference.graph.node for o in node.output}
    probe = _take(samples, np.arange(min(n, 2)))
    candidates = [t for _, t in cut_points(current) if t in teacher_names]
    shapes_s = _run_all(current, candidates, probe, 2, config.threads) if candidates else {}
    shapes_t = _run_all(reference, candidates, probe, 2, config.threads) if candidates else {}
    blocks = choose_blocks(current, trainable,
                           lambda t: t in shapes_s and shapes_s[t].shape == shapes_t[t].shape
                           and np.issubdtype(shapes_s[t].dtype, np.floating), config.block_size)
    held_out = _run_all(reference, [output], _take(samples, held_idx), config.batch, config.threads)[output]
    error_before = _relative_error(_session(current, config.threads), _take(samples, held_idx), held_out, output,
                                   config.batch)
    budget = config.step_budget
    per_block = config.replace(steps=max(1, budget // len(blocks)) if budget is not None else None,
                               time_budget=config.time_budget / len(blocks) if config.time_budget else None)
    shards = shard_count(config, executor)
    left: List[LeftAsFitted] = []
    before = after = 0.0
    steps, trained, curve = 0, set(), []
    for number, (start, end) in enumerate(blocks, 1):
        block = _block_model(current, start, end)
        names = [t for t in trainable if t in {i.name for i in block.graph.initializer}]
        if not names:
            continue
        feeds = [i.name for i in block.graph.input if i.name not in {t.name for t in block.graph.initializer}]
        inputs = {k: samples[k] for k in feeds if k in samples}  # graph inputs; the rest computed once
        inputs.update(_run_all(current, [k for k in feeds if k not in inputs], samples, config.batch, config.threads)
                      if len(inputs) < len(feeds) else {})
        block, inputs = _with_shape_only_inputs_fixed(block, inputs, n, config.batch)
        targets = _run_all(reference, [end], samples, config.batch, config.threads)[end]
        scale = float(np.mean(targets.astype(np.float64) ** 2)) or 1.0
        shapes = {k: (parent_batch(config, shards),) + v.shape[1:] for k, v in inputs.items()}
        lg, names, blocked = _build_gradient(block, block, names, shapes, "mse", end, False, scale, config.threads)
        left.extend(blocked)
        if lg is None:
            continue
        lg = sharded(lg, block, {k: v.shape[1:] for k, v in inputs.items()}, "mse", end, False, scale, executor,
                     config.batch, shards)
        fit = adam_loop(lg, inputs, train_idx, _take(inputs, held_idx), {TARGET: targets[held_idx]},
                        lambda picks, feeds: {TARGET: targets[picks]}, None, support_masks(current, names), per_block,
                        rng, time.perf_counter(), on_step)
        log.info("block %d/%d (%s -> %s): %d steps, held-out loss %.4g -> %.4g", number, len(blocks), start, end,
                 fit.steps, fit.curve[0][1], fit.loss_after)
        current = with_values(current, fit.params)
        before, after = before + fit.curve[0][1], after + fit.loss_after
        curve.append((steps + fit.best_step, after))
        steps += fit.steps
        trained.update(names)
    model = with_values(student, {t: _values(current, t) for t in trained}) if trained else student
    error_after = _relative_error(_session(model, config.threads), _take(samples, held_idx), held_out, output,
                                  config.batch)
    report = RecoveryReport(
        level=f"block-wise ({len(blocks)} blocks)", loss="mse", augment="none", output=output,
        trainable_tensors=len(trained), trainable_params=int(sum(_values(current, t).size for t in trained)),
        train_samples=len(train_idx), heldout_samples=n_held, steps=steps, best_step=steps,
        stopped_by="blocks", seconds=time.perf_counter() - start_time, loss_before=before if trained else math.nan,
        loss_after=after if trained else math.nan, error_before=error_before, error_after=error_after,
        curve=((0, before),) + tuple(curve), left_as_fitted=tuple(left))
    log.info("block-wise recovery: %d blocks, %d steps, output error %.4g -> %.4g", len(blocks), steps,
             error_before, error_after)
    return RecoveryResult(model, report)


def _values(model: onnx.ModelProto, name: str) -> np.ndarray:
    from onnx import numpy_helper

    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def _session(model: onnx.ModelProto, threads: int):
    from ..runtime.bench import make_session

    return make_session(model, threads)


def recover_at_level(student: onnx.ModelProto, teacher: onnx.ModelProto,
                     calibration: Sequence[Mapping[str, np.ndarray]], config: Optional[RecoverConfig] = None,
                     on_step: Optional[Callable[[RecoverProgress], None]] = None,
                     executor: Optional[Executor] = None) -> RecoveryResult:
    """Recovery at `config.level`: end-to-end distillation (`distill.recover_models`), block-wise
    reconstruction (`recover_blockwise`), or block-wise on half the budget followed by
    end-to-end on the other half (one report for both). Gradient shards run on `executor`
    (None: one opened from `config`, for both levels)."""
    import dataclasses

    config = config or RecoverConfig()
    if executor is None:
        with open_for(config) as executor:
            return recover_at_level(student, teacher, calibration, config, on_step, executor)
    if config.level == "end-to-end":
        return recover_models(student, teacher, calibration, config, on_step, executor)
    both = config.level == "blocks+end-to-end"
    share = 0.5 if both else 1.0
    steps = config.step_budget
    half = config.replace(level="end-to-end", steps=max(1, round(steps * share)) if steps else steps,
                          time_budget=config.time_budget * share if config.time_budget else None)
    blocks = recover_blockwise(student, teacher, calibration, half, on_step, executor)
    if not both:
        return blocks
    result = recover_models(blocks.model, teacher, calibration, half, on_step, executor)
    done, report = blocks.report.steps, result.report
    return RecoveryResult(result.model, dataclasses.replace(
        report, level=f"{blocks.report.level} + end-to-end", error_before=blocks.report.error_before,
        steps=done + report.steps, best_step=done + report.best_step, seconds=blocks.report.seconds + report.seconds,
        curve=tuple((done + s, l) for s, l in report.curve),
        left_as_fitted=tuple(dict.fromkeys(blocks.report.left_as_fitted + report.left_as_fitted))))
