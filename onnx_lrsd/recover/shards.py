"""A batch's loss and gradient as a sum over shards of its samples, each shard an executor task.

The losses are means over samples of equal size (static shapes), so for a batch of n samples cut
into contiguous shards of n_s samples

    L = Σ_s (n_s / n) L_s,      ∂L/∂θ = Σ_s (n_s / n) ∂L_s/∂θ.

Each shard's (L_s, ∂L_s/∂θ) is computed by onnxruntime on the adjoint graph of its static shard
shape (`gradients.LossGradient`), built once per worker process and kept there while the same
model is trained (`_worker_gradient`); the parent sums the shards in shard order in float64 and
takes the Adam step. The sum depends on the shards, not on which executor ran them: the same
shards in this process, on a process pool or on Ray give the same bytes (every shard session
runs with the same number of onnxruntime threads, `SHARD_THREADS`).
"""
from __future__ import annotations

import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, Mapping, Tuple

import numpy as np
import onnx

from ..parallel.executor import Executor, Task, open_executor
from ..parallel.tasks import shard_ranges
from .gradients import LossGradient
from .types import RecoverConfig

SHARD_THREADS = 1
"""onnxruntime threads of a shard's session, wherever it runs (one core per task)."""


@dataclass(frozen=True)
class GradientSpec:
    """What a worker needs to build a shard's `LossGradient`: the model (serialized), the
    weights to differentiate, the per-sample input shapes (without the batch dim) and the loss.
    `key` names the model being trained (the workers' cache key)."""

    model: bytes
    trainable: Tuple[str, ...]
    sample_shapes: Tuple[Tuple[str, Tuple[int, ...]], ...]
    loss: str
    output: str
    probabilities: bool
    scale: float
    key: str

    def build(self, size: int, threads: int = SHARD_THREADS) -> LossGradient:
        shapes = {name: (size,) + shape for name, shape in self.sample_shapes}
        return LossGradient(onnx.load_from_string(self.model), list(self.trainable), shapes, loss=self.loss,
                            output=self.output, output_is_probability=self.probabilities, mse_scale=self.scale,
                            threads=threads)


_WORKER_GRADIENTS: Dict[Tuple[str, int], LossGradient] = {}
"""This process's shard adjoints, by (spec key, shard size); only the latest key's are kept."""


def _worker_gradient(spec: GradientSpec, size: int) -> LossGradient:
    found = _WORKER_GRADIENTS.get((spec.key, size))
    if found is None:
        for old in [k for k in _WORKER_GRADIENTS if k[0] != spec.key]:
            del _WORKER_GRADIENTS[old]
        found = _WORKER_GRADIENTS[(spec.key, size)] = spec.build(size)
    return found


def shard_gradient(spec: GradientSpec, feeds: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray],
                   params: Mapping[str, np.ndarray]) -> Tuple[float, Dict[str, np.ndarray]]:
    """(L_s, ∂L_s/∂θ) of one shard (the task a worker runs)."""
    size = len(next(iter(feeds.values())))
    return _worker_gradient(spec, size)(feeds, targets, params)


class ShardedGradient:
    """A `LossGradient` look-alike whose `__call__` sums shard gradients computed by `executor`
    tasks; `loss_only` and `initial` are the parent's (any batch size)."""

    def __init__(self, parent: LossGradient, spec: GradientSpec, executor: Executor, batch: int, shards: int):
        self.parent, self.executor = parent, executor
        self.initial, self.trainable = parent.initial, parent.trainable
        self.ranges = shard_ranges(batch, shards)
        self.batch = batch
        self._spec = executor.share(spec)
        self._memory = 4 * len(spec.model)

    def loss_only(self, feeds, targets, params) -> float:
        return self.parent.loss_only(feeds, targets, params)

    def __call__(self, feeds, targets, params) -> Tuple[float, Dict[str, np.ndarray]]:
        weights = {name: np.asarray(params[name], dtype=value.dtype) for name, value in self.initial.items()}
        n = len(next(iter(feeds.values())))
        if n != self.batch:
            raise ValueError(f"a sharded gradient takes batches of {self.batch} samples, got {n}")
        tasks = [Task((self._spec, _rows(feeds, part), _rows(targets, part), weights), memory=self._memory)
                 for part in self.ranges]
        loss, grads = 0.0, {}
        for part, (shard_loss, shard_grads) in zip(self.ranges, self.executor.imap(shard_gradient, tasks)):
            share = len(part) / n
            loss += share * shard_loss
            for name, g in shard_grads.items():
                term = share * g.astype(np.float64)
                grads[name] = term if name not in grads else grads[name] + term
        return loss, grads


def _rows(arrays: Mapping[str, np.ndarray], part: range) -> Dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v[part.start:part.stop]) for k, v in arrays.items()}


def shard_sizes(batch: int, shards: int) -> List[int]:
    return sorted({len(r) for r in shard_ranges(batch, shards)}, reverse=True)


def sharded(parent: LossGradient, model: onnx.ModelProto, sample_shapes: Mapping[str, Tuple[int, ...]],
            loss: str, output: str, probabilities: bool, scale: float, executor: Executor, batch: int,
            shards: int):
    """`parent` itself for one shard (the whole batch in this process), else a `ShardedGradient`
    over `shards` shards of `batch` samples of `model` (the parent's adjoint only serves to find
    which weights have gradient rules and never gets a session; its loss session evaluates
    held-out losses)."""
    if shards <= 1:
        return parent
    spec = GradientSpec(model.SerializeToString(), tuple(parent.trainable),
                        tuple((k, tuple(v)) for k, v in sample_shapes.items()), loss, output, probabilities,
                        float(scale), uuid.uuid4().hex)
    return ShardedGradient(parent, spec, executor, batch, shards)


def shard_count(config: RecoverConfig, executor: Executor) -> int:
    """Shards of a batch: `config.shards`, else one per executor slot; at most one per sample."""
    return max(1, min(config.shards or executor.slots, config.batch))


def parent_batch(config: RecoverConfig, shards: int) -> int:
    """Samples of the parent's adjoint: the batch, or with shards the largest shard (the parent
    builds it only to find the weights without gradient rules)."""
    return config.batch if shards <= 1 else shard_sizes(config.batch, shards)[0]


@contextmanager
def open_for(config: RecoverConfig) -> Iterator[Executor]:
    """The executor `config` asks for, closed on leaving; this process's shard adjoints (those
    the in-process executor built) are dropped then too."""
    try:
        with open_executor(config.executor, config.workers, config.ray_address) as executor:
            yield executor
    finally:
        _WORKER_GRADIENTS.clear()
