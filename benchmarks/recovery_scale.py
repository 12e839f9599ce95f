"""Recovery's cost and schedule: gradient shards on a process pool, and the step-size warm-up.

``--study shards``: whether cutting each batch's gradient into shards that run on a process
pool (``RecoverConfig(workers=2)``: 2 processes, 1 onnxruntime thread each) pays against one
process running onnxruntime on 2 threads (the default), on the same closed form, data, seed and
number of Adam steps. Runs alternate (1 process, pool, 1 process, pool, ...); each run's time
per step is the median over its steps of the wall time between step callbacks (the adjoint
build, teacher labelling of the held-out split and the pool's start are reported apart as
setup). A third configuration, the same 2 shards run one after the other in this process,
checks that the pool wrote the same bytes (the shards decide the model, not where they run).

``--study warmup``: the held-out loss curve of end-to-end recovery with a linear warm-up of
the step size over 0 and more steps (same closed form, data, seed, steps; evaluated every few
steps from step 0), its rise over the first steps, its end, and the task metric of the step kept.

Run: ``python -m benchmarks.recovery_scale --study shards [--tasks digits_cnn ppocr_rec]``
(``--output benchmarks/results/recovery_shards``) and ``--study warmup`` (``--output
benchmarks/results/recovery_warmup``); ``--quick``: the digit CNN only, fewer steps. The machine
is shared with other jobs: the load is recorded before every run; times are wall clock.
"""
from __future__ import annotations

import gc
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import onnx

from benchmarks.common import benchmark_main, fmt, markdown_table

LOGGER = logging.getLogger("benchmarks.recovery_scale")
THREADS = 2

SHARD_PLANS: dict[str, dict[str, Any]] = {
    "digits_cnn": {"budget": {"keep": 0.02, "min_rank": 2}, "calib": (128, 16), "samples": 2048,
                   "recover": {"lr": 1e-3, "batch": 32}, "steps": 40, "repeats": 3},
    "ppocr_rec": {"budget": {"keep": 0.5}, "calib": (128, 16), "samples": 160,
                  "recover": {"lr": 1e-4, "batch": 8}, "steps": 8, "repeats": 2},
}
QUICK_SHARDS = {"steps": 12, "repeats": 1}

WARMUP_PLANS: dict[str, dict[str, Any]] = {
    "digits_cnn": {"settings": (({"keep": 0.05}, 1e-3), ({"keep": 0.05}, 1e-4), ({"keep": 0.02, "min_rank": 2}, 1e-3),
                                ({"width": 0.5}, 1e-3)),
                   "calib": (128, 16), "samples": 2048, "batch": 32, "steps": 150, "eval_every": 5,
                   "warmups": (0, 10, 20, 40), "seeds": (0, 1, 2)},
    "ppocr_rec": {"settings": (({"width": 0.7, "sequential": True, "multiple": 16}, 1e-4),
                               ({"width": 0.7, "sequential": True, "multiple": 16}, 3e-5)), "calib": (128, 16),
                  "samples": 320, "batch": 8, "steps": 30, "eval_every": 5, "warmups": (0, 20), "seeds": (0,)},
}
QUICK_WARMUP = {"settings": (({"keep": 0.05}, 1e-3),), "steps": 40, "warmups": (0, 10), "seeds": (0,)}
EARLY_STEPS = 20
"""The warm-up study's "early" window: the held-out loss's highest value over steps 1..EARLY_STEPS."""


def _closed_form(task, teacher: onnx.ModelProto, calib_feeds, calib: tuple[int, int],
                 budget: dict[str, Any]) -> onnx.ModelProto:
    from onnx_lrsd import compress

    if "width" in budget:
        from onnx_lrsd.passes.prune import PruneOptions, prune_model

        options = PruneOptions(keep=budget["width"], criterion="greedy", multiple=budget.get("multiple", 1),
                               sequential=budget.get("sequential", False), mask_input=task.mask_input, heads=False)
        return prune_model(teacher, calib_feeds, options).model
    return compress(task.model_path, calibration=calib_feeds, calib_samples=calib[0], calib_batch=calib[1],
                    mask_input=task.mask_input, verify=False, **budget).model


