"""Global allocation (one target for the whole model) against a uniform keep ratio, on three
real models and their real tasks.

Run from the repository root::

    python -m benchmarks.global_allocation              # all three tasks (about 30 min on 2 cores)
    python -m benchmarks.global_allocation --quick      # digits only (~1 min)
    python -m benchmarks.global_allocation --tasks minilm --no-sweep
    python -m benchmarks.global_allocation --rerun-latency   # redo the latency-target rows of results/

For every task (``benchmarks/tasks``) and keep ratio K of ``KEEPS``:

- ``uniform``: ``compress(keep=K)``, data-aware independent (every layer keeps K of its params);
- ``global, equal params``: ``compress(target_params=P)`` with P the uniform model's measured
  params ratio (the allocation picks every layer's kind and rank for the least predicted
  output error: error curves from the calibration statistics, weighted by sensitivities
  measured in onnxruntime);
- ``global, equal latency``: ``compress(target_latency=S)`` with S the uniform model's speedup
  measured here at batch 1 (the allocation's latency costs come from a per-layer onnxruntime
  microbenchmark, corrected by measuring the written model; see ``onnx_lrsd.passes.search``).

Then ``target_latency=1.5`` (batch 1, 2 threads): the measured speedup, or the "unreachable"
message. Finally a sweep over params targets with the task metric as callback
(``onnx_lrsd.sweep``), written as a table and a PNG per task.

Calibration and evaluation data are those of ``benchmarks.data_aware`` (disjoint by construction,
see its docstring), with the same calibration sample counts and batches. Latency: every
model of a keep is timed interleaved with the original (``time_against_original``: 2 threads,
block medians), at batch 1 and 32; a ratio below 1 is faster.

Results: ``benchmarks/results/global_allocation.{json,md}`` and
``benchmarks/results/global_allocation_<task>.png``.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from benchmarks.common import (RESULTS_DIR, benchmark_main, fmt, markdown_table,
                               time_against_original, write_text)
from benchmarks.data_aware import HOLDOUT_EVERY, METRIC_COLUMNS, TASKS, task_inputs

LOGGER = logging.getLogger("benchmarks.global_allocation")

THREADS = 2
LATENCY_BATCHES = (1, 32)
KEEPS = {"digits_cnn": (0.05,), "ppocr_rec": (0.5, 0.35), "minilm": (0.5, 0.35)}
PRIMARY = {"digits_cnn": "accuracy", "ppocr_rec": "char_acc", "minilm": "recall@1"}
SWEEP = (0.9, 0.75, 0.6, 0.45, 0.3)
LATENCY_TARGET = 1.5


def compress_task(task, feeds, settings, **options):
    """``onnx_lrsd.compress`` with the benchmark's calibration settings; (result, seconds)."""
    from onnx_lrsd import compress

    start = time.perf_counter()
    result = compress(task.model_path, calibration=feeds, mode="independent", mask_input=task.mask_input,
                      calib_samples=settings.samples, calib_batch=settings.batch, holdout_every=HOLDOUT_EVERY,
                      latency_threads=THREADS, **options)
    return result, time.perf_counter() - start


def evaluated(task, result, path: Path, seconds: float, label: str) -> dict[str, Any]:
    from onnx_lrsd.model.io import save_model

    save_model(result.model, path)
    report = result.report
    row = {"label": label, "path": str(path), "compress_s": seconds, "params_ratio": report.params_ratio,
           "macs_ratio": report.macs_ratio, "output_errors": report.output_errors,
           "metrics": task.evaluate(path),
           "layers": [{"name": layer.name, "method": layer.method, "ranks": list(layer.ranks)}
                      for layer in report.layers]}
    if report.allocation is not None:
        row["allocation"] = report.allocation.__dict__
    LOGGER.info("%s %s: %s params %.3f (%.1f s)", task.name, label,
                {k: round(v, 4) for k, v in row["metrics"].items()}, report.params_ratio, seconds)
    return row


