"""Helpers shared by the benchmark scripts: the run record every results file carries
(`run_record`), the per-commit cache that lets a long benchmark resume (`RowCache`), results
files, Markdown tables, peak-RSS measurement and interleaved latency of compressed models
against the original.

Latency: every session stays alive in one process with a fixed number of
intra-op threads and spinning off (``onnx_lrsd.runtime.bench.make_session``), each is warmed up, runs
are interleaved (order reversed every round, ``onnx_lrsd.runtime.bench.time_sessions``) and medians are
compared as ratios, so that load from other processes on the machine mostly cancels.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from onnx_lrsd.runtime.latency import cpu_model

REPO_ROOT: Path = Path(__file__).resolve().parents[1]
RESULTS_DIR: Path = REPO_ROOT / "benchmarks" / "results"
ROW_CACHE_DIR: Path = REPO_ROOT / "benchmarks" / "cache" / "rows"
MB = 2**20
LOGGER = logging.getLogger("benchmarks")

# --------------------------------------------------------------------------- machine and files


def _git_commit() -> str | None:
    """HEAD of the repository, or the commit named in a ``.snapshot_commit`` file at the root
    (a `git archive` snapshot run so that parallel edits cannot change the library mid-run)."""
    marker = REPO_ROOT / ".snapshot_commit"
    if marker.is_file():
        return marker.read_text().strip() + " (snapshot)"
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    if commit:
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + (" (with uncommitted changes)" if dirty else "")
    return None


def _package_path() -> str | None:
    try:
        import onnx_lrsd
    except ImportError:
        return None
    return str(Path(onnx_lrsd.__file__).parent)


def blas_info() -> list[dict[str, Any]]:
    """BLAS libraries numpy/scipy use and their thread counts (threadpoolctl, if installed)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    keys = ("internal_api", "version", "num_threads", "threading_layer")
    return [{k: info.get(k) for k in keys} for info in threadpool_info()]


def machine_info() -> dict[str, Any]:
    """Cores, CPU, library versions, load and date: everything a reader needs to compare runs."""
    import onnx
    import onnxruntime
    import scipy

    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
        memory_gb = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        physical, memory_gb = None, None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cores_logical": os.cpu_count(),
        "cores_physical": physical,
        "cpu": cpu_model(),
        "memory_gb": memory_gb,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "blas": blas_info(),
        "env": {k: os.environ[k] for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
                if k in os.environ},
        "git_commit": _git_commit(),
        "onnx_lrsd_path": _package_path(),
    }


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


NOT_CODE = ("benchmarks/results", "README.md")
"""Paths a benchmark run writes or renders: changes there do not make the measured code dirty."""


