"""onnxruntime latency comparison with benchmark hygiene.

All sessions stay alive in one process with fixed `intra_op_num_threads` and spinning off
(idle sessions' spinning threads otherwise steal cores), each is warmed up, and runs are
interleaved with the order reversed every round so that drift cancels; medians are reported.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import onnxruntime as ort

from ..errors import LrsdError, runtime_message
from .profile import LayerDelta, LayerProfile, compare_profiles, comparison_text
from .session import ModelLike, make_session, run_outputs

log = logging.getLogger(__name__)

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


def model_latency_ms(model: ModelLike, feeds: Mapping[str, np.ndarray], threads: int, runs: int = 30,
                     warmup: int = 3) -> float:
    """Median milliseconds of one run of `model` on `feeds`."""
    return time_sessions([make_session(model, threads=threads)], feeds, runs=runs, warmup=warmup)[0].median_ms


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
class ColdStart:
    """A model's first moments in a fresh process (median over `repeats` processes).

    `session_ms`: creating the session (loading, optimizing, pre-packing weights);
    `first_run_ms`: the first run after it. Memory is the process's resident set (Linux
    /proc: VmRSS, and VmHWM reset just before the session is created): `peak_rss_bytes` is the
    peak during session creation and `runs` runs minus the resident set before it (weights as
    onnxruntime holds them, arena, code); `rss_bytes` what stays resident after the runs.
    None where the platform does not report it."""

    session_ms: float
    first_run_ms: float
    peak_rss_bytes: Optional[int]
    rss_bytes: Optional[int]
    runs: int
    repeats: int


@dataclass(frozen=True)
class ModelSummary:
    """One side of `bench`: size and cost of a model file, its warm latency, and optionally its
    cold start and per-layer profile."""

    path: str
    params: int
    macs: int
    file_bytes: int
    latency: LatencyStats
    cold: Optional[ColdStart] = None
    profile: Optional[LayerProfile] = None


@dataclass(frozen=True)
class ModelComparison:
    """`bench` of one model, or of a baseline and a candidate (then `speedup` and the
    candidate's relative `output_errors`)."""

    baseline: ModelSummary
    candidate: Optional[ModelSummary]
    speedup: Optional[float]
    output_errors: dict
    threads: int
    batch: int
    errors_on: str = ""

    @property
    def layers(self) -> List[LayerDelta]:
        """Both profiles joined by layer name (empty without two profiles)."""
        if self.candidate is None or self.baseline.profile is None or self.candidate.profile is None:
            return []
        return compare_profiles(self.baseline.profile, self.candidate.profile)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["layer_comparison"] = [dict(asdict(row), ratio=row.ratio) for row in self.layers]
        return data

    def to_text(self, top: int = 15) -> str:
        sides = [self.baseline] + ([self.candidate] if self.candidate is not None else [])
        two = len(sides) == 2

        def row(label, values, fmt="{:,}"):
            cells = "".join(f"{'-' if v is None else fmt.format(v):>16}" for v in values)
            if two and None not in values and values[0]:
                cells += f"{values[1] / values[0]:>9.3f}"
            return f"{label:<20}{cells}"

        def cold(attribute):
            return [None if s.cold is None else getattr(s.cold, attribute) for s in sides]

        lines = [f"{'':<20}" + "".join(f"{label:>16}" for label in ("baseline", "candidate")[:len(sides)])
                 + (f"{'ratio':>9}" if two else ""),
                 row("parameters", [s.params for s in sides]), row("MACs", [s.macs for s in sides]),
                 row("file bytes", [s.file_bytes for s in sides]),
                 row("warm median ms", [s.latency.median_ms for s in sides], "{:.3f}"),
                 row("warm p90 ms", [s.latency.p90_ms for s in sides], "{:.3f}")]
        if any(s.cold is not None for s in sides):
            lines += [row("session create ms", cold("session_ms"), "{:.1f}"),
                      row("cold first run ms", cold("first_run_ms"), "{:.3f}"),
                      row("peak RSS MB", [None if v is None else v / 2**20 for v in cold("peak_rss_bytes")], "{:.1f}")]
        if any(s.profile is not None for s in sides):
            lines.append(row("arena peak MB", [None if s.profile is None else s.profile.arena_peak_bytes / 2**20
                                               for s in sides], "{:.1f}"))
        if two:
            lines.append(f"speedup {self.speedup:.3f}x at batch {self.batch}, {self.threads} threads, "
                         f"{self.baseline.latency.runs} interleaved runs each")
        else:
            lines.append(f"batch {self.batch}, {self.threads} threads, {self.baseline.latency.runs} runs")
        where = f" ({self.errors_on})" if self.errors_on else ""
        lines += [f"output {name}: relative error {err:.3e}{where}" for name, err in self.output_errors.items()]
        first = next((s.cold for s in sides if s.cold is not None), None)
        if first is not None:
            lines.append(f"cold: fresh process per model, median of {first.repeats}; peak RSS: resident-set peak "
                         f"during session creation and {first.runs} runs, over the resident set before")
        profiles = [s.profile for s in sides if s.profile is not None]
        if len(profiles) == 2:
            lines += ["", comparison_text(profiles[0], profiles[1], top)]
        elif profiles:
            lines += ["", profiles[0].to_text(top)]
        return "\n".join(lines)


def _file_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def _resident_bytes() -> Tuple[Optional[int], Optional[int]]:
    """(VmRSS, VmHWM) of this process in bytes from /proc (None, None elsewhere)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None, None
    values = {}
    for line in status.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values.get("VmRSS"), values.get("VmHWM")


def _reset_peak_resident() -> bool:
    """Reset VmHWM to the current resident set (Linux ≥ 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _cold_start_once(model: str, feeds: Mapping[str, np.ndarray], threads: int, runs: int) -> Tuple:
    """In a fresh process: (session ms, first run ms, peak RSS growth, RSS growth)."""
    feed_dict = dict(feeds)
    before, _ = _resident_bytes()
    peak_known = _reset_peak_resident()
    start = time.perf_counter()
    session = make_session(model, threads)
    created = time.perf_counter()
    session.run(None, feed_dict)
    first = time.perf_counter()
    for _ in range(runs - 1):
        session.run(None, feed_dict)
    after, peak = _resident_bytes()
    known = before is not None and after is not None
    return ((created - start) * 1e3, (first - created) * 1e3,
            peak - before if known and peak_known and peak is not None else None,
            after - before if known else None)


def cold_start(model: Union[str, Path], feeds: Mapping[str, np.ndarray], threads: int = 2, runs: int = 3,
               repeats: int = 1) -> ColdStart:
    """Session creation, first run and resident memory of `model` (a path), each of `repeats`
    measured in a fresh Python process (spawned, so nothing is shared or already paged in)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    if repeats < 1 or runs < 1:
        raise LrsdError(f"cold start needs repeats >= 1 and runs >= 1, got {repeats} and {runs}")
    samples = []
    for _ in range(repeats):
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            try:
                samples.append(pool.submit(_cold_start_once, str(model), dict(feeds), threads, runs).result())
            except BrokenProcessPool:
                raise LrsdError(f"the cold-start process for {model} died (out of memory?)") from None
    columns = list(zip(*samples))

    def median(values, integer=False):
        if any(v is None for v in values):
            return None
        value = float(np.median(values))
        return int(value) if integer else value

    return ColdStart(session_ms=median(columns[0]), first_run_ms=median(columns[1]),
                     peak_rss_bytes=median(columns[2], True), rss_bytes=median(columns[3], True), runs=runs,
                     repeats=repeats)


def compare_models(baseline: Path, candidate: Optional[Path] = None, threads: int = 2, batch: int = 1, dims=None,
                   runs: int = 50, warmup: int = 5, seed: int = 0, profile_runs: int = 0,
                   cold_repeats: int = 0, progress=None) -> ModelComparison:
    """Params, MACs, file size and warm latency of one model file, or of two that take the same
    inputs (then interleaved, with the candidate's output error): seeded random inputs of
    `batch`, symbolic dims from `dims` (MACs at batch 1 with those dims). With `profile_runs`,
    each model's per-layer profile over that many runs; with `cold_repeats`, its cold start in
    that many fresh processes. `progress(stage, done, total)` is called after each phase."""
    from ..plan.cost import count_params, model_macs
    from .feeds import random_feeds
    from ..model.io import load_model
    from .profile import profile_models

    phases = ["load", "latency"] + (["profile"] if profile_runs else []) + (["cold start"] if cold_repeats else [])

    def done(phase: str) -> None:
        if progress is not None:
            progress("bench", phases.index(phase) + 1, len(phases))

    paths = [Path(baseline)] + ([Path(candidate)] if candidate is not None else [])
    models = [load_model(path) for path in paths]
    feeds = random_feeds(models[0], batch=batch, dims=dims, seed=seed)
    first = next(iter(feeds.values()), None)
    fed = int(first.shape[0]) if first is not None and first.ndim else 1
    if fed != batch:
        raise LrsdError(f"the model fixes its batch size to {fed}; --batch {batch} cannot be applied")
    sessions = [make_session(path, threads) for path in paths]
    inputs = [sorted(i.name for i in s.get_inputs()) for s in sessions]
    if inputs[0] != inputs[-1]:
        raise LrsdError(f"the models take different inputs: {inputs[0]} vs {inputs[1]}")
    errors = {}
    if len(sessions) == 2:
        reference, outputs = (run_outputs(s, feeds) for s in sessions)
        errors = relative_output_errors(reference, outputs, [o.name for o in sessions[0].get_outputs()])
    done("load")
    stats = time_sessions(sessions, feeds, runs=runs, warmup=warmup)
    done("latency")
    del sessions  # idle sessions must not hold memory or threads while the others are measured
    profiles = (profile_models(models, feeds, threads, runs=profile_runs, labels=[path.name for path in paths])
                if profile_runs else [None] * len(paths))
    if profile_runs:
        done("profile")
    colds = [cold_start(path, feeds, threads, repeats=cold_repeats) if cold_repeats else None for path in paths]
    if cold_repeats:
        done("cold start")
    summaries = [ModelSummary(str(path), count_params(model), model_macs(model, dict(dims or {})), _file_bytes(path),
                              stat, cold, profile)
                 for path, model, stat, cold, profile in zip(paths, models, stats, colds, profiles)]
    errors_on = (f"seeded random inputs (seed {seed}, batch {batch}), not data: compress reports its error on "
                 "held-out calibration data when given") if errors else ""
    return ModelComparison(summaries[0], summaries[1] if len(summaries) == 2 else None,
                           stats[0].median_ms / stats[1].median_ms if len(stats) == 2 else None, errors,
                           threads, batch, errors_on)