def timed(task, rows: list[dict[str, Any]], latency_feeds, budget: float, blocks: int) -> None:
    """Adds ``lat_b<batch>`` (compressed / original, block medians) to every row."""
    for batch in LATENCY_BATCHES:
        timing = time_against_original(task.model_path, [Path(r["path"]) for r in rows], latency_feeds[batch],
                                       threads=THREADS, budget_s=budget, blocks=blocks)
        for row, ratio in zip(rows, timing.ratios):
            row[f"lat_b{batch}"] = ratio
            row[f"original_ms_b{batch}"] = timing.original_ms


def runner(task, settings, feeds, dims, workdir: Path) -> Callable[..., dict[str, Any]]:
    """run(label, stem, **options): compress the task's model with `options`, save, evaluate."""
    def run(label: str, stem: str, **options) -> dict[str, Any]:
        result, seconds = compress_task(task, feeds, settings, dims=dims, **options)
        return evaluated(task, result, workdir / f"{task.name}_{stem}.onnx", seconds, label)
    return run


def attempt(rows: list, label: str, make: Callable[[], dict[str, Any]]) -> None:
    try:
        rows.append(make())
    except Exception as exc:  # an unreachable target or a failure is a result too
        LOGGER.error("%s failed: %s", label, exc)
        rows.append({"label": label, "error": f"{type(exc).__name__}: {exc}",
                     "traceback": traceback.format_exc()})


def run_task(name: str, keeps, workdir: Path, budget: float, blocks: int, do_sweep: bool,
             results_dir: Path = RESULTS_DIR) -> dict[str, Any]:
    from onnx_lrsd import plot_sweep, sweep
    from onnx_lrsd.model.io import save_model

    task, settings, feeds, latency_feeds, dims = task_inputs(name, LATENCY_BATCHES)
    out: dict[str, Any] = {"task": name, "samples": settings.samples, "batch": settings.batch,
                           "original": task.evaluate(task.model_path), "keeps": []}
    run = runner(task, settings, feeds, dims, workdir)
    for keep in keeps:
        rows = [run("uniform", f"{keep}_uniform", keep=keep)]
        params = rows[0]["params_ratio"]
        attempt(rows, "global, equal params", lambda: run("global, equal params", f"{keep}_params",
                                                           target_params=params))
        timed(task, [r for r in rows if "error" not in r], latency_feeds, budget, blocks)
        speedup = 1 / rows[0]["lat_b1"]
        if speedup > 1.02:
            attempt(rows, "global, equal latency", lambda: run("global, equal latency", f"{keep}_latency",
                                                                target_latency=speedup, latency_batch=1))
            timed(task, [r for r in rows if "error" not in r], latency_feeds, budget, blocks)
        else:
            rows.append({"label": "global, equal latency",
                         "error": f"the uniform model is not faster at batch 1 (speedup {speedup:.2f}x)"})
        out["keeps"].append({"keep": keep, "uniform_speedup_b1": speedup, "rows": rows})
    target: list[dict[str, Any]] = []
    label = f"target_latency {LATENCY_TARGET}"
    attempt(target, label, lambda: run(label, "target_latency", target_latency=LATENCY_TARGET, latency_batch=1))
    if "error" not in target[0]:
        timed(task, target, latency_feeds, budget, blocks)
    out["target_latency"] = target[0]
    if do_sweep:
        seen: list[dict[str, float]] = []

        def metric(model) -> float:
            path = workdir / f"{name}_sweep.onnx"
            save_model(model, path)
            seen.append(task.evaluate(path))
            return seen[-1][PRIMARY[name]]

        start = time.perf_counter()
        report = sweep(task.model_path, SWEEP, calibration=feeds, metric=metric, mask_input=task.mask_input,
                       calib_samples=settings.samples, calib_batch=settings.batch, holdout_every=HOLDOUT_EVERY,
                       latency_threads=THREADS, latency_batch=1, dims=dims)
        plot = results_dir / f"global_allocation_{name}.png"
        plot_sweep(report, plot, title=f"{name}: global allocation sweep ({PRIMARY[name]} on the task)")
        out["sweep"] = {**report.to_dict(), "metrics": seen[1:], "plot": plot.name,
                        "seconds": time.perf_counter() - start}
    return out