def _timed_recovery(closed, teacher, feeds, config):
    """(result, seconds per step (median of the intervals between step callbacks), setup seconds)."""
    from onnx_lrsd.recover import recover

    marks: list[float] = []
    start = time.perf_counter()
    result = recover(closed, teacher, feeds, config, on_step=lambda p: marks.append(time.perf_counter()))
    total = time.perf_counter() - start
    steps = [b - a for a, b in zip(marks, marks[1:])]
    per_step = statistics.median(steps) if steps else float("nan")
    return result, per_step, total - per_step * len(marks), total


def _shards(name: str, workdir: Path, args) -> dict[str, Any]:
    from benchmarks.tasks import get_task
    from onnx_lrsd.recover import RecoverConfig

    plan = dict(SHARD_PLANS[name], **(QUICK_SHARDS if args.quick else {}))
    task = get_task(name)
    task.prepare()
    teacher = onnx.load(str(task.model_path))
    calib_feeds = task.calibration_feeds(*plan["calib"])
    recover_feeds = task.calibration_feeds(plan["samples"], plan["recover"]["batch"])
    closed = _closed_form(task, teacher, calib_feeds, plan["calib"], plan["budget"])
    base = RecoverConfig(steps=plan["steps"], eval_every=plan["steps"], patience=None, threads=THREADS,
                         mask_input=task.mask_input, **plan["recover"])
    configs = {"1 process, 2 threads": base, "pool of 2, 2 shards": base.replace(workers=2),
               "1 process, 2 shards": base.replace(shards=2)}
    order = [c for _ in range(plan["repeats"]) for c in ("1 process, 2 threads", "pool of 2, 2 shards")]
    order.append("1 process, 2 shards")
    runs, models = [], {}
    for label in order:
        gc.collect()
        load = os.getloadavg()
        result, per_step, setup, total = _timed_recovery(closed, teacher, recover_feeds, configs[label])
        models.setdefault(label, result.model)
        LOGGER.info("%s %s: %.3f s/step, setup %.1f s, load %.1f", name, label, per_step, setup, load[0])
        runs.append({"config": label, "per_step_s": per_step, "setup_s": setup, "total_s": total,
                     "steps": result.report.steps, "best_step": result.report.best_step,
                     "loss_before": result.report.loss_before, "loss_end": result.report.curve[-1][1],
                     "error_after": result.report.error_after, "load": list(load)})
    metrics = {}
    for label, model in models.items():
        path = workdir / f"{name}_{label.replace(' ', '_').replace(',', '')}.onnx"
        onnx.save(model, str(path))
        metrics[label] = task.evaluate(path)
        LOGGER.info("%s %s: %s", name, label, metrics[label])
    same = models["pool of 2, 2 shards"].SerializeToString() == models["1 process, 2 shards"].SerializeToString()
    return {"task": name, "study": "shards", "budget": plan["budget"], "samples": plan["samples"],
            "recover": plan["recover"], "steps": plan["steps"], "runs": runs, "metrics": metrics,
            "pool_equals_local_shards": same}


