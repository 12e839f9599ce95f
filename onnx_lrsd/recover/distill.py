"""End-to-end distillation: Adam on the compressed model's (student's) weights so that its
output matches the original's (teacher's) on augmented unlabeled inputs.

Each step draws `batch` training samples (a seeded permutation per epoch), augments them, lets
the teacher label them, and takes one Adam step with onnxruntime's loss and gradients:

    m ← β₁m + (1−β₁)g,  v ← β₂v + (1−β₂)g²,  θ ← θ − lr_t·s_θ·m̂/(√v̂ + ε)   (m̂, v̂ bias-corrected)

with lr_t = lr·w_k·½(1 + cos πt) (t: spent share of the step or time budget; or without the
cosine factor), w_k = min(1, k / warmup) at step k = 1, 2, ... (a linear warm-up; 1 without).
s_θ scales the step of each tensor θ (`step_scale`): 1 ("absolute", plain Adam: each weight
moves by about lr_t a step, whatever its tensor's scale and fan-in), or ("relative", the
Adafactor / LAMB idea of a step relative to the weight's scale)

    s_θ = max(RMS(θ₀), f·mean_τ RMS(τ₀))   (θ₀: the tensor when the run or block starts)

over the trained tensors τ, f = `RELATIVE_FLOOR`, so a zero-initialized bias still moves.
The gradient g of a batch may be summed from shards of it computed by executor tasks (`shards`).

A residual stored as a sparse initializer keeps its support: its gradient is masked to it.
Every `eval_every` steps the loss on the held-out samples (not augmented) is measured; the
parameters of the best held-out step are returned, and `patience` evaluations without a new
best stop the run once `min_evals` evaluations are done. Memory: the samples, the held-out
teacher outputs and three copies of the trainable weights (parameters, two moments) plus the
best step's; nothing grows with steps.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import LrsdError
from .augment import input_kind, make_augment
from ..parallel.executor import Executor
from .gradients import TARGET, TEACHER_LOGP, TEACHER_PROB, LossGradient, UnsupportedOp, prepared_copy
from .shards import open_for, parent_batch, shard_count, sharded
from .types import LeftAsFitted, RecoverConfig, RecoverProgress, RecoveryReport

log = logging.getLogger(__name__)

ADAM_EPS = 1e-8
PROB_TOLERANCE = 1e-3
MAX_RETRIES = 8
RELATIVE_FLOOR = 0.1
"""`step_scale="relative"`: a tensor's scale is at least this share of the trained tensors' mean
RMS (zero-initialized biases still move)."""


@dataclass(frozen=True)
class RecoveryResult:
    model: onnx.ModelProto
    report: RecoveryReport


# --------------------------------------------------------------------------- what is trained


def _float_tensors(model: onnx.ModelProto) -> Dict[str, onnx.TensorProto]:
    """Float initializers and Constant-node tensors of `model`, by name."""
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)
    found = {t.name: t for t in model.graph.initializer if t.data_type in floats}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type in floats:
                    found[node.output[0]] = attr.t
    for sparse in model.graph.sparse_initializer:
        if sparse.values.data_type in floats:
            found[sparse.values.name] = sparse.values
    return found


def trainable_tensors(model: onnx.ModelProto, which: str) -> List[str]:
    """Names of the weights to train. "compressed": tensors named `{node}/lrsd/...` (low rank:
    factors, residual values, shifted biases; width reduction: the narrowed producers' and
    consumers' weights and biases, and the per-channel constants between them such as BatchNorm
    scale and shift or depthwise weights) and the bias inputs of nodes named `{node}/lrsd/...`;
    "all": every float weight with more than one element. BatchNorm statistics never train."""
    floats = _float_tensors(model)
    consumers: Dict[str, List[Tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, index))
    names = []
    for name, tensor in floats.items():
        uses = consumers.get(name, [])
        if not uses or int(np.prod(tensor.dims)) <= 1:
            continue
        if any(node.op_type == "BatchNormalization" and index >= 3 for node, index in uses):
            continue
        if which == "all" or "/lrsd/" in name:
            names.append(name)
        elif any("/lrsd/" in node.name and (node.op_type in ("Gemm", "Conv") and index == 2 or node.op_type == "Add")
                 for node, index in uses):
            names.append(name)
    return names


def support_masks(model: onnx.ModelProto, names: Sequence[str]) -> Dict[str, np.ndarray]:
    """For trainable residuals stored as sparse initializers: their fixed support (≠ 0)."""
    from .gradients import densify_sparse

    sparse = {s.values.name for s in model.graph.sparse_initializer} & set(names)
    if not sparse:
        return {}
    copy = onnx.ModelProto()
    copy.graph.sparse_initializer.extend(s for s in model.graph.sparse_initializer if s.values.name in sparse)
    densify_sparse(copy)
    return {t.name: numpy_helper.to_array(t) != 0 for t in copy.graph.initializer}


def with_values(model: onnx.ModelProto, values: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `model` whose named weights (initializers, Constant nodes, sparse
    initializers on their own support) hold `values`, in the weights' own dtypes, subnormal
    values flushed to zero."""
    out = onnx.ModelProto()
    out.CopyFrom(model)

    def refill(tensor: onnx.TensorProto, array: np.ndarray) -> None:
        old = numpy_helper.to_array(tensor)
        new = np.array(array, dtype=old.dtype).reshape(old.shape)
        new[np.abs(new) < np.finfo(new.dtype).tiny] = 0  # subnormals run many times slower on x86
        tensor.CopyFrom(numpy_helper.from_array(new, tensor.name))

    for tensor in out.graph.initializer:
        if tensor.name in values:
            refill(tensor, values[tensor.name])
    for node in out.graph.node:
        if node.op_type == "Constant" and node.output[0] in values:
            for attr in node.attribute:
                if attr.name == "value":
                    refill(attr.t, values[node.output[0]])
    for sparse in out.graph.sparse_initializer:
        name = sparse.values.name
        if name in values:
            indices = numpy_helper.to_array(sparse.indices)
            dense = np.asarray(values[name])
            picked = dense.reshape(-1)[indices] if indices.ndim == 1 else dense[tuple(indices.T)]
            refill(sparse.values, picked)
    return out