def git_state() -> dict[str, Any]:
    """The code a run measures: ``commit`` (HEAD, or the commit of a ``.snapshot_commit``
    snapshot), ``dirty`` (tracked files outside `NOT_CODE` differ from it) and, when dirty,
    ``diff_sha1`` (a hash of that diff, so two dirty runs are known to measure the same code or
    not)."""
    marker = REPO_ROOT / ".snapshot_commit"
    if marker.is_file():
        return {"commit": marker.read_text().strip(), "dirty": False, "snapshot": True}
    commit = (_git("rev-parse", "HEAD") or "").strip() or None
    diff = _git("diff", "HEAD", "--", ".", *(f":(exclude){p}" for p in NOT_CODE)) if commit else None
    state: dict[str, Any] = {"commit": commit, "dirty": bool(diff)}
    if diff:
        state["diff_sha1"] = hashlib.sha1(diff.encode()).hexdigest()
    return state


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def run_record(module: str, argv: Sequence[str] | None) -> dict[str, Any]:
    """What every results file records under ``"run"``: the exact command, the code (`git_state`),
    the machine (`machine_info`: CPU, cores, onnxruntime / onnx / numpy versions, load), the
    start time and, stamped by `write_json` at every write, the time of the last write
    (``finished``: the end, for a complete run)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return {"command": " ".join(["python", "-m", module, *args]), **git_state(), "started": _now(),
            "finished": None, "shared_machine": True, "machine": machine_info()}


INTERLEAVED = ("latency as interleaved ratios to the original (2 threads, block medians; below 1 is faster). "
               "See the module docstring for what each row is.")
"""What the latency columns of the task benchmarks are."""


def results_header(data: Mapping[str, Any], title: str, module: str, note: str = INTERLEAVED) -> list[str]:
    """The first lines of a results page: `title`, then the command, the date, the commit (and
    an uncommitted diff), CPU, onnxruntime, total time and the load at start, from the file's
    `run_record` (a file from before run records: its machine record and argv), then `note`."""
    run, machine = data.get("run"), data["machine"]
    if run:
        command, commit = run["command"], run.get("commit")
        if run.get("dirty"):
            commit = f"{commit} with uncommitted changes (diff {run.get('diff_sha1', '')[:10]})"
    else:
        command, commit = f"python -m {module} {' '.join(data.get('argv', []))}".rstrip(), machine.get("git_commit")
    return [f"# {title}", "",
            f"`{command}` — {machine['date']}, onnx_lrsd commit {commit}, {machine['cpu']}, onnxruntime "
            f"{machine['onnxruntime']}; total {data.get('total_s', 0) / 60:.1f} min. Machine shared with other jobs "
            f"(load average at start {machine['load_average_at_start']}): {note}", ""]


class RowCache:
    """Finished rows of one benchmark at this code, so an interrupted run resumes where it
    stopped: ``benchmarks/cache/rows/<benchmark>/<commit>[-dirty-<diff hash>]/<key>.json``
    (git-ignored). A row is reused only by a run of the same commit and the same diff."""

    def __init__(self, benchmark: str, enabled: bool = True) -> None:
        state = git_state()
        label = (state["commit"] or "no-git")[:12]
        if state.get("dirty"):
            label += "-dirty-" + state["diff_sha1"][:10]
        self.directory = ROW_CACHE_DIR / benchmark / label
        self.enabled = enabled and state["commit"] is not None

    def _path(self, key: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in key)
        return self.directory / f"{safe}.json"

    def get(self, key: str) -> Any | None:
        """The row stored under ``key`` at this code, or None."""
        path = self._path(key)
        if not self.enabled or not path.is_file():
            return None
        LOGGER.info("reusing %s: measured at this commit (%s)", key, path)
        return json.loads(path.read_text())

    def put(self, key: str, row: Any) -> None:
        if self.enabled:
            write_json(self._path(key), row)


def progress(index: int, total: int, what: str, started: float) -> None:
    """One progress line: ``[index/total] what (elapsed)``."""
    LOGGER.info("[%d/%d] %s (%.1f min elapsed)", index, total, what, (time.perf_counter() - started) / 60)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` as indented JSON (numpy scalars converted, NaN/inf as null), atomically;
    a ``"run"`` record (`run_record`) gets this write's time as ``finished``."""
    if isinstance(data, dict) and isinstance(data.get("run"), dict):
        data["run"]["finished"] = _now()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2) + "\n")
    tmp.replace(path)


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text if text.endswith("\n") else text + "\n")
    tmp.replace(path)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub Markdown table; ``align`` is one character per column: ``l``, ``r`` or ``c``."""
    align = align or "l" * len(headers)
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(marks[a] for a in align) + " |"]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 3) -> str:
    """A number with ``digits`` decimals, or an empty string for None/NaN."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return ""
    return f"{value:.{digits}f}"


# --------------------------------------------------------------------------- memory


def rss_bytes() -> int:
    """Current resident set size of this process."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def max_rss_bytes() -> int:
    """Peak resident set size of this whole process so far (``getrusage``; Linux reports KiB)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


@dataclass
class PeakRSS:
    """Context manager sampling this process's RSS in a thread every ``interval`` seconds.

    ``before`` is the RSS on entry and ``peak`` the largest sample (entry and exit included), so
    ``peak - before`` is what the measured block added at its worst. Short spikes between samples
    can be missed; use ``max_rss_bytes`` in a fresh subprocess for a guaranteed upper bound.
    """

    interval: float = 0.02
    before: int = 0
    peak: int = 0
    after: int = 0
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def _sample(self) -> None:
        import psutil

        process = psutil.Process()
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, process.memory_info().rss)

    def __enter__(self) -> PeakRSS:
        self.before = self.peak = rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.after = rss_bytes()
        self.peak = max(self.peak, self.after)

    def to_dict(self) -> dict[str, float]:
        return {"rss_before_mb": self.before / MB, "rss_peak_mb": self.peak / MB,
                "rss_added_mb": (self.peak - self.before) / MB}


# --------------------------------------------------------------------------- latency


@dataclass(frozen=True)
class LatencyResult:
    """Interleaved latency of the original and each candidate at one batch size.

    Timing runs in ``blocks`` consecutive ``time_sessions`` calls of ``runs_per_block`` rounds;
    each block gives a ratio of medians (candidate / original), and ``ratios`` are the medians
    of those block ratios, so a burst of load from other processes spoils one block, not the
    result. ``*_ms`` are medians over all rounds.
    """

    batch: int
    threads: int
    blocks: int
    runs_per_block: int
    original_ms: float
    candidate_ms: tuple[float, ...]
    ratios: tuple[float, ...]
    block_ratios: tuple[tuple[float, ...], ...]  # per candidate

    def to_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "threads": self.threads, "blocks": self.blocks,
                "runs_per_block": self.runs_per_block, "original_ms": self.original_ms,
                "candidate_ms": list(self.candidate_ms), "ratios": list(self.ratios),
                "block_ratios": [list(r) for r in self.block_ratios]}