def _warmup(name: str, workdir: Path, args) -> dict[str, Any]:
    from benchmarks.tasks import get_task
    from onnx_lrsd.recover import RecoverConfig, recover

    plan = dict(WARMUP_PLANS[name], **(QUICK_WARMUP if args.quick else {}))
    task = get_task(name)
    task.prepare()
    teacher = onnx.load(str(task.model_path))
    calib_feeds = task.calibration_feeds(*plan["calib"])
    recover_feeds = task.calibration_feeds(plan["samples"], plan["batch"])
    original = task.evaluate(task.model_path)
    rows, closed_forms = [], {}
    path = workdir / f"{name}_model.onnx"
    for budget, lr in plan["settings"]:
        key = str(budget)
        if key not in closed_forms:
            closed = _closed_form(task, teacher, calib_feeds, plan["calib"], budget)
            onnx.save(closed, str(path))
            closed_forms[key] = (closed, task.evaluate(path))
        closed, closed_metrics = closed_forms[key]
        for warmup in plan["warmups"]:
            for seed in plan["seeds"]:
                gc.collect()
                load = os.getloadavg()
                config = RecoverConfig(steps=plan["steps"], eval_every=plan["eval_every"], patience=None,
                                       warmup=warmup, seed=seed, lr=lr, batch=plan["batch"], threads=THREADS,
                                       mask_input=task.mask_input)
                result = recover(closed, teacher, recover_feeds, config)
                onnx.save(result.model, str(path))
                metrics = task.evaluate(path)
                curve = result.report.curve
                start = curve[0][1]
                early = [loss for step, loss in curve if 0 < step <= EARLY_STEPS]
                row = {"budget": budget, "lr": lr, "warmup": warmup, "seed": seed, "curve": curve, "loss_0": start,
                       "early_max_ratio": max(early) / start if early else None,
                       "first_below_start": next((s for s, loss in curve if s > 0 and loss < start), None),
                       "end_ratio": curve[-1][1] / start, "best_ratio": result.report.loss_after / start,
                       "best_step": result.report.best_step, "closed": closed_metrics, "recovered": metrics,
                       "seconds": result.report.seconds, "load": list(load)}
                LOGGER.info("%s %s lr %g warmup %d seed %d: early max x%.3f, end x%.3f, best x%.3f @%d, %s", name,
                            budget, lr, warmup, seed, row["early_max_ratio"] or float("nan"), row["end_ratio"],
                            row["best_ratio"], row["best_step"], metrics)
                rows.append(row)
    return {"task": name, "study": "warmup", "original": original, "batch": plan["batch"], "steps": plan["steps"],
            "eval_every": plan["eval_every"], "samples": plan["samples"], "seeds": list(plan["seeds"]), "rows": rows}


def run_one(name: str, workdir: Path, latency_budget_s: float, blocks: int, args, results_dir: Path) -> dict[str, Any]:
    return (_shards if args.study == "shards" else _warmup)(name, workdir, args)


def _header(data: dict[str, Any]) -> str:
    run = data["run"]
    machine = run["machine"]
    return (f"Commit {run.get('commit')}, started {run.get('started')}. Command: `{run['command']}`. "
            f"{machine.get('cpu', '')}, {machine.get('cores_logical', '')} cores, load at start "
            f"{machine.get('load_average_at_start')}. "
            "The machine was shared with other jobs: times are wall clock under that load (each run's load is "
            "in the JSON).")


def render(data: dict[str, Any]) -> str:
    tasks = data.get("tasks", [])
    study = tasks[0]["study"] if tasks else "shards"
    lines = ["# Recovery: " + ("gradient shards on a process pool" if study == "shards" else "step-size warm-up"),
             "", _header(data), ""]
    for task in tasks:
        lines += [f"## {task['task']}", ""]
        if task["study"] == "shards":
            lines += _render_shards(task)
        else:
            lines += _render_warmup(task)
    return "\n".join(lines) + "\n"


def _render_shards(task: dict[str, Any]) -> list[str]:
    budget = ", ".join(f"{k} {v}" for k, v in task["budget"].items())
    rows = [[r["config"], fmt(r["per_step_s"], 3), fmt(r["setup_s"], 1), f"{r['load'][0]:.1f}",
             f"{fmt(r['loss_before'], 4)} → {fmt(r['loss_end'], 4)}"] for r in task["runs"]]
    by = {}
    for r in task["runs"]:
        by.setdefault(r["config"], []).append(r["per_step_s"])
    one, pool = statistics.median(by["1 process, 2 threads"]), statistics.median(by["pool of 2, 2 shards"])
    metric_rows = [[label, *(fmt(v, 4) for v in m.values())] for label, m in task["metrics"].items()]
    names = list(next(iter(task["metrics"].values())))
    return [f"Closed form {budget}; recovery of {task['steps']} Adam steps, batch {task['recover']['batch']}, "
            f"lr {task['recover']['lr']:g}, {task['samples']} samples, end-to-end.", "",
            markdown_table(["configuration", "s / step", "setup s", "load (1 min)", "held-out loss step 0 → end"],
                           rows), "",
            f"- Median time per step: 1 process {fmt(one, 3)} s, pool of 2 {fmt(pool, 3)} s: the pool takes "
            f"{fmt(pool / one, 2)}× the time of one process per step (runs of one configuration spread over "
            f"{fmt(min(by['1 process, 2 threads']), 3)}–{fmt(max(by['1 process, 2 threads']), 3)} s and "
            f"{fmt(min(by['pool of 2, 2 shards']), 3)}–{fmt(max(by['pool of 2, 2 shards']), 3)} s under the load shown).",
            f"- The pool's model is byte-identical to the same 2 shards run in one process: "
            f"{'yes' if task['pool_equals_local_shards'] else 'NO'}.", "",
            markdown_table(["configuration", *names], metric_rows), ""]


