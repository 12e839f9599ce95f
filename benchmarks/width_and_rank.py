"""Low rank alone, width reduction alone, and both in one allocation, at the same measured latency.

Run from the repository root::

    python -m benchmarks.width_and_rank                      # PP-OCRv4 rec and MiniLM (~1.5 h on 2 shared cores)
    python -m benchmarks.width_and_rank --tasks minilm       # one task (the registry runs each into its own file)
    python -m benchmarks.width_and_rank --quick              # the digit CNN, one target, into width_and_rank.quick.json
    python -m benchmarks.width_and_rank --tasks ppocr_rec --targets 1.15 --output benchmarks/results/width_and_rank_mild
                                                             # other speedups, into their own file
    python -m benchmarks.width_and_rank --render-only        # rewrite the Markdown from the JSON

For every task (``benchmarks/tasks``; calibration data as in ``benchmarks/data_aware``, disjoint
from the evaluation data) and every speedup in ``TARGETS``, three runs of ``onnx_lrsd.compress``
with ``target_latency`` = that speedup (measured by the run itself in onnxruntime at batch
``LATENCY_BATCH[task]``, 2 threads, its rounds correcting the allocation's prediction; ``best_effort``:
a target no round reaches gives the nearest model, marked in the table):

- ``low rank``: ``method="auto"``, the global low-rank allocation (error curves times measured
  sensitivities, per-candidate measured latency);
- ``width``: ``method="prune"``, the same allocation over the coupled channel groups' widths
  alone (refit error curves times measured sensitivities), readers refitted by least squares;
- ``width + low rank``: ``method="prune+lowrank"``, one allocation over both, executed
  narrow-first (`onnx_lrsd.passes.width_and_rank`).

Data-aware, independent mode, `holdout_every` 5. All models of a task are then timed together,
interleaved with the original (``time_against_original``: 2 threads, block medians) at batch 1
and 32 — the columns to compare; the run's own measured speedup is listed too. Every metric of the
task comes from ``task.evaluate`` on its evaluation split; the output error is the relative L2
error of the first output on the batch-32 latency input (evaluation data).

Results: ``benchmarks/results/width_and_rank.{json,md}`` (PP-OCR rec) and
``width_and_rank_minilm.{json,md}``. The machine is shared with other jobs: latency only as
interleaved ratios; the load is recorded.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import benchmark_main, fmt, markdown_table, results_header, time_against_original

LOGGER = logging.getLogger("benchmarks.width_and_rank")

THREADS = 2
TASK_NAMES = ("ppocr_rec", "minilm", "digits_cnn")
TARGETS = {"ppocr_rec": (1.3, 1.6), "minilm": (1.3,), "digits_cnn": (1.3,)}
LATENCY_BATCH = {"ppocr_rec": 1, "minilm": 8, "digits_cnn": 32}
METHODS = (("low rank", "auto"), ("width", "prune"), ("width + low rank", "prune+lowrank"))
METRICS = {"minilm": ("recall@1", "mrr", "cosine"), "ppocr_rec": ("char_acc", "char_acc_hard"),
           "digits_cnn": ("accuracy",)}


def _model_stats(path: Path) -> dict[str, float]:
    import onnx

    from onnx_lrsd.plan.cost import count_params

    return {"params": count_params(onnx.load(str(path)))}


def _output_error(original: Path, candidate: Path, feeds: dict) -> float:
    from benchmarks.tasks.base import make_session

    want = make_session(original).run(None, feeds)[0].astype(np.float64)
    got = make_session(candidate).run(None, feeds)[0].astype(np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _compress(task, settings, feeds, method: str, speedup: float, batch: int, path: Path) -> dict[str, Any]:
    from onnx_lrsd import compress
    from onnx_lrsd.model.io import save_model

    start = time.perf_counter()
    result = compress(task.model_path, calibration=feeds, method=method, target_latency=speedup, best_effort=True,
                      mode="independent", mask_input=task.mask_input, calib_samples=settings.samples,
                      calib_batch=settings.batch, holdout_every=5, latency_threads=THREADS, latency_batch=batch)
    seconds = time.perf_counter() - start
    save_model(result.model, path)
    report, allocation = result.report, result.report.allocation
    return {"path": path, "seconds": seconds, "params_ratio": report.params_ratio, "macs_ratio": report.macs_ratio,
            "measured_speedup": allocation.measured_speedup if allocation else None,
            "rounds": allocation.rounds if allocation else None,
            "predicted_error": allocation.predicted_error if allocation else None,
            "verified_error": max(report.output_errors.values(), default=None),
            "factorized": sum(1 for l in report.layers if l.method != "dense"),
            "narrowed": sum(1 for w in report.widths if w.kept < w.channels), "groups": len(report.widths),
            "widths": {w.name: [w.kept, w.channels] for w in report.widths}}


def run_task(name: str, workdir: Path, budget_s: float, blocks: int, targets=None) -> dict[str, Any]:
    """The three methods at every target speedup, timed together, evaluated on the task."""
    from benchmarks.data_aware import task_inputs

    task, settings, feeds, latency_feeds, _ = task_inputs(name)
    original = Path(task.model_path)
    batch = LATENCY_BATCH[name]
    out: dict[str, Any] = {"task": name, "latency_batch": batch, "threads": THREADS,
                           "calibration": {"samples": settings.samples, "batch": settings.batch}}
    rows: list[dict[str, Any]] = [{"label": "original", "method": "original", "target": None, "path": original}]
    for speedup in targets or TARGETS[name]:
        for label, method in METHODS:
            LOGGER.info("%s: %s at %.2fx", name, label, speedup)
            row = {"label": label, "method": method, "target": speedup}
            try:
                row.update(_compress(task, settings, feeds, method, speedup, batch,
                                     workdir / f"{name}_{method.replace('+', '_')}_{speedup}.onnx"))
            except Exception as exc:  # a failure is a result too
                LOGGER.warning("%s at %.2fx failed: %s", label, speedup, exc)
                row["error"] = str(exc)
            rows.append(row)
    timed = [r for r in rows[1:] if "path" in r]
    for b in (1, 32):
        latency = time_against_original(original, [r["path"] for r in timed], latency_feeds[b], threads=THREADS,
                                        budget_s=budget_s, blocks=blocks)
        out[f"latency_b{b}"] = latency.to_dict()
        for r, ratio in zip(timed, latency.ratios):
            r[f"latency_b{b}"] = ratio
    for r in rows:
        if "path" not in r:
            continue
        LOGGER.info("evaluating %s %s", r["label"], r["target"])
        r["metrics"] = task.evaluate(r["path"])
        r["output_error"] = 0.0 if r["method"] == "original" else _output_error(original, r["path"], latency_feeds[32])
        r["path"] = str(r["path"])
    out["rows"] = rows
    return out


def verdict(task: dict[str, Any]) -> dict[str, Any]:
    """Per target: whether width + low rank beats low rank alone — every metric of the task at
    least as high, and at least as fast (interleaved latency within 3 %) at batch 1 and at 32."""
    metrics = METRICS[task["task"]]
    found = {}
    for target in sorted({r["target"] for r in task["rows"] if r["target"] is not None}):
        by = {r["method"]: r for r in task["rows"] if r["target"] == target and "metrics" in r}
        low, both = by.get("auto"), by.get("prune+lowrank")
        if low is None or both is None:
            found[str(target)] = {"beats_low_rank": None}
            continue
        better = all(both["metrics"][m] >= low["metrics"][m] for m in metrics)
        fast = {b: both[f"latency_b{b}"] <= low[f"latency_b{b}"] * 1.03 for b in (1, 32)}
        found[str(target)] = {"beats_low_rank": bool(better and all(fast.values())), "better_metrics": better,
                              "as_fast_b1": fast[1], "as_fast_b32": fast[32]}
    return found


def run_one(name: str, workdir: Path, budget_s: float, blocks: int, args, results_dir: Path) -> dict[str, Any]:
    targets = tuple(args.targets) if args.targets else TARGETS[name][:1] if args.quick else TARGETS[name]
    return run_task(name, workdir, budget_s, blocks, targets=targets)


def _extra_args(parser) -> None:
    parser.add_argument("--targets", type=float, nargs="+", help="speedups to search (default: TARGETS of the task)")


def _rows(t: dict[str, Any], metrics) -> list[list[str]]:
    rows = []
    for r in t["rows"]:
        target = "" if r["target"] is None else f"{r['target']:g}x"
        if "error" in r:
            rows.append([target, r["label"], f"failed: {r['error'][:100]}"] + [""] * (len(metrics) + 4))
            continue
        m = r.get("metrics", {})
        searched = r.get("measured_speedup")
        missed = searched is not None and r["target"] and searched < r["target"] * 0.9
        shape = "" if r["method"] == "original" else f"{r.get('narrowed', 0)}/{r.get('groups', 0)} g, " \
                                                     f"{r.get('factorized', 0)} f"
        rows.append([target, r["label"], *(fmt(m.get(k)) for k in metrics), fmt(r.get("output_error"), 3),
                     fmt(r.get("params_ratio", 1.0 if r["method"] == "original" else None)),
                     (fmt(searched, 2) + (" (missed)" if missed else "")) if searched else "",
                     fmt(r.get("latency_b1"), 2), fmt(r.get("latency_b32"), 2), shape])
    return rows


def _verdict_lines(t: dict[str, Any]) -> list[str]:
    lines = []
    for target, v in verdict(t).items():
        if v.get("beats_low_rank") is None:
            lines.append(f"- {target}x: not compared (a run failed).")
        else:
            lines.append(f"- {target}x: width + low rank {'beats' if v['beats_low_rank'] else 'does not beat'} "
                         f"low rank alone (every metric at least as high: {v['better_metrics']}; at least as "
                         f"fast within 3 % at batch 1: {v['as_fast_b1']}, at batch 32: {v['as_fast_b32']}).")
    return lines


def _headers(metrics) -> list[str]:
    return ["target", "configuration", *metrics, "output error", "params", "search speedup", "lat b1", "lat b32",
            "narrowed / factorized"]


def render(data: dict[str, Any]) -> str:
    lines = results_header(data, "Low rank, width, and both in one allocation at the same measured latency",
                           "benchmarks.width_and_rank")
    for t in data["tasks"]:
        metrics = METRICS[t["task"]]
        lines += [f"## {t['task']}", "",
                  f"Each run searched `target_latency` at batch {t['latency_batch']}, {t['threads']} threads "
                  "(search speedup: what its last round measured; missed: more than 10 % short). "
                  "Narrowed / factorized: channel groups narrowed of all, layers factorized.", "",
                  markdown_table(_headers(metrics), _rows(t, metrics), "ll" + "r" * (len(metrics) + 5) + "l"), ""]
        lines += [*_verdict_lines(t), ""]
    return "\n".join(lines)


def _requested(data: dict[str, Any]) -> list[str]:
    argv = list(data.get("argv") or [])
    if "--tasks" not in argv:
        return ["ppocr_rec", "minilm"]
    rest = argv[argv.index("--tasks") + 1:]
    return [a for a in rest[:next((i for i, a in enumerate(rest) if a.startswith("--")), len(rest))]]


def readme_sections(data: dict[str, Any]) -> dict[str, str]:
    """``width_and_rank`` (``width_and_rank_minilm`` for a run of MiniLM alone): per task and
    target speedup, the three methods' metrics, output error, params and interleaved latency."""
    parts = []
    for t in data["tasks"]:
        metrics = METRICS[t["task"]]
        parts += [f"**{t['task']}** ({', '.join(metrics)}; searched at batch {t['latency_batch']}):",
                  markdown_table(_headers(metrics), _rows(t, metrics), "ll" + "r" * (len(metrics) + 5) + "l"),
                  "\n".join(_verdict_lines(t))]
    parts.append("Each configuration is one `compress(target_latency=...)` run (`method` auto / prune / "
                 "prune+lowrank; best effort), its own rounds measuring the speedup; then all models of a task are "
                 "timed together, interleaved with the original (2 threads, below 1 is faster). Output error: "
                 "relative L2 of the first output on evaluation data. What each row is: "
                 "`benchmarks/width_and_rank.py`.")
    argv = list(data.get("argv") or [])
    output = Path(argv[argv.index("--output") + 1]).name if "--output" in argv else None
    name = output or {("minilm",): "width_and_rank_minilm"}.get(tuple(_requested(data)), "width_and_rank")
    return {name: "\n\n".join(parts)}


def main(argv=None) -> None:
    benchmark_main(argv, __doc__, TASK_NAMES, "width_and_rank", run_one, render, extra_args=_extra_args,
                   quick_tasks=("digits_cnn",))


if __name__ == "__main__":
    main()