def rerun_latency(json_path: Path, budget: float, blocks: int) -> None:
    """``--rerun-latency``: redo, in place in ``json_path``, the latency-target rows of an earlier run: every
    ``target_latency`` row, and the "global, equal latency" rows that failed (their uniform
    model is recompressed to be timed with them). The rerun is noted in the JSON."""
    import tempfile

    from benchmarks.common import machine_info, write_json

    data = json.loads(json_path.read_text())
    with tempfile.TemporaryDirectory(prefix="global_allocation_") as tmp:
        workdir = Path(tmp)
        for out in data["tasks"]:
            task, settings, feeds, latency_feeds, dims = task_inputs(out["task"], LATENCY_BATCHES)
            run = runner(task, settings, feeds, dims, workdir)
            for entry in out["keeps"]:
                index = next((i for i, r in enumerate(entry["rows"]) if r["label"] == "global, equal latency"
                              and "error" in r and entry["uniform_speedup_b1"] > 1.02), None)
                if index is None:
                    continue
                rows = [run("uniform", f"{entry['keep']}_uniform", keep=entry["keep"])]
                attempt(rows, "global, equal latency", lambda: run(
                    "global, equal latency", f"{entry['keep']}_latency", target_latency=entry["uniform_speedup_b1"],
                    latency_batch=1))
                timed(task, [r for r in rows if "error" not in r], latency_feeds, budget, blocks)
                entry["rows"][index] = {**rows[1], "rerun": True}
            target: list[dict[str, Any]] = []
            label = f"target_latency {LATENCY_TARGET}"
            attempt(target, label, lambda: run(label, "target_latency", target_latency=LATENCY_TARGET,
                                               latency_batch=1))
            if "error" not in target[0]:
                timed(task, target, latency_feeds, budget, blocks)
            out["target_latency"] = {**target[0], "rerun": True}
            write_json(json_path, data)
    data["latency_rerun"] = machine_info()
    write_json(json_path, data)


# --------------------------------------------------------------------------- tables


def _metrics(row: dict[str, Any]) -> list[str]:
    metrics = row.get("metrics") or {}
    return [fmt(metrics.get(m)) for m in METRIC_COLUMNS]


def comparison_table(tasks: list[dict[str, Any]]) -> str:
    headers = ["task", "keep", "configuration", *METRIC_COLUMNS, "params", "MACs", "lat b1", "lat b32",
               "compress s", "note"]
    rows = []
    for t in tasks:
        rows.append([t["task"], "", "original", *_metrics({"metrics": t["original"]}), "1", "1", "1", "1", "", ""])
        for entry in t["keeps"]:
            for r in entry["rows"]:
                note = r.get("error", "")
                alloc = r.get("allocation") or {}
                if alloc.get("measured_speedup"):
                    note = (f"target {alloc['value']:.2f}x, measured in compress {alloc['measured_speedup']:.2f}x "
                            f"({alloc['rounds']} round{'s' if alloc['rounds'] > 1 else ''})")
                rows.append([t["task"], entry["keep"], r["label"] + (" (rerun)" if r.get("rerun") else ""), *_metrics(r), fmt(r.get("params_ratio")),
                             fmt(r.get("macs_ratio")), fmt(r.get("lat_b1")), fmt(r.get("lat_b32")),
                             fmt(r.get("compress_s"), 1), note])
    return markdown_table(headers, rows)