def _render_warmup(task: dict[str, Any]) -> list[str]:
    metric_names = list(task["original"])
    groups: dict[tuple, list] = {}
    for r in task["rows"]:
        groups.setdefault((", ".join(f"{k} {v}" for k, v in r["budget"].items()), r["lr"], r["warmup"]), []).append(r)
    med = lambda rs, f: statistics.median(f(r) for r in rs)  # noqa: E731
    rows = [[budget, f"{lr:g}", warmup, fmt(med(rs, lambda r: r["early_max_ratio"]), 3),
             " / ".join(str(r["first_below_start"]) if r["first_below_start"] is not None else "never" for r in rs),
             fmt(med(rs, lambda r: r["end_ratio"]), 3), fmt(med(rs, lambda r: r["best_ratio"]), 3),
             *(fmt(med(rs, lambda r: r["recovered"][m]), 4) for m in metric_names),
             *(fmt(rs[0]["closed"][m], 4) for m in metric_names)]
            for (budget, lr, warmup), rs in groups.items()]
    curves = [f"- {', '.join(f'{k} {v}' for k, v in r['budget'].items())}, lr {r['lr']:g}, warm-up {r['warmup']}, "
              f"seed {r['seed']}: " + ", ".join(f"{s}: {loss:.4g}" for s, loss in r["curve"]) for r in task["rows"]]
    return [f"End-to-end recovery, {task['steps']} steps, batch {task['batch']}, cosine schedule, held-out loss every "
            f"{task['eval_every']} steps, {task['samples']} samples (a fifth held out), seeds {task['seeds']} "
            f"(medians over them; 'first below' per seed). Original: "
            f"{', '.join(f'{k} {fmt(v, 4)}' for k, v in task['original'].items())}. Losses are ratios to the "
            f"step-0 held-out loss; 'early max' is the highest over steps 1..{EARLY_STEPS}; 'best' is the step kept.",
            "", markdown_table(["budget", "lr", "warm-up", "early max ×", "first step below step 0", "end ×", "best ×",
                                *[f"{m} recovered" for m in metric_names], *[f"{m} closed" for m in metric_names]],
                               rows), "", "Held-out curves (step: loss):", "", *curves, ""]


def readme_sections(data: dict[str, Any]) -> dict[str, str]:
    """The README section of a full run: ``recovery_shards`` or ``recovery_warmup`` (its tables,
    without the curves)."""
    tasks = data.get("tasks", [])
    study = tasks[0]["study"] if tasks else "shards"
    parts = []
    for task in tasks:
        body = _render_shards(task) if study == "shards" else _render_warmup(task)
        if study == "warmup":
            body = body[:body.index("Held-out curves (step: loss):")]
        parts += [f"**{task['task']}**", "", *body]
    name = "recovery_shards" if study == "shards" else "recovery_warmup"
    parts.append(f"Full results: `benchmarks/results/{name}.md`.")
    return {name: "\n".join(parts)}


def _extra_args(parser) -> None:
    parser.add_argument("--study", choices=("shards", "warmup"), default="shards",
                        help="gradient shards on a process pool vs one process, or the step-size warm-up")


def main(argv: list[str] | None = None) -> None:
    benchmark_main(argv, __doc__, {**SHARD_PLANS, **WARMUP_PLANS}, "recovery_scale", run_one, render,
                   extra_args=_extra_args)


if __name__ == "__main__":
    main()