def time_against_original(original: Path, candidates: Sequence[Path], feeds: Mapping[str, np.ndarray],
                          threads: int = 2, budget_s: float = 20.0, blocks: int = 5, min_runs: int = 3,
                          max_runs: int = 40, warmup: int = 3) -> LatencyResult:
    """Latency of every candidate relative to ``original``, all sessions alive and interleaved
    (``onnx_lrsd.runtime.bench.time_sessions``), in ``blocks`` blocks (see `LatencyResult`).

    Rounds per block fit ``budget_s`` overall (estimated from one untimed round), clamped to
    [``min_runs``, ``max_runs``]; ``warmup`` untimed rounds precede the first block.
    """
    from onnx_lrsd.runtime.bench import make_session, time_sessions

    sessions = [make_session(Path(p), threads) for p in (original, *candidates)]
    feeds = dict(feeds)
    start = time.perf_counter()
    for session in sessions:  # first run: allocations, and the round-time estimate
        session.run(None, feeds)
    round_s = max(time.perf_counter() - start, 1e-6)
    runs = int(np.clip(budget_s / blocks / round_s, min_runs, max_runs))
    medians: list[list[float]] = [[] for _ in sessions]  # per session, per block
    for block in range(blocks):
        stats = time_sessions(sessions, feeds, runs=runs, warmup=warmup if block == 0 else 1)
        for i, s in enumerate(stats):
            medians[i].append(s.median_ms)
    base = np.asarray(medians[0])
    block_ratios = tuple(tuple(float(r) for r in np.asarray(m) / base) for m in medians[1:])
    batch = int(next(iter(feeds.values())).shape[0])
    return LatencyResult(batch=batch, threads=threads, blocks=blocks, runs_per_block=runs,
                         original_ms=float(np.median(base)),
                         candidate_ms=tuple(float(np.median(m)) for m in medians[1:]),
                         ratios=tuple(float(np.median(r)) for r in block_ratios), block_ratios=block_ratios)


def benchmark_main(argv, doc: str, tasks, name: str, run_one, render, extra_args=None,
                   quick_tasks=("digits_cnn",)) -> None:
    """The command line every task benchmark shares: ``--tasks``, ``--quick`` (digits only,
    short timings; ``quick_tasks``), ``--output PREFIX``, ``--render-only``, ``--fresh``; runs
    ``run_one(task, workdir, latency_budget_s, blocks, args, results_dir)`` per task, saving
    ``PREFIX.json`` (with its `run_record`) after each, then writes ``render(data)`` to
    ``PREFIX.md`` and prints it. A task already measured at this commit with the same options is
    taken from the `RowCache` (``--fresh`` measures it again). ``extra_args(parser)`` adds options."""
    import argparse
    import json
    import logging
    import sys
    import tempfile
    import time

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=list(tasks), help="default: all")
    parser.add_argument("--quick", action="store_true", help="digits only, short timings")
    parser.add_argument("--output", type=Path, default=None, help=f"results prefix (default results/{name})")
    parser.add_argument("--render-only", action="store_true", help="rewrite the Markdown from the JSON")
    parser.add_argument("--fresh", action="store_true", help="measure again what this commit already measured")
    if extra_args is not None:
        extra_args(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    output = args.output or RESULTS_DIR / (f"{name}.quick" if args.quick else name)
    json_path, md_path = Path(str(output) + ".json"), Path(str(output) + ".md")
    if args.render_only:
        text = render(json.loads(json_path.read_text()))
        write_text(md_path, text)
        print(text)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("onnx_lrsd").setLevel(logging.WARNING)
    logging.getLogger("onnx_lrsd.passes.search").setLevel(logging.INFO)
    names = args.tasks or (list(quick_tasks) if args.quick else list(tasks))
    run = run_record(f"benchmarks.{name}", argv)
    data = {"argv": argv, "run": run, "machine": run["machine"], "tasks": []}
    options = {k: v for k, v in sorted(vars(args).items()) if k not in ("tasks", "output", "render_only", "fresh")}
    cache = RowCache(Path(str(output)).name, enabled=not args.fresh)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"{name}_") as tmp:
        for index, task in enumerate(names, 1):
            progress(index, len(names), f"{name}: {task}", started)
            key = task + "-" + hashlib.sha1(json.dumps(options, default=str).encode()).hexdigest()[:8]
            out = cache.get(key)
            if out is None:
                out = run_one(task, Path(tmp), 4.0 if args.quick else 15.0, 3 if args.quick else 5, args,
                              json_path.parent)
                cache.put(key, out)
            data["tasks"].append(out)
            data["total_s"] = time.perf_counter() - started
            write_json(json_path, data)
    text = render(data)
    write_text(md_path, text)
    print(text)