def latency_target_table(tasks: list[dict[str, Any]]) -> str:
    headers = ["task", "measured speedup b1 (this run)", "measured in compress", "rounds", "within 10%",
               "metric", "params", "note"]
    rows = []
    for t in tasks:
        r = t["target_latency"]
        if "error" in r:
            rows.append([t["task"] + (" (rerun)" if r.get("rerun") else ""), "", "", "", "", "", "", r["error"]])
            continue
        speedup = 1 / r["lat_b1"]
        alloc = r["allocation"]
        rows.append([t["task"] + (" (rerun)" if r.get("rerun") else ""), f"{speedup:.3f}",
                     f"{alloc['measured_speedup']:.3f}", alloc["rounds"],
                     "yes" if abs(speedup / LATENCY_TARGET - 1) <= 0.10 else "**no**",
                     f"{PRIMARY[t['task']]} {fmt(r['metrics'][PRIMARY[t['task']]])}", fmt(r["params_ratio"]), ""])
    return markdown_table(headers, rows)




def sweep_tables(tasks: list[dict[str, Any]]) -> str:
    parts = []
    for t in tasks:
        sw = t.get("sweep")
        if not sw:
            continue
        headers = ["target params", "params", "MACs", "speedup b1", "output error", *METRIC_COLUMNS, "Pareto"]
        rows = [[fmt(p["target_params"]), fmt(p["params_ratio"]), fmt(p["macs_ratio"]), fmt(p["speedup"]),
                 f"{p['output_error']:.3e}", *_metrics({"metrics": m}), "yes" if p["pareto"] else ""]
                for p, m in zip(sw["points"], sw["metrics"])]
        parts.append(f"**{t['task']}** (sweep {sw['seconds']:.0f} s; plot `{sw['plot']}`)\n\n"
                     + markdown_table(headers, rows) + f"\n\n![{t['task']} sweep]({sw['plot']})")
    return "\n\n".join(parts)


def render(data: dict[str, Any]) -> str:
    m = data["machine"]
    rerun = data.get("latency_rerun")
    note = ("" if not rerun else f" Latency-target rows marked (rerun) were redone with `--rerun-latency` at "
            f"commit {rerun.get('git_commit')} on {rerun.get('date')}.")
    return "\n\n".join([
        "# Global allocation against a uniform keep ratio on real tasks",
        f"`python -m benchmarks.global_allocation {' '.join(data['argv'])}` — {m.get('date')}, "
        f"onnx_lrsd commit {m.get('git_commit')}, {m.get('cpu')}, onnxruntime {m.get('onnxruntime')}; "
        f"total {data['total_s'] / 60:.1f} min. Latency ratios: compressed / original median, 2 threads, "
        "interleaved blocks (below 1 is faster). Calibration as in `benchmarks/results/data_aware.md`." + note,
        "## Equal params and equal latency", comparison_table(data["tasks"]),
        f"## `target_latency={LATENCY_TARGET}` (batch 1, 2 threads)", latency_target_table(data["tasks"]),
        "## Sweeps (task metric as callback)", sweep_tables(data["tasks"]),
    ]) + "\n"


def main(argv: list[str] | None = None) -> None:
    if argv is None:
        import sys

        argv = sys.argv[1:]
    if "--rerun-latency" in argv:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
        logging.getLogger("onnx_lrsd").setLevel(logging.WARNING)
        logging.getLogger("onnx_lrsd.passes.search").setLevel(logging.INFO)
        json_path = RESULTS_DIR / "global_allocation.json"
        rerun_latency(json_path, 15.0, 5)
        text = render(json.loads(json_path.read_text()))
        write_text(json_path.with_suffix(".md"), text)
        print(text)
        return
    benchmark_main(argv, __doc__, TASKS, "global_allocation",
                   lambda task, workdir, budget, blocks, args, results: run_task(
                       task, KEEPS[task], workdir, budget, blocks, not args.no_sweep, results),
                   render, lambda parser: parser.add_argument("--no-sweep", action="store_true"))


if __name__ == "__main__":
    main()
