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

from .errors import LrsdError, runtime_message
from .io import serialize_for_runtime
from .mapped import runtime_options

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
    runtime_options(options)
    if isinstance(model, onnx.ModelProto):
        source: Union[str, bytes] = serialize_for_runtime(model)
    elif isinstance(model, (bytes, bytearray)):
        source = bytes(model)
    else:
        source = str(model)
    try:
        return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several unrelated exception types
        raise LrsdError(f"onnxruntime cannot load the model: {runtime_message(exc)}") from None


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


def output_errors_on(original: ModelLike, compressed: ModelLike, batches: Sequence[Mapping[str, np.ndarray]],
                     names: Sequence[str]) -> dict[str, float]:
    """`relative_output_errors` of `compressed` against `original` over all `batches` at once
    (each output's runs concatenated), one onnxruntime thread each."""
    return relative_output_errors(outputs_on(original, batches), outputs_on(compressed, batches), names)


def outputs_on(model: ModelLike, batches: Sequence[Mapping[str, np.ndarray]]) -> list[np.ndarray]:
    """Each output of `model` over all `batches`, flattened and concatenated (one session at
    a time, one thread: a large model and its compressed copy are never loaded together)."""
    session = make_session(model, threads=1)
    try:
        runs = [run_outputs(session, feeds) for feeds in batches]
    except Exception as exc:  # onnxruntime raises its own types for bad feeds and failing kernels
        raise LrsdError(f"onnxruntime failed to run the model: {runtime_message(exc)}") from None
    del session
    return [np.concatenate([np.ravel(run[i]) for run in runs]) for i in range(len(runs[0]))] if runs else []


@dataclass(frozen=True)
class ModelSummary:
    """One side of `bench`: size and cost of a model file and its latency."""

    path: str
    params: int
    macs: int
    file_bytes: int
    latency: LatencyStats


@dataclass(frozen=True)
class ModelComparison:
    baseline: ModelSummary
    candidate: ModelSummary
    speedup: float
    output_errors: dict
    threads: int
    batch: int

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)

    def to_text(self) -> str:
        b, c = self.baseline, self.candidate

        def row(label, x, y, fmt="{:,}"):
            ratio = y / x if x else float("nan")
            return f"{label:<14}{fmt.format(x):>16}{fmt.format(y):>16}{ratio:>9.3f}"

        lines = [f"{'':<14}{'baseline':>16}{'candidate':>16}{'ratio':>9}",
                 row("parameters", b.params, c.params), row("MACs", b.macs, c.macs),
                 row("file bytes", b.file_bytes, c.file_bytes),
                 row("median ms", b.latency.median_ms, c.latency.median_ms, "{:.3f}"),
                 row("p90 ms", b.latency.p90_ms, c.latency.p90_ms, "{:.3f}"),
                 f"speedup {self.speedup:.3f}x at batch {self.batch}, {self.threads} threads, "
                 f"{b.latency.runs} interleaved runs each"]
        lines += [f"output {name}: relative error {err:.3e}" for name, err in self.output_errors.items()]
        return "\n".join(lines)


def _file_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def compare_models(baseline: Path, candidate: Path, threads: int = 2, batch: int = 1, dims=None,
                   runs: int = 50, warmup: int = 5, seed: int = 0) -> ModelComparison:
    """Params, MACs, file size, output error and interleaved latency of two model files that
    take the same inputs (seeded random inputs of `batch`, symbolic dims from `dims`)."""
    from .cost import count_params, model_macs
    from .feeds import random_feeds
    from .io import load_model

    models = [load_model(path) for path in (baseline, candidate)]
    feeds = random_feeds(models[0], batch=batch, dims=dims, seed=seed)
    first = next(iter(feeds.values()), None)
    fed = int(first.shape[0]) if first is not None and first.ndim else 1
    if fed != batch:
        raise LrsdError(f"the model fixes its batch size to {fed}; --batch {batch} cannot be applied")
    sessions = [make_session(path, threads) for path in (baseline, candidate)]
    inputs = [sorted(i.name for i in s.get_inputs()) for s in sessions]
    if inputs[0] != inputs[1]:
        raise LrsdError(f"the models take different inputs: {inputs[0]} vs {inputs[1]}")
    reference, outputs = (run_outputs(s, feeds) for s in sessions)
    names = [o.name for o in sessions[0].get_outputs()]
    errors = relative_output_errors(reference, outputs, names)
    base_stats, cand_stats = time_sessions(sessions, feeds, runs=runs, warmup=warmup)
    summaries = [ModelSummary(str(path), count_params(model), model_macs(model), _file_bytes(Path(path)), stats)
                 for path, model, stats in zip((baseline, candidate), models, (base_stats, cand_stats))]
    return ModelComparison(summaries[0], summaries[1], base_stats.median_ms / cand_stats.median_ms, errors,
                           threads, batch)