# --------------------------------------------------------------------------- data


def stack_samples(batches: Sequence[Mapping[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    """One array per input over all batches; integer inputs of different lengths are padded
    with 0 (token ids and masks) so that every sample has the same static shape."""
    if not batches:
        raise LrsdError("recovery needs calibration data (unlabeled inputs)")
    out = {}
    for name in batches[0]:
        arrays = [np.asarray(b[name]) for b in batches]
        if len({a.shape[1:] for a in arrays}) > 1:
            if not all(np.issubdtype(a.dtype, np.integer) and a.ndim == 2 for a in arrays):
                raise LrsdError(f"calibration batches of input '{name}' differ in shape; recovery needs one shape")
            width = max(a.shape[1] for a in arrays)
            arrays = [np.pad(a, ((0, 0), (0, width - a.shape[1]))) for a in arrays]
        out[name] = np.concatenate(arrays)
    return out


def split_samples(calibration: Sequence[Mapping[str, np.ndarray]], config: RecoverConfig
                  ) -> Tuple[Dict[str, np.ndarray], np.ndarray, np.ndarray, np.random.Generator]:
    """(stacked samples, held-out indices, training indices, the generator that drew them): a
    seeded permutation (`config.seed`) holds out a `config.holdout` share, at least one sample,
    leaving at least one to train on."""
    samples = stack_samples(calibration)
    n = len(next(iter(samples.values())))
    if n < 2:
        raise LrsdError(f"recovery needs at least 2 calibration samples, got {n}")
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(n)
    n_held = min(n - 1, max(1, int(round(config.holdout * n))))
    return samples, np.sort(order[:n_held]), np.sort(order[n_held:]), rng


def _take(samples: Mapping[str, np.ndarray], index: np.ndarray) -> Dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v[index]) for k, v in samples.items()}


def _is_probability(y: np.ndarray) -> bool:
    return bool(y.min() >= 0 and y.max() <= 1 + PROB_TOLERANCE and np.allclose(y.sum(axis=-1), 1, atol=PROB_TOLERANCE))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class _Targets:
    """Teacher outputs → the loss's target feeds."""

    def __init__(self, loss: str, probabilities: bool):
        self.loss, self.probabilities = loss, probabilities

    def __call__(self, y: np.ndarray) -> Dict[str, np.ndarray]:
        if self.loss == "mse":
            return {TARGET: y}
        p = y if self.probabilities else _softmax(y.astype(np.float64)).astype(y.dtype)
        return {TEACHER_PROB: p, TEACHER_LOGP: np.log(np.maximum(p, 1e-30)).astype(y.dtype)}


# --------------------------------------------------------------------------- the loop


def _chunks(n: int, size: int):
    return [np.arange(i, min(i + size, n)) for i in range(0, n, size)]


def _relative_error(session, feeds: Mapping[str, np.ndarray], teacher_out: np.ndarray, output: str, size: int) -> float:
    num = den = 0.0
    for part in _chunks(len(teacher_out), size):
        y = session.run([output], _take(feeds, part))[0].astype(np.float64)
        t = teacher_out[part].astype(np.float64)
        num += float(((y - t) ** 2).sum())
        den += float((t ** 2).sum())
    return math.sqrt(num / den) if den else math.sqrt(num)


def step_size(config: RecoverConfig, step: int, seconds: float) -> float:
    """lr of step `step` (1, 2, ...) taken `seconds` into the run: lr·w·d, w the linear warm-up
    min(1, step / warmup), d the schedule's decay at the spent share before the step."""
    warm = min(1.0, step / config.warmup) if config.warmup else 1.0
    return config.lr * warm * _decay(config, step - 1, seconds)


def _decay(config: RecoverConfig, step: int, seconds: float) -> float:
    """The schedule's factor on lr: ½(1 + cos πt), t the spent share of the budget."""
    if config.schedule == "constant":
        return 1.0
    spent = 0.0
    if config.step_budget:
        spent = step / config.step_budget
    if config.time_budget:
        spent = max(spent, seconds / config.time_budget)
    return 0.5 * (1.0 + math.cos(math.pi * min(spent, 1.0)))


def _build_gradient(student, prepared, trainable, shapes, loss, output, probabilities, scale, threads):
    """LossGradient over `trainable`; a weight an op cannot differentiate is dropped (left as
    fitted) and the rest retried. Returns (LossGradient or None, trainable, left)."""
    left: List[LeftAsFitted] = []
    trainable = list(trainable)
    for _ in range(MAX_RETRIES):
        try:
            gradient = LossGradient(student, trainable, shapes, loss=loss, output=output,
                                    output_is_probability=probabilities, mse_scale=scale, threads=threads)
            return gradient, trainable, left
        except UnsupportedOp as exc:
            blocked = _weights_of(prepared, exc, trainable)
            if not blocked:
                left.append(LeftAsFitted("model", str(exc)))
                return None, [], left
            left.extend(LeftAsFitted(name, str(exc)) for name in blocked)
            trainable = [t for t in trainable if t not in blocked]
            if not trainable:
                return None, [], left
    left.append(LeftAsFitted("model", "too many weights without gradient rules"))
    return None, [], left


def _weights_of(model: onnx.ModelProto, exc: UnsupportedOp, trainable: Sequence[str]) -> List[str]:
    """Trainable weights read directly by the node (or, unnamed, by grouped ops of that type)
    that has no gradient rule, at the input positions it names (e.g. a grouped Conv's weight,
    not its bias)."""
    def grouped(node):
        return any(a.name == "group" and a.i > 1 for a in node.attribute)
    nodes = [n for n in model.graph.node
             if (n.name == exc.node if exc.node else n.op_type == exc.op_type and grouped(n))]
    read = {name for n in nodes for i, name in enumerate(n.input) if exc.inputs is None or i in exc.inputs}
    return [t for t in trainable if t in read]


def step_scales(params: Mapping[str, np.ndarray], mode: str) -> Dict[str, float]:
    """The factor s_θ on each tensor's Adam step: 1 ("absolute"), or ("relative")
    s_θ = max(RMS(θ₀), f·mean over tensors of RMS(θ₀)), f = `RELATIVE_FLOOR`."""
    if mode == "absolute":
        return {name: 1.0 for name in params}
    rms = {name: float(np.sqrt(np.mean(np.square(value)))) if value.size else 0.0 for name, value in params.items()}
    floor = RELATIVE_FLOOR * float(np.mean(list(rms.values()))) if rms else 0.0
    return {name: max(value, floor) or 1.0 for name, value in rms.items()}


@dataclass(frozen=True)
class LoopResult:
    """What `adam_loop` returns: the best held-out step's parameters and the run's record."""

    params: Dict[str, np.ndarray]
    steps: int
    best_step: int
    stopped_by: str
    loss_after: float
    curve: Tuple[Tuple[int, float], ...]


def adam_loop(lg: LossGradient, samples: Mapping[str, np.ndarray], train_idx: np.ndarray,
              held: Mapping[str, np.ndarray], held_targets: Mapping[str, np.ndarray],
              label: Callable[[np.ndarray, Dict[str, np.ndarray]], Dict[str, np.ndarray]], augment,
              masks: Mapping[str, np.ndarray], config: RecoverConfig, rng: np.random.Generator, start: float,
              on_step: Optional[Callable[[RecoverProgress], None]] = None) -> LoopResult:
    """Adam on `lg`'s trainable weights over `config`'s step / time budget (time from `start`):
    batches of the training samples `train_idx` (a seeded permutation per epoch), augmented,
    labelled by `label(sample indices, feeds)`; the held-out loss every `eval_every` steps
    keeps the best step and stops after `patience` evaluations without improvement (not before
    `min_evals` evaluations)."""
    n_held = len(next(iter(held_targets.values())))
    params = {k: v.astype(np.float64) for k, v in lg.initial.items()}
    moment1 = {k: np.zeros_like(v) for k, v in params.items()}
    moment2 = {k: np.zeros_like(v) for k, v in params.items()}
    scales = step_scales(params, config.step_scale)

    def heldout_loss() -> float:
        total = 0.0
        for part in _chunks(n_held, config.batch):
            batch_targets = {k: v[part] for k, v in held_targets.items()}
            total += lg.loss_only(_take(held, part), batch_targets, params) * len(part)
        return total / n_held

    loss_before = heldout_loss()
    curve = [(0, loss_before)]
    best = (loss_before, 0, {k: v.copy() for k, v in params.items()})
    budget = config.step_budget
    stale, step, stopped_by, train_loss = 0, 0, "steps", math.nan
    epoch: List[int] = []
    while True:
        if budget is not None and step >= budget:
            stopped_by = "steps"
            break
        if config.time_budget is not None and time.perf_counter() - start >= config.time_budget:
            stopped_by = "time"
            break
        picks = []
        while len(picks) < config.batch:  # a fresh seeded permutation of the training samples per epoch
            if not epoch:
                epoch = list(rng.permutation(train_idx))
            picks.append(epoch.pop())
        feeds = _take(samples, np.array(picks))
        if augment is not None:
            feeds = augment(feeds, rng)
        batch_targets = label(np.array(picks), feeds)
        train_loss, grads = lg(feeds, batch_targets, params)
        if not math.isfinite(train_loss):
            stopped_by = "diverged"
            break
        step += 1
        b1, b2 = config.beta1, config.beta2
        lr = step_size(config, step, time.perf_counter() - start)
        for name, g in grads.items():
            g = g.astype(np.float64)
            if name in masks:
                g = g * masks[name]
            moment1[name] = b1 * moment1[name] + (1 - b1) * g
            moment2[name] = b2 * moment2[name] + (1 - b2) * g * g
            m_hat = moment1[name] / (1 - b1 ** step)
            v_hat = moment2[name] / (1 - b2 ** step)
            params[name] -= lr * scales[name] * m_hat / (np.sqrt(v_hat) + ADAM_EPS)
        evaluated = None
        last = budget is not None and step >= budget
        if step % config.eval_every == 0 or last:
            evaluated = heldout_loss()
            curve.append((step, evaluated))
            if evaluated < best[0]:
                best, stale = (evaluated, step, {k: v.copy() for k, v in params.items()}), 0
            else:
                stale += 1
        if on_step is not None:
            on_step(RecoverProgress(step, budget, time.perf_counter() - start, config.time_budget, train_loss,
                                    evaluated, best[0]))
        if config.patience is not None and stale >= config.patience and len(curve) > config.min_evals:
            stopped_by = "early stop"
            break
    if curve[-1][0] != step and stopped_by != "diverged":
        evaluated = heldout_loss()
        curve.append((step, evaluated))
        if evaluated < best[0]:
            best = (evaluated, step, {k: v.copy() for k, v in params.items()})
    return LoopResult(best[2], step, best[1], stopped_by, best[0], tuple(curve))


def recover_models(student: onnx.ModelProto, teacher: onnx.ModelProto, calibration: Sequence[Mapping[str, np.ndarray]],
                   config: Optional[RecoverConfig] = None, on_step: Optional[Callable[[RecoverProgress], None]] = None,
                   executor: Optional[Executor] = None) -> RecoveryResult:
    """Fine-tune `student` (compressed) to reproduce `teacher` (original) on `calibration`
    (feed dicts, unlabeled) by end-to-end distillation, whatever `config.level` says (the levels
    are chosen by `blockwise.recover_at_level`); neither model is modified. Ctrl-C propagates and
    keeps nothing. Gradient shards run on `executor` (None: one opened from `config`)."""
    from ..runtime.bench import make_session

    config = (config or RecoverConfig()).replace(level="end-to-end")
    if executor is None:
        with open_for(config) as executor:
            return recover_models(student, teacher, calibration, config, on_step, executor)
    start = time.perf_counter()
    samples, held_idx, train_idx, rng = split_samples(calibration, config)
    held, n_held = _take(samples, held_idx), len(held_idx)
    output = config.output or teacher.graph.output[0].name
    if output not in [o.name for o in student.graph.output]:
        raise LrsdError(f"output '{output}' is not an output of the compressed model")
    teacher_session = make_session(teacher, config.threads)
    held_out = np.concatenate([teacher_session.run([output], _take(held, p))[0] for p in _chunks(n_held, config.batch)])

    probabilities = _is_probability(held_out)
    loss = config.loss
    if loss == "auto":
        loss = "kl" if probabilities or "logit" in output.lower() else "mse"
    scale = float(np.mean(held_out.astype(np.float64) ** 2)) or 1.0
    targets = _Targets(loss, probabilities)
    kind = input_kind(samples) if config.augment == "auto" else config.augment
    augment = make_augment(kind, samples, config.mask_input, config.unk_id)

    prepared = prepared_copy(student)
    trainable = trainable_tensors(prepared, config.trainable)
    if not trainable:
        raise LrsdError("nothing to train: the model has no compressed or narrowed layers (tensors named "
                        "'<node>/lrsd/...'); use trainable='all'")
    shards = shard_count(config, executor)
    shapes = {k: (parent_batch(config, shards),) + v.shape[1:] for k, v in samples.items()}
    lg, trainable, left = _build_gradient(student, prepared, trainable, shapes, loss, output, probabilities, scale,
                                          config.threads)
    student_session = make_session(student, config.threads)
    error_before = _relative_error(student_session, held, held_out, output, config.batch)
    del student_session
    if lg is None:
        seconds = time.perf_counter() - start
        report = RecoveryReport("end-to-end", loss, kind, output, 0, 0, len(train_idx), n_held, 0, 0, "no gradients",
                                seconds, math.nan, math.nan, error_before, error_before, (), tuple(left))
        return RecoveryResult(student, report)

    masks = support_masks(student, trainable)
    lg = sharded(lg, student, {k: v.shape[1:] for k, v in samples.items()}, loss, output, probabilities, scale,
                 executor, config.batch, shards)
    teach = lambda picks, feeds: targets(teacher_session.run([output], feeds)[0])  # noqa: E731
    fit = adam_loop(lg, samples, train_idx, held, targets(held_out), teach, augment, masks, config, rng, start,
                    on_step)
    step, stopped_by, curve, loss_before = fit.steps, fit.stopped_by, fit.curve, fit.curve[0][1]
    loss_after, best_step, best_params = fit.loss_after, fit.best_step, fit.params
    model = with_values(student, best_params) if best_step > 0 else student
    error_after = _relative_error(make_session(model, config.threads), held, held_out, output, config.batch) \
        if best_step > 0 else error_before
    seconds = time.perf_counter() - start
    report = RecoveryReport(
        level="end-to-end", loss=loss, augment=kind, output=output, trainable_tensors=len(trainable),
        trainable_params=int(sum(v.size for v in best_params.values())), train_samples=len(train_idx),
        heldout_samples=n_held, steps=step, best_step=best_step, stopped_by=stopped_by, seconds=seconds,
        loss_before=loss_before, loss_after=loss_after, error_before=error_before, error_after=error_after,
        curve=tuple(curve), left_as_fitted=tuple(left))
    log.info("recovery: %d steps in %.0f s, held-out loss %.4g -> %.4g (best step %d), output error %.4g -> %.4g",
             step, seconds, loss_before, loss_after, best_step, error_before, error_after)
    return RecoveryResult(model, report)

