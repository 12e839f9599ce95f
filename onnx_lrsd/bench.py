"""onnxruntime latency comparison with benchmark hygiene (DESIGN §2).

All sessions stay alive in one process with fixed `intra_op_num_threads` and spinning off
(idle sessions' spinning threads otherwise steal cores), each is warmed up, and runs are
interleaved with the order reversed every round so that drift cancels; medians are reported.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np
import onnx
import onnxruntime as ort

from .errors import LrsdError

log = logging.getLogger(__name__)

ModelLike = Union[str, Path, bytes, onnx.ModelProto]

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one session over `runs` timed runs, in milliseconds."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    runs: int

    @classmethod
    def from_samples(cls, seconds: Sequence[float]) -> LatencyStats:
        """Summarise per-run wall times given in seconds."""
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        return cls(
            median_ms=float(np.median(ms)),
            p90_ms=float(np.percentile(ms, 90)),
            mean_ms=float(ms.mean()),
            runs=int(ms.size),
        )


@dataclass(frozen=True)
class Comparison:
    """Baseline vs candidate latency; `speedup` > 1 means the candidate is faster."""

    baseline: LatencyStats
    candidate: LatencyStats
    speedup: float
    threads: int
    batch: int


def make_session(model: ModelLike, threads: int, optimization: str = "all") -> ort.InferenceSession:
    """A CPU session with `threads` intra-op threads, one inter-op thread and no spinning.

    Paths are passed to onnxruntime as paths (external data, models above 2 GB).
    `optimization` is one of "disable", "basic", "extended", "all".
    """
    if threads < 1:
        raise LrsdError(f"threads must be >= 1, got {threads}")
    if optimization not in _OPT_LEVELS:
        raise LrsdError(f"unknown optimization level '{optimization}' (choose from {', '.join(_OPT_LEVELS)})")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = _OPT_LEVELS[optimization]
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if isinstance(model, onnx.ModelProto):
        source: Union[str, bytes] = model.SerializeToString()
    elif isinstance(model, (bytes, bytearray)):
        source = bytes(model)
    else:
        source = str(model)
    try:
        return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several unrelated exception types
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LrsdError(f"onnxruntime cannot load the model: {first_line}") from None


def run_outputs(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """All outputs of one run, in the session's output order."""
    return list(session.run(None, dict(feeds)))


def time_sessions(
    sessions: Sequence[ort.InferenceSession],
    feeds: Mapping[str, np.ndarray],
    runs: int = 50,
    warmup: int = 5,
) -> list[LatencyStats]:
    """Time several sessions on the same inputs, interleaved, one `LatencyStats` each.

    Every round runs each session once; odd rounds run them in reverse order.
    """
    if runs < 1:
        raise LrsdError(f"runs must be >= 1, got {runs}")
    if warmup < 0:
        raise LrsdError(f"warmup must be >= 0, got {warmup}")
    if not sessions:
        raise LrsdError("no sessions to time")
    feed_dict = dict(feeds)
    for _ in range(warmup):
        for session in sessions:
            session.run(None, feed_dict)
    samples: list[list[float]] = [[] for _ in sessions]
    order = list(range(len(sessions)))
    for round_index in range(runs):
        for i in order if round_index % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            sessions[i].run(None, feed_dict)
            samples[i].append(time.perf_counter() - start)
    stats = [LatencyStats.from_samples(s) for s in samples]
    log.debug("timed %d sessions x %d runs: medians %s ms", len(sessions), runs, [round(s.median_ms, 3) for s in stats])
    return stats


def compare_latency(
    baseline: ModelLike | ort.InferenceSession,
    candidate: ModelLike | ort.InferenceSession,
    feeds: Mapping[str, np.ndarray],
    threads: int = 2,
    runs: int = 50,
    warmup: int = 5,
) -> Comparison:
    """Interleaved latency of `candidate` against `baseline` on the same inputs.

    Models are opened with `make_session(model, threads)`; sessions are used as given (and
    `threads` is then read from the baseline session). `batch` is the leading dim of the first
    input (1 for scalars).
    """
    sessions = [
        m if isinstance(m, ort.InferenceSession) else make_session(m, threads)
        for m in (baseline, candidate)
    ]
    base_stats, cand_stats = time_sessions(sessions, feeds, runs=runs, warmup=warmup)
    if isinstance(baseline, ort.InferenceSession):
        threads = baseline.get_session_options().intra_op_num_threads
    first = next(iter(feeds.values()), None)
    batch = int(first.shape[0]) if first is not None and np.ndim(first) > 0 else 1
    return Comparison(
        baseline=base_stats,
        candidate=cand_stats,
        speedup=base_stats.median_ms / cand_stats.median_ms,
        threads=threads,
        batch=batch,
    )


def relative_output_errors(
    reference_outputs: Sequence[np.ndarray],
    outputs: Sequence[np.ndarray],
    names: Sequence[str],
) -> dict[str, float]:
    """‖y − y'‖_F / ‖y‖_F per output (the absolute error where ‖y‖_F = 0), in float64."""
    if not len(reference_outputs) == len(outputs) == len(names):
        raise LrsdError(
            f"output count mismatch: {len(reference_outputs)} reference, {len(outputs)} candidate, {len(names)} names"
        )
    errors: dict[str, float] = {}
    for name, ref, out in zip(names, reference_outputs, outputs):
        ref64 = np.asarray(ref, dtype=np.float64)
        out64 = np.asarray(out, dtype=np.float64)
        if ref64.shape != out64.shape:
            raise LrsdError(f"output '{name}' shape changed: {ref64.shape} -> {out64.shape}")
        diff = float(np.linalg.norm((ref64 - out64).ravel()))
        norm = float(np.linalg.norm(ref64.ravel()))
        errors[name] = diff / norm if norm > 0 else diff
    return errors
