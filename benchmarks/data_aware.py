"""Data-free vs data-aware compression of three real models on their real tasks.

Run from the repository root::

    python -m benchmarks.data_aware                      # everything (about 40 min on 2 busy cores)
    python -m benchmarks.data_aware --quick              # digits only, keeps 0.5 and 0.1 (~15 s)
    python -m benchmarks.data_aware --tasks minilm --keeps 0.5 --methods independent

For every task (``benchmarks/tasks``: ``digits_cnn``, ``ppocr_rec``, ``minilm``), keep ratio and
method — data-free truncated SVD (no calibration), data-aware ``independent`` and data-aware
``sequential`` — the model is compressed with ``onnx_lrsd.compress`` and scored with the task's
own ``evaluate``. Columns: the task metrics, the parameter ratio from the compression report,
the latency ratio (compressed median / original median, below 1 is faster) at batch 1 and 32
with 2 intra-op threads, and the wall time of the ``compress`` call (calibration through
onnxruntime, fitting, rewriting and the held-out verification; building the calibration feeds
is timed separately).

Calibration is disjoint from evaluation by construction of the tasks (benchmarks/tasks/README.md):
digits calibrate on the first training images of the seeded stratified MNIST-5k split and are
scored on its 1000 test images; PP-OCR calibrates on lines with words from Python
standard-library docstrings (seed 3003) and is scored on lines with words from scikit-learn's
dataset descriptions (seeds 1001/2002); MiniLM calibrates on scipy docstrings (any text also in
the evaluation set removed) and is scored on numpy's docstrings. ``compress`` further holds out
every 5th calibration batch (``holdout_every=5``) for its verification, so the fit sees 4/5 of
the calibration samples.

Latency: for each task and keep, the original and the compressed models of every
method are opened together (``onnx_lrsd.runtime.bench.make_session``: 2 threads, spinning off), warmed
up and timed interleaved with ``time_sessions`` in 5 blocks; the table shows the median over
blocks of each block's ratio of medians, so a burst of load from other processes spoils one
block, not the result (``benchmarks.common.time_against_original``).

A MiniLM study runs keep 0.5 / independent at 64, 128 and 256 calibration sentences, each in its
own subprocess so that peak RSS (``getrusage`` and a 20 ms sampling thread) is not mixed between
configurations, and times calibration + fit, with the library's BLAS default (one thread,
``CompressConfig.blas_threads``) and with OpenBLAS unlimited (two threads here).

When a floor of the issue is missed, that configuration is rerun with configuration-only
ablations (layers left dense with ``LayerOverride(skip=True)``; for PP-OCR also the channel kind
forced and conv rank rounding off) to show where the damage comes from. ``--resume`` reuses
what an interrupted run wrote (same library commit only); ``--render-only`` rewrites the
Markdown from the JSON.

Results: ``benchmarks/results/data_aware.json`` (every number, per-layer ranks and data errors,
machine info) and ``benchmarks/results/data_aware.md`` (the table); the table is also printed.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import (
    MB,
    RESULTS_DIR,
    PeakRSS,
    fmt,
    machine_info,
    markdown_table,
    max_rss_bytes,
    time_against_original,
    write_json,
    write_text,
)

LOGGER = logging.getLogger("benchmarks.data_aware")

THREADS = 2
LATENCY_BATCHES = (1, 32)
DEFAULT_KEEPS = (0.75, 0.5, 0.35, 0.25)
HOLDOUT_EVERY = 5  # CompressConfig's default, written out so the JSON says what was used
LIBRARY_DEFAULT = "library default"  # blas: leave CompressConfig.blas_threads as it is


@dataclass(frozen=True)
class TaskSettings:
    samples: int
    batch: int
    metrics: tuple[str, ...]
    extra_keeps: tuple[float, ...] = ()


TASKS: dict[str, TaskSettings] = {
    "digits_cnn": TaskSettings(samples=128, batch=16, metrics=("accuracy",), extra_keeps=(0.1,)),
    "ppocr_rec": TaskSettings(samples=128, batch=16, metrics=("char_acc", "char_acc_hard")),
    "minilm": TaskSettings(samples=256, batch=32, metrics=("recall@1", "mrr", "cosine")),
}

#: method label -> data-aware mode (None: data-free, no calibration).
METHODS: dict[str, str | None] = {"data-free": None, "independent": "independent", "sequential": "sequential"}
METHOD_LABELS = {"data-free": "data-free SVD", "independent": "data-aware independent",
                 "sequential": "data-aware sequential"}
METRIC_COLUMNS = ("accuracy", "char_acc", "char_acc_hard", "recall@1", "mrr", "cosine")


@dataclass(frozen=True)
class Floor:
    """A minimum from the issue: ``metric >= value`` for (task, keep, method)."""

    task: str
    keep: float
    method: str
    metric: str
    value: float
    note: str = ""


FLOORS = (
    Floor("ppocr_rec", 0.5, "independent", "char_acc", 0.94, "data-free 0.00 in the issue"),
    Floor("ppocr_rec", 0.5, "independent", "char_acc_hard", 0.77, "data-free 0.00 in the issue"),
    Floor("minilm", 0.5, "independent", "cosine", 0.77, "data-free 0.30 in the issue"),
    Floor("minilm", 0.5, "independent", "recall@1", 0.31,
          "data-free 0.17, original 0.44 on the prototype's set; ours: original 0.417"),
    Floor("digits_cnn", 0.1, "independent", "accuracy", 0.945),
)

MEMORY_STUDY = (  # (calibration sentences, CompressConfig.blas_threads: library default or None = unlimited)
    (64, LIBRARY_DEFAULT), (128, LIBRARY_DEFAULT), (256, LIBRARY_DEFAULT), (256, None),
)
MEMORY_STUDY_KEEP = 0.5


# --------------------------------------------------------------------------- one configuration


def symbolic_dims(model_path: Path, feeds: dict[str, Any]) -> tuple[tuple[str, int], ...]:
    """Sizes of the model's named non-batch input dims in a real feed of the task.

    Without calibration, `compress` verifies on random inputs and needs every symbolic dim
    but the batch (PP-OCR's input is [p2o.DynamicDimension.0, 3, '?', p2o.DynamicDimension.1]);
    the CLI equivalent is ``--dim NAME=SIZE``.
    """
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    dims: dict[str, int] = {}
    for inp in model.graph.input:
        if inp.name not in feeds:
            continue
        for index, dim in enumerate(inp.type.tensor_type.shape.dim):
            if index > 0 and dim.HasField("dim_param") and dim.dim_param:
                dims[dim.dim_param] = int(feeds[inp.name].shape[index])
    return tuple(sorted(dims.items()))


def task_inputs(name: str, latency_batches=(1, 32)):
    """A prepared task with what every benchmark takes from it: (task, settings, calibration
    feeds, latency feeds per batch, symbolic dims of its inputs)."""
    from benchmarks.tasks import get_task

    settings = TASKS[name]
    task = get_task(name)
    task.prepare()
    feeds = task.calibration_feeds(settings.samples, settings.batch)
    latency_feeds = {b: task.latency_feeds(b) for b in latency_batches}
    return task, settings, feeds, latency_feeds, symbolic_dims(task.model_path, latency_feeds[latency_batches[0]])


def compress_one(model_path: Path, keep: float, mode: str | None, feeds: list, settings: TaskSettings,
                 mask_input: str | None, blas: Any = None, **extra):
    """``onnx_lrsd.compress`` with this benchmark's settings (plus ``extra`` CompressConfig
    fields, e.g. ``dims``); returns (result, seconds, PeakRSS)."""
    from onnx_lrsd import compress

    options: dict[str, Any] = {"keep": keep, "holdout_every": HOLDOUT_EVERY, **extra}
    if blas != LIBRARY_DEFAULT:
        options["blas_threads"] = blas  # None: OpenBLAS's own default (2 threads here)
    if mode is not None:
        options.update(mode=mode, mask_input=mask_input, calib_samples=settings.samples, calib_batch=settings.batch)
    gc.collect()
    with PeakRSS() as memory:
        start = time.perf_counter()
        result = compress(model_path, calibration=feeds if mode is not None else None, **options)
        seconds = time.perf_counter() - start
    return result, seconds, memory


def layer_rows(report) -> list[dict[str, Any]]:
    return [{"name": l.name, "op": l.op, "method": l.method, "ranks": list(l.ranks), "params_before": l.params_before,
             "params_after": l.params_after, "macs_before": l.macs_before, "macs_after": l.macs_after,
             "data_error": l.data_error, "reason": l.reason} for l in report.layers]


def _done_keep(previous: dict[str, Any] | None, keep: float, methods: tuple[str, ...]) -> bool:
    """Whether a previous (interrupted) run has every method and both latencies of ``keep``."""
    if not previous:
        return False
    have = {c["method"] for c in previous.get("configs", []) if c["keep"] == keep}
    timed = {e["batch"] for e in previous.get("latency", []) if e["keep"] == keep and "ratios" in e}
    return set(methods) <= have and set(LATENCY_BATCHES) <= timed


def run_task(name: str, keeps: tuple[float, ...], methods: tuple[str, ...], workdir: Path, blas: Any,
             latency_budget: float, blocks: int, previous: dict[str, Any] | None = None,
             save=None) -> dict[str, Any]:
    """Every (keep, method) of one task: compress, evaluate, then time each keep's models together.

    Keeps that ``previous`` (the same task in an interrupted run's JSON) completed are taken
    from it; ``save(out)`` is called after every keep so that a killed run loses one keep at most.
    """
    from onnx_lrsd.model.io import save_model

    from benchmarks.tasks import get_task

    settings = TASKS[name]
    task = get_task(name)
    out: dict[str, Any] = {"task": name, "samples": settings.samples, "batch": settings.batch,
                           "mask_input": task.mask_input, "configs": []}
    start = time.perf_counter()
    task.prepare()
    out["prepare_s"] = time.perf_counter() - start
    start = time.perf_counter()
    out["original"] = task.evaluate(task.model_path)
    out["evaluate_s"] = time.perf_counter() - start
    LOGGER.info("%s: original %s (evaluate %.1f s)", name, out["original"], out["evaluate_s"])
    feeds: list = []
    if any(METHODS[m] for m in methods):
        start = time.perf_counter()
        feeds = task.calibration_feeds(settings.samples, settings.batch)
        out["calibration_feeds_s"] = time.perf_counter() - start
        LOGGER.info("%s: %d calibration samples in %d batches built in %.1f s", name, settings.samples, len(feeds),
                    out["calibration_feeds_s"])
    latency_feeds = {b: task.latency_feeds(b) for b in LATENCY_BATCHES}
    dims = symbolic_dims(task.model_path, latency_feeds[1])
    out["dims"] = dict(dims)
    out["latency"] = []
    for keep in keeps:
        if _done_keep(previous, keep, methods):
            LOGGER.info("%s keep=%g: taken from the previous run (--resume)", name, keep)
            out["configs"] += [c for c in previous["configs"] if c["keep"] == keep and c["method"] in methods]
            out["latency"] += [e for e in previous["latency"] if e["keep"] == keep]
            out.setdefault("resumed_keeps", []).append(keep)
            continue
        paths: dict[str, Path] = {}
        for method in methods:
            config: dict[str, Any] = {"keep": keep, "method": method}
            LOGGER.info("%s keep=%g %s: compressing", name, keep, method)
            try:
                result, seconds, memory = compress_one(task.model_path, keep, METHODS[method], feeds, settings,
                                                       task.mask_input, blas, dims=dims)
                report = result.report
                path = workdir / f"{name}_{keep:g}_{method}.onnx"
                save_model(result.model, path)
                del result
                config.update(compress_s=seconds, params_before=report.before.params, params_after=report.after.params,
                              params_ratio=report.params_ratio, macs_ratio=report.macs_ratio,
                              timings=report.timings, output_errors=report.output_errors,
                              layers=layer_rows(report), memory=memory.to_dict())
                start = time.perf_counter()
                config["metrics"] = task.evaluate(path)
                config["evaluate_s"] = time.perf_counter() - start
                paths[method] = path
                LOGGER.info("%s keep=%g %s: %s params %.3f compress %.1f s", name, keep, method,
                            {k: round(v, 4) for k, v in config["metrics"].items()}, report.params_ratio, seconds)
            except Exception as exc:  # a failing configuration is a result too
                config["error"] = f"{type(exc).__name__}: {exc}"
                config["traceback"] = traceback.format_exc()
                LOGGER.error("%s keep=%g %s failed: %s", name, keep, method, config["error"])
            out["configs"].append(config)
        if paths:
            for batch in LATENCY_BATCHES:
                LOGGER.info("%s keep=%g: timing batch %d", name, keep, batch)
                try:
                    timing = time_against_original(task.model_path, list(paths.values()), latency_feeds[batch],
                                                   threads=THREADS, budget_s=latency_budget, blocks=blocks)
                except Exception as exc:
                    LOGGER.error("%s keep=%g b%d: timing failed: %s", name, keep, batch, exc)
                    out["latency"].append({"keep": keep, "batch": batch, "error": f"{type(exc).__name__}: {exc}"})
                    continue
                entry = {"keep": keep, "methods": list(paths), **timing.to_dict()}
                out["latency"].append(entry)
                for method, ratio in zip(paths, timing.ratios):
                    cfg = next(c for c in out["configs"] if c["keep"] == keep and c["method"] == method)
                    cfg[f"latency_ratio_b{batch}"] = ratio
                LOGGER.info("%s keep=%g b%d: original %.2f ms, ratios %s (%d blocks x %d runs)", name, keep, batch,
                            timing.original_ms, [round(r, 3) for r in timing.ratios], timing.blocks,
                            timing.runs_per_block)
            for path in paths.values():
                path.unlink(missing_ok=True)
        if save is not None:
            save(out)
    return out


# --------------------------------------------------------------------------- ablations


def _worst_layers(config: dict[str, Any], count: int) -> list[str]:
    layers = [l for l in config.get("layers", []) if l["data_error"] is not None]
    return [l["name"] for l in sorted(layers, key=lambda l: -l["data_error"])[:count]]


def _same_floor_configs(task_data: dict[str, Any]) -> bool:
    """A previous run's ablations stay valid when its floor configurations were reused as well."""
    keeps = {f.keep for f in FLOORS if f.task == task_data["task"]}
    return all(k in (task_data.get("resumed_keeps") or []) for k in keeps)


def ablation_specs(task: str, base: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Configuration-only variations of a missed floor configuration (no library change):
    which layers or settings the damage comes from."""
    from onnx_lrsd.config import LayerOverride

    def dense(names: list[str]) -> dict[str, Any]:
        return {"overrides": tuple(LayerOverride(pattern=n, skip=True) for n in names)}

    specs: list[tuple[str, dict[str, Any]]] = []
    if task == "ppocr_rec":
        specs.append(("every Conv factorized by the channel kind (no Tucker-2/spatial from method=auto)",
                      {"overrides": (LayerOverride(pattern="p2o.Conv.*", method="channel"),)}))
        specs.append(("conv ranks not rounded to multiples of 16 (conv_rank_multiple=1)",
                      {"conv_rank_multiple": 1}))
    if task == "minilm":
        specs.append(("the 6 attention output projections left dense",
                      dense([l["name"] for l in base["layers"] if "attention.output.dense" in l["name"]])))
    for count in (3, 6):
        worst = _worst_layers(base, count)
        specs.append((f"the {count} layers with the largest held-out data error left dense", dense(worst)))
    if task == "ppocr_rec":
        worst = _worst_layers(base, 6)
        specs.append(("channel kind for every Conv, and the same 6 layers dense",
                      {"overrides": dense(worst)["overrides"]
                       + (LayerOverride(pattern="p2o.Conv.*", method="channel"),)}))
    return specs


def ablations(task_data: dict[str, Any], blas: Any) -> list[dict[str, Any]]:
    """For every floor configuration whose floor is missed, rerun it with `ablation_specs`."""
    from onnx_lrsd.model.io import save_model

    from benchmarks.tasks import get_task

    name = task_data["task"]
    settings = TASKS[name]
    rows: list[dict[str, Any]] = []
    task = None
    for keep, method in sorted({(f.keep, f.method) for f in FLOORS if f.task == name}):
        base = next((c for c in task_data["configs"] if c["keep"] == keep and c["method"] == method
                     and "metrics" in c), None)
        if base is None:
            continue
        missed = [f for f in FLOORS if f.task == name and f.keep == keep and f.method == method
                  and base["metrics"].get(f.metric, float("-inf")) < f.value]
        if not missed:
            continue
        if task is None:
            task = get_task(name)
            task.prepare()
            feeds = task.calibration_feeds(settings.samples, settings.batch)
        for label, extra in ablation_specs(name, base):
            row: dict[str, Any] = {"keep": keep, "method": method, "variant": label,
                                   "changes": {k: (str(v) if k == "overrides" else v) for k, v in extra.items()}}
            LOGGER.info("%s keep=%g %s ablation: %s", name, keep, method, label)
            try:
                result, seconds, _ = compress_one(task.model_path, keep, METHODS[method], feeds, settings,
                                                  task.mask_input, blas, **extra)
                with tempfile.TemporaryDirectory(prefix="data_aware_") as tmp:
                    path = Path(tmp) / "ablation.onnx"
                    save_model(result.model, path)
                    row["metrics"] = task.evaluate(path)
                row.update(params_ratio=result.report.params_ratio, compress_s=seconds,
                           output_errors=result.report.output_errors)
                LOGGER.info("  -> %s params %.3f", {k: round(v, 4) for k, v in row["metrics"].items()},
                            row["params_ratio"])
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"
                LOGGER.error("  -> failed: %s", row["error"])
            rows.append(row)
    return rows


def _short(label: str) -> str:
    return label.split(":")[0]


def ablation_table(tasks: list[dict[str, Any]]) -> str:
    rows = []
    for t in tasks:
        shown = set()
        for a in t.get("ablations") or []:
            base = next(c for c in t["configs"] if c["keep"] == a["keep"] and c["method"] == a["method"])
            if a["keep"] not in shown:
                shown.add(a["keep"])
                rows.append([t["task"], f"{a['keep']:g}", "(as in the table)", *_metric_cells(base.get("metrics")),
                             fmt(base.get("params_ratio"))])
            if "error" in a:
                rows.append([t["task"], f"{a['keep']:g}", _short(a["variant"]) + " — FAILED: " + a["error"][:80],
                             *[""] * len(METRIC_COLUMNS), ""])
            else:
                rows.append([t["task"], f"{a['keep']:g}", _short(a["variant"]), *_metric_cells(a["metrics"]),
                             fmt(a["params_ratio"])])
    if not rows:
        return ""
    return markdown_table(["task", "keep", "independent, varied", *METRIC_COLUMNS, "params"], rows,
                          "lrl" + "r" * len(METRIC_COLUMNS) + "r")


# --------------------------------------------------------------------------- MiniLM time / memory study


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One MiniLM configuration in a fresh process (``--worker``): peak RSS is this config's own."""
    from benchmarks.tasks import get_task

    task = get_task("minilm")
    settings = TaskSettings(samples=spec["samples"], batch=spec["batch"], metrics=TASKS["minilm"].metrics)
    task.prepare()
    start = time.perf_counter()
    feeds = task.calibration_feeds(settings.samples, settings.batch)
    feeds_s = time.perf_counter() - start
    maxrss_before = max_rss_bytes()
    dims = symbolic_dims(task.model_path, task.latency_feeds(1))  # random verification without a held-out batch
    result, seconds, memory = compress_one(task.model_path, spec["keep"], spec["mode"], feeds, settings,
                                           task.mask_input, spec["blas"], dims=dims)
    timings = result.report.timings
    out = {**spec, "calibration_feeds_s": feeds_s, "compress_s": seconds,
           "calibrate_s": timings.get("collect_activations", 0.0),
           "fit_s": timings.get("reconstruct_feature_maps", 0.0),
           "timings": timings, "params_ratio": result.report.params_ratio,
           "maxrss_before_compress_mb": maxrss_before / MB, "maxrss_mb": max_rss_bytes() / MB,
           **memory.to_dict()}
    out["calibrate_plus_fit_s"] = out["calibrate_s"] + out["fit_s"]
    if spec.get("evaluate"):
        path = Path(tempfile.mkdtemp(prefix="data_aware_")) / "minilm.onnx"
        from onnx_lrsd.model.io import save_model

        save_model(result.model, path)
        del result
        out["metrics"] = task.evaluate(path)
        path.unlink()
        path.parent.rmdir()
    return out


def _blas_label(blas: Any) -> str:
    if blas == LIBRARY_DEFAULT:
        from onnx_lrsd.config import CompressConfig

        return f"{CompressConfig().blas_threads} (library default)"
    return "unlimited (OpenBLAS default)" if blas is None else str(blas)


def memory_study(evaluate: bool) -> list[dict[str, Any]]:
    rows = []
    for samples, blas in MEMORY_STUDY:
        spec = {"samples": samples, "batch": TASKS["minilm"].batch, "keep": MEMORY_STUDY_KEEP, "mode": "independent",
                "blas": blas, "blas_label": _blas_label(blas), "evaluate": evaluate}
        LOGGER.info("memory study: %d sentences, BLAS threads: %s (subprocess)", samples, _blas_label(blas))
        start = time.perf_counter()
        boot = "import sys; from benchmarks import data_aware; data_aware.main(['--worker', sys.argv[1]])"
        proc = subprocess.run([sys.executable, "-c", boot, json.dumps(spec)],
                              capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        if proc.returncode != 0:
            LOGGER.error("memory study worker failed:\n%s", proc.stderr[-3000:])
            rows.append({**spec, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"})
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["process_s"] = time.perf_counter() - start
        LOGGER.info("memory study %d sentences: calibrate %.1f s + fit %.1f s, compress %.1f s, peak RSS %.0f MB "
                    "(+%.0f MB during compress), maxrss %.0f MB", samples, row["calibrate_s"], row["fit_s"],
                    row["compress_s"], row["rss_peak_mb"], row["rss_added_mb"], row["maxrss_mb"])
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- table


def _metric_cells(metrics: dict[str, float] | None) -> list[str]:
    metrics = metrics or {}
    return [fmt(metrics.get(name)) for name in METRIC_COLUMNS]


def _floor_marks(task: str, config: dict[str, Any]) -> str:
    marks = []
    for floor in FLOORS:
        if floor.task == task and floor.keep == config["keep"] and floor.method == config["method"]:
            value = (config.get("metrics") or {}).get(floor.metric)
            ok = value is not None and value >= floor.value
            marks.append(f"{floor.metric}≥{floor.value:g} {'met' if ok else 'MISSED'}")
    return "; ".join(marks)


def rank_note(tasks: list[dict[str, Any]]) -> str:
    """Which rows of one keep share per-layer kinds and ranks (then latency differences between
    them are measurement noise)."""
    same, differ = [], []
    for t in tasks:
        for keep in sorted({c["keep"] for c in t["configs"]}, reverse=True):
            plans = {c["method"]: json.dumps([(l["name"], l["method"], l["ranks"]) for l in c["layers"]])
                     for c in t["configs"] if c["keep"] == keep and "layers" in c}
            groups: dict[str, list[str]] = {}
            for method, plan in plans.items():
                groups.setdefault(plan, []).append(method)
            (same if len(groups) == 1 else differ).append(
                f"{t['task']} {keep:g}" + ("" if len(groups) == 1 else
                                           " (" + " | ".join("+".join(g) for g in groups.values()) + ")"))
    note = ""
    if same:
        note += "Same per-layer kinds and ranks for every method at: " + ", ".join(same) + ". "
    if differ:
        note += ("Kinds or ranks differ at: " + ", ".join(differ) + " (data-aware fits keep the conv kind with "
                 "the lowest held-out error). ")
    return note


def results_table(tasks: list[dict[str, Any]]) -> str:
    headers = ["task", "keep", "method", *METRIC_COLUMNS, "params", "lat b1", "lat b32", "compress s", "floor"]
    rows = []
    for t in tasks:
        originals = {b: [e["original_ms"] for e in t["latency"] if e["batch"] == b and "original_ms" in e]
                     for b in LATENCY_BATCHES}
        lat = [f"1 ({sorted(v)[len(v) // 2]:.1f} ms)" if v else "1" for v in originals.values()]
        rows.append([t["task"], "1", "original", *_metric_cells(t["original"]), "1", *lat, "", ""])
        for c in t["configs"]:
            if "error" in c:
                rows.append([t["task"], f"{c['keep']:g}", METHOD_LABELS[c["method"]], "FAILED: " + c["error"][:80],
                             *[""] * (len(METRIC_COLUMNS) - 1), "", "", "", "", ""])
                continue
            rows.append([t["task"], f"{c['keep']:g}", METHOD_LABELS[c["method"]], *_metric_cells(c.get("metrics")),
                         fmt(c["params_ratio"]), fmt(c.get("latency_ratio_b1"), 2), fmt(c.get("latency_ratio_b32"), 2),
                         fmt(c["compress_s"], 1), _floor_marks(t["task"], c)])
    return markdown_table(headers, rows, "lrl" + "r" * len(METRIC_COLUMNS) + "rrrr" + "l")


def floors_table(tasks: list[dict[str, Any]]) -> str:
    rows = []
    for floor in FLOORS:
        t = next((t for t in tasks if t["task"] == floor.task), None)
        if t is None:
            continue
        got = {c["method"]: (c.get("metrics") or {}).get(floor.metric) for c in t["configs"] if c["keep"] == floor.keep}
        if floor.method not in got:
            continue
        value = got[floor.method]
        rows.append([floor.task, f"{floor.keep:g}", floor.metric, f"≥ {floor.value:g}", fmt(value),
                     "met" if value is not None and value >= floor.value else "**missed**",
                     fmt(got.get("data-free")), fmt(got.get("sequential")), fmt(t["original"].get(floor.metric)),
                     floor.note])
    return markdown_table(["task", "keep", "metric", "floor", "independent", "verdict", "data-free", "sequential",
                           "original", "note"], rows, "llllrlrrrl")


def fragile_layers(tasks: list[dict[str, Any]], top: int = 6) -> str:
    """Largest held-out data errors per floor configuration (the fragile layers dominate the output error)."""
    blocks = []
    for t in tasks:
        for keep in sorted({f.keep for f in FLOORS if f.task == t["task"]}):
            for c in t["configs"]:
                if c["keep"] != keep or c["method"] != "independent" or "layers" not in c:
                    continue
                layers = [l for l in c["layers"] if l["data_error"] is not None]
                layers.sort(key=lambda l: -l["data_error"])
                dense = sum(1 for l in c["layers"] if l["method"] == "dense")
                rows = [[l["name"], l["method"], "x".join(map(str, l["ranks"])),
                         f"{l['params_after']:,}/{l['params_before']:,}", f"{l['data_error']:.3f}"]
                        for l in layers[:top]]
                errors = sorted(l["data_error"] for l in layers)
                median = errors[len(errors) // 2] if errors else float("nan")
                blocks.append(f"**{t['task']} keep {keep:g} independent** — {len(layers)} layers factorized, "
                              f"{dense} left dense; median held-out data error {median:.3f}; largest:\n\n"
                              + markdown_table(["layer", "kind", "ranks", "params", "data error"], rows, "lllrr"))
    return "\n\n".join(blocks)


def memory_table(rows: list[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        if "error" in r:
            out.append([r["samples"], r["blas_label"], "FAILED " + r["error"][:60], *[""] * 8])
            continue
        m = r.get("metrics") or {}
        out.append([r["samples"], r["blas_label"], fmt(r["calibrate_s"], 1), fmt(r["fit_s"], 1),
                    fmt(r["calibrate_plus_fit_s"], 1), fmt(r["compress_s"], 1), f"{r['rss_before_mb']:.0f}",
                    f"{r['rss_peak_mb']:.0f}", f"{r['rss_added_mb']:.0f}", f"{r['maxrss_mb']:.0f}",
                    " / ".join(fmt(m.get(k)) for k in ("recall@1", "mrr", "cosine")) if m else ""])
    return markdown_table(["sentences", "BLAS threads", "calibrate s", "fit s", "calib+fit s", "compress s",
                           "RSS before MB", "peak RSS MB", "added MB", "ru_maxrss MB", "recall@1 / mrr / cosine"],
                          out, "rlrrrrrrrrl")


def render(data: dict[str, Any]) -> str:
    m = data["machine"]
    parts = [
        "# Data-free vs data-aware low-rank compression on real tasks",
        "",
        f"`{' '.join(['python -m benchmarks.data_aware', *data['argv']])}` "
        f"— {m['date']}, {m['cores_logical']} cores ({m['cpu']}), onnxruntime {m['onnxruntime']}, "
        f"onnx {m['onnx']}, numpy {m['numpy']}, scipy {m['scipy']}; onnx_lrsd commit {m.get('git_commit')}; "
        "load average at start "
        f"{m['load_average_at_start']} (other work was running: read ratios, not absolute times). "
        f"Total run {(data['total_s'] + data.get('previous_runs_s', 0.0)) / 60:.1f} min"
        + (f" (resumed with `--resume` from the run started {data['resumed_from']}: the keeps, latencies and "
           "ablations it completed were reused, see `resumed_keeps` in the JSON)."
           if data.get("resumed_from") else "."),
        "",
        "Metrics: digits `accuracy`; ppocr_rec `char_acc` / `char_acc_hard`; minilm `recall@1`, `mrr`, "
        "`cosine` (to the original model's embeddings). `params`: parameters after / before (compression "
        "report; MiniLM's 11.7M embedding parameters are not factorized). `lat b1`, `lat b32`: compressed "
        f"median / original median at batch 1 and 32, {THREADS} threads, all of a keep's models alive and "
        "interleaved (original's median in its row). `compress s`: wall time of `compress` (calibration "
        "through onnxruntime, fit, rewrite, verification). Calibration: "
        + ", ".join(f"{t['task']} {t['samples']} samples in batches of {t['batch']}"
                    + (f" (mask `{t['mask_input']}`)" if t.get("mask_input") else "") for t in data["tasks"])
        + f"; every {HOLDOUT_EVERY}th batch is held out for verification, not fitted. "
        + rank_note(data["tasks"])
        + f"BLAS threads of the fits: {_blas_label(data['blas_threads'])} (onnxruntime uses {THREADS}).",
        "",
        results_table(data["tasks"]),
    ]
    if any(f.task in {t["task"] for t in data["tasks"]} for f in FLOORS):
        parts += ["", "## Floors", "", floors_table(data["tasks"])]
    fragile = fragile_layers(data["tasks"])
    if fragile:
        parts += ["", "## Where the error is (held-out per-layer data error ‖X(W−W′)‖/‖XW‖)", "", fragile]
    ablation = ablation_table(data["tasks"])
    if ablation:
        parts += ["", "## Missed floors: configuration ablations (library unchanged)", "", ablation, "",
                  "Layers left dense by the ablations (`LayerOverride(skip=True)`; the largest held-out data "
                  "errors of the configuration in the table):"]
        for t in data["tasks"]:
            for a in t.get("ablations") or []:
                names = [o.split("pattern='")[1].split("'")[0] for o in str(a["changes"].get("overrides", "")).split(
                    "LayerOverride(")[1:] if "skip=True" in o]
                if names:
                    parts.append(f"- {t['task']} keep {a['keep']:g}, {_short(a['variant'])}: "
                                 + ", ".join(f"`{n}`" for n in names))
    if data.get("memory_study"):
        parts += ["", f"## MiniLM: calibration + fit time and memory (keep {MEMORY_STUDY_KEEP:g}, independent, "
                      f"batch {TASKS['minilm'].batch}, one subprocess per row)", "",
                  memory_table(data["memory_study"]), "",
                  "`RSS before`: after loading the task and building the feeds; `peak RSS` / `added`: sampled "
                  "every 20 ms during `compress`; `ru_maxrss`: the subprocess's peak over its whole life "
                  "(task preparation included, evaluation excluded). With fewer than "
                  f"{HOLDOUT_EVERY} batches (64 and 128 sentences) nothing is held out, so those rows also lack "
                  "the held-out Gram accumulators (and verify on random inputs)."]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), help="default: all")
    parser.add_argument("--keeps", nargs="+", type=float,
                        help=f"default: {' '.join(map(str, DEFAULT_KEEPS))} (digits also 0.1)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help="default: all")
    parser.add_argument("--quick", action="store_true", help="digits only, keeps 0.5 and 0.1, short timings")
    parser.add_argument("--no-memory-study", action="store_true", help="skip the MiniLM time/memory subprocesses")
    parser.add_argument("--blas-threads", type=int, default=-1,
                        help="CompressConfig.blas_threads for every compress (0: unlimited); default: the "
                             "library's default")
    parser.add_argument("--no-ablations", action="store_true",
                        help="skip the config ablations run when a floor is missed")
    parser.add_argument("--latency-budget", type=float, default=None, help="seconds per interleaved timing call")
    parser.add_argument("--output", type=Path, default=None,
                        help="results prefix (default benchmarks/results/data_aware, --quick: data_aware.quick)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the keeps, ablations and memory study an interrupted run already wrote")
    parser.add_argument("--render-only", action="store_true", help="rewrite the Markdown from the JSON and print it")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    if args.render_only:
        prefix = str(args.output or RESULTS_DIR / ("data_aware.quick" if args.quick else "data_aware"))
        text = render(json.loads(Path(prefix + ".json").read_text()))
        write_text(Path(prefix + ".md"), text)
        print(text)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("onnx_lrsd").setLevel(logging.WARNING)
    names = args.tasks or (["digits_cnn"] if args.quick else list(TASKS))
    methods = tuple(args.methods or METHODS)
    budget = args.latency_budget or (4.0 if args.quick else 20.0)
    blocks = 3 if args.quick else 5
    blas: Any = LIBRARY_DEFAULT if args.blas_threads < 0 else (args.blas_threads or None)
    output = args.output or RESULTS_DIR / ("data_aware.quick" if args.quick else "data_aware")
    data: dict[str, Any] = {"argv": argv if argv is not None else sys.argv[1:], "machine": machine_info(),
                            "threads": THREADS, "latency_batches": list(LATENCY_BATCHES),
                            "holdout_every": HOLDOUT_EVERY,
                            "blas_threads": blas, "floors": [f.__dict__ for f in FLOORS],
                            "tasks": []}
    json_path, md_path = Path(str(output) + ".json"), Path(str(output) + ".md")
    previous: dict[str, Any] = {}
    if args.resume and json_path.is_file():
        previous = json.loads(json_path.read_text())
        if previous.get("machine", {}).get("git_commit") != data["machine"]["git_commit"]:
            LOGGER.warning("not resuming: %s was written by library commit %s, this is %s", json_path,
                           previous.get("machine", {}).get("git_commit"), data["machine"]["git_commit"])
            previous = {}
    if previous:
        data["resumed_from"] = previous.get("machine", {}).get("date")
        data["previous_runs_s"] = previous.get("total_s", 0.0) + previous.get("previous_runs_s", 0.0)
    previous_tasks = {t["task"]: t for t in previous.get("tasks", [])}
    started = time.perf_counter()

    def save(task_out: dict[str, Any] | None = None) -> None:
        if task_out is not None:
            data["tasks"] = [t for t in data["tasks"] if t["task"] != task_out["task"]] + [task_out]
        data["total_s"] = time.perf_counter() - started
        write_json(json_path, data)  # partial results survive a crash or a kill

    with tempfile.TemporaryDirectory(prefix="data_aware_") as tmp:
        for name in names:
            if args.keeps:
                keeps = tuple(args.keeps)
            elif args.quick:
                keeps = (0.5, 0.1)
            else:
                keeps = DEFAULT_KEEPS + TASKS[name].extra_keeps
            save(run_task(name, keeps, methods, Path(tmp), blas, budget, blocks, previous_tasks.get(name), save))
    if not args.no_ablations:
        for task_data in data["tasks"]:
            old_rows = previous_tasks.get(task_data["task"], {}).get("ablations")
            reuse = old_rows is not None and _same_floor_configs(task_data)
            task_data["ablations"] = old_rows if reuse else ablations(task_data, blas)
            save()
    if "minilm" in names and not args.quick and not args.no_memory_study:
        old_rows = previous.get("memory_study")
        data["memory_study"] = old_rows if old_rows and not any("error" in r for r in old_rows) \
            else memory_study(evaluate=True)
    data["total_s"] = time.perf_counter() - started
    data["peak_rss_main_mb"] = max_rss_bytes() / MB
    text = render(data)
    write_json(json_path, data)
    write_text(md_path, text)
    print(text)
    LOGGER.info("wrote %s and %s (%.1f min)", json_path, md_path, data["total_s"] / 60)


if __name__ == "__main__":
    main()
