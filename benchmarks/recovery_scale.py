"""Recovery's cost and schedule: gradient shards on a process pool, the step-size warm-up, and
the scale of Adam's step.

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

``--study step``: plain Adam's step (every weight moves by about lr, "absolute") against a step
relative to each tensor's RMS at the start (``RecoverConfig.step_scale="relative"``) at several
step sizes, on the cases where the held-out loss rose over the first steps: the digit CNN at
keep 0.05 and narrowed to width 0.5 (end-to-end), and PP-OCRv4 rec narrowed to width 0.7
(block-wise, where a block's loss went up within 10 steps and patience kept nothing). Runs go
to the end of the budget; the early-stopping rule (``patience`` from the first evaluation, or not
before ``MIN_EVALS`` evaluations) is replayed on their curves. Reports the held-out curves (every
block's), the task metrics of the best step on the test split, and the steps.

Run: ``python -m benchmarks.recovery_scale --study shards [--tasks digits_cnn ppocr_rec]``
(``--output benchmarks/results/recovery_shards``), ``--study warmup`` (``--output
benchmarks/results/recovery_warmup``) and ``--study step`` (``--output
benchmarks/results/recovery_step``); ``--quick``: the digit CNN only, fewer steps. The machine
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

from benchmarks.common import benchmark_main, fmt, markdown_table, results_header
from onnx_lrsd.recover.types import MIN_EVALS

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

STEP_PLANS: dict[str, dict[str, Any]] = {
    "digits_cnn": {"cases": (({"keep": 0.05}, "end-to-end"), ({"width": 0.5}, "end-to-end")),
                   "variants": (("absolute", 1e-3), ("absolute", 1e-4), ("relative", 1e-3), ("relative", 3e-3),
                                ("relative", 1e-2), ("relative", 3e-2)),
                   "calib": (128, 16), "samples": 2048, "batch": 32, "steps": 200, "eval_every": 10,
                   "seeds": (0, 1, 2)},
    "ppocr_rec": {"cases": (({"width": 0.7, "sequential": True, "multiple": 16}, "blocks"),),
                  "variants": (("absolute", 1e-4), ("absolute", 3e-5), ("relative", 1e-3), ("relative", 3e-3),
                               ("relative", 1e-2)),
                  "calib": (128, 16), "samples": 160, "batch": 8, "steps": 40, "eval_every": 4, "seeds": (0,)},
}
QUICK_STEP = {"cases": (({"width": 0.5}, "end-to-end"), ({"width": 0.5}, "blocks")),
              "variants": (("absolute", 1e-3), ("relative", 1e-2)), "steps": 40, "seeds": (0,)}
PATIENCE = 5
"""The step study's early-stopping rule replayed on each full curve: `PATIENCE` evaluations
without a new best (`RecoverConfig.patience`'s default), counted from the first evaluation or only
after `MIN_EVALS` evaluations (`RecoverConfig.min_evals`'s default)."""


class _Setup:
    """A study's task, its original model, the calibration feeds of the closed forms and of the
    recovery, and the closed forms built so far (one per budget, with their task metrics)."""

    def __init__(self, name: str, calib: tuple[int, int], samples: int, batch: int):
        from benchmarks.tasks import get_task

        self.task = get_task(name)
        self.task.prepare()
        self.teacher = onnx.load(str(self.task.model_path))
        self.calib = calib
        self.calib_feeds = self.task.calibration_feeds(*calib)
        self.recover_feeds = self.task.calibration_feeds(samples, batch)
        self._closed: dict[str, tuple[onnx.ModelProto, Any]] = {}

    def closed_form(self, budget: dict[str, Any]) -> onnx.ModelProto:
        return _closed_form(self.task, self.teacher, self.calib_feeds, self.calib, budget)

    def evaluated_closed_form(self, budget: dict[str, Any], path: Path) -> tuple[onnx.ModelProto, dict[str, float]]:
        """(closed form of `budget`, its task metrics on the test split), built once per budget."""
        key = str(budget)
        if key not in self._closed:
            closed = self.closed_form(budget)
            onnx.save(closed, str(path))
            self._closed[key] = (closed, self.task.evaluate(path))
        return self._closed[key]


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
    from onnx_lrsd.recover import RecoverConfig

    plan = dict(SHARD_PLANS[name], **(QUICK_SHARDS if args.quick else {}))
    setup = _Setup(name, plan["calib"], plan["samples"], plan["recover"]["batch"])
    task, teacher, recover_feeds = setup.task, setup.teacher, setup.recover_feeds
    closed = setup.closed_form(plan["budget"])
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
    from onnx_lrsd.recover import RecoverConfig, recover

    plan = dict(WARMUP_PLANS[name], **(QUICK_WARMUP if args.quick else {}))
    setup = _Setup(name, plan["calib"], plan["samples"], plan["batch"])
    task, teacher, recover_feeds = setup.task, setup.teacher, setup.recover_feeds
    original = task.evaluate(task.model_path)
    rows = []
    path = workdir / f"{name}_model.onnx"
    for budget, lr in plan["settings"]:
        closed, closed_metrics = setup.evaluated_closed_form(budget, path)
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


def replay_patience(curve, patience: int, min_evals: int = 0) -> tuple[int, int, float]:
    """(step at which `adam_loop` would stop, best step kept, its loss) on a held-out `curve`
    [(step, loss), ...] from step 0, had it run with `patience` and not stopped before `min_evals`
    evaluations."""
    best_loss, best_step, stale = curve[0][1], curve[0][0], 0
    for count, (step, loss) in enumerate(curve[1:], 1):
        if loss < best_loss:
            best_loss, best_step, stale = loss, step, 0
        else:
            stale += 1
        if stale >= patience and count >= min_evals:
            return step, best_step, best_loss
    return curve[-1][0], best_step, best_loss


class _BlockCurves(logging.Handler):
    """The held-out curve of each block of a block-wise run: its step-0 loss from the block's log
    line, its evaluations from the step callback (steps restart at 1 in every block)."""

    def __init__(self):
        super().__init__()
        self.curves: list[list[tuple[int, float]]] = []
        self.starts: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("block %d/%d"):
            self.starts.append(float(record.args[5]))

    def on_step(self, progress) -> None:
        if progress.step == 1:
            self.curves.append([])
        if progress.heldout_loss is not None:
            self.curves[-1].append((progress.step, progress.heldout_loss))

    def block_curves(self) -> list[list[tuple[int, float]]]:
        return [[(0, start)] + curve for start, curve in zip(self.starts, self.curves)]


def _curve_row(curve) -> dict[str, Any]:
    start = curve[0][1]
    early = [loss for step, loss in curve if 0 < step <= EARLY_STEPS]
    stop, kept, kept_loss = replay_patience(curve, PATIENCE)
    stop_min, kept_min, kept_min_loss = replay_patience(curve, PATIENCE, MIN_EVALS)
    return {"curve": curve, "early_max_ratio": max(early) / start if early else None,
            "first_below_start": next((s for s, loss in curve if s > 0 and loss < start), None),
            "end_ratio": curve[-1][1] / start, "best_ratio": min(loss for _, loss in curve) / start,
            "patience": {"stop": stop, "kept": kept, "ratio": kept_loss / start},
            "patience_min_evals": {"stop": stop_min, "kept": kept_min, "ratio": kept_min_loss / start}}


def _step(name: str, workdir: Path, args) -> dict[str, Any]:
    from onnx_lrsd.recover import RecoverConfig, recover

    plan = dict(STEP_PLANS[name], **(QUICK_STEP if args.quick else {}))
    setup = _Setup(name, plan["calib"], plan["samples"], plan["batch"])
    task = setup.task
    original = task.evaluate(task.model_path)
    rows = []
    path = workdir / f"{name}_model.onnx"
    blocks_log = logging.getLogger("onnx_lrsd.recover.blockwise")
    for budget, level in plan["cases"]:
        closed, closed_metrics = setup.evaluated_closed_form(budget, path)
        for step_scale, lr in plan["variants"]:
            for seed in plan["seeds"]:
                gc.collect()
                load = os.getloadavg()
                config = RecoverConfig(steps=plan["steps"], eval_every=plan["eval_every"], patience=None, lr=lr,
                                       step_scale=step_scale, level=level, seed=seed, batch=plan["batch"],
                                       threads=THREADS, mask_input=task.mask_input)
                recorder = _BlockCurves()
                blocks_log.addHandler(recorder)
                level_before = blocks_log.level
                blocks_log.setLevel(logging.INFO)
                try:
                    result = recover(closed, setup.teacher, setup.recover_feeds, config, on_step=recorder.on_step)
                finally:
                    blocks_log.removeHandler(recorder)
                    blocks_log.setLevel(level_before)
                onnx.save(result.model, str(path))
                metrics = task.evaluate(path)
                curves = [result.report.curve] if level == "end-to-end" else recorder.block_curves()
                row = {"budget": budget, "level": level, "step_scale": step_scale, "lr": lr, "seed": seed,
                       "steps": result.report.steps, "curves": [_curve_row(c) for c in curves],
                       "closed": closed_metrics, "recovered": metrics, "seconds": result.report.seconds,
                       "load": list(load)}
                LOGGER.info("%s %s %s %s lr %g seed %d: early max %s, best %s, %s (closed %s)", name, budget, level,
                            step_scale, lr, seed, [fmt(c["early_max_ratio"], 3) for c in row["curves"]],
                            [fmt(c["best_ratio"], 3) for c in row["curves"]], metrics, closed_metrics)
                rows.append(row)
    return {"task": name, "study": "step", "original": original, "batch": plan["batch"], "steps": plan["steps"],
            "eval_every": plan["eval_every"], "samples": plan["samples"], "seeds": list(plan["seeds"]), "rows": rows}


STUDIES = {"shards": _shards, "warmup": _warmup, "step": _step}


def run_one(name: str, workdir: Path, latency_budget_s: float, blocks: int, args, results_dir: Path) -> dict[str, Any]:
    return STUDIES[args.study](name, workdir, args)


def _header(data: dict[str, Any]) -> str:
    run = data["run"]
    machine = run["machine"]
    return (f"Commit {run.get('commit')}, started {run.get('started')}. Command: `{run['command']}`. "
            f"{machine.get('cpu', '')}, {machine.get('cores_logical', '')} cores, load at start "
            f"{machine.get('load_average_at_start')}. "
            "The machine was shared with other jobs: times are wall clock under that load (each run's load is "
            "in the JSON).")


TITLES = {"shards": "gradient shards on a process pool", "warmup": "step-size warm-up",
          "step": "absolute vs relative Adam steps"}
CURVES_HEADING = "Held-out curves (step: loss):"


def render(data: dict[str, Any]) -> str:
    tasks = data.get("tasks", [])
    study = tasks[0]["study"] if tasks else "shards"
    header = results_header(data, f"Recovery: {TITLES[study]}", "benchmarks.recovery_scale", STEP_NOTE) \
        if study == "step" else ["# Recovery: " + TITLES[study], "", _header(data), ""]
    lines = list(header)
    for task in tasks:
        lines += [f"## {task['task']}", "", *RENDERERS[task["study"]](task)]
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
                               rows), "", CURVES_HEADING, "", *curves, ""]


STEP_NOTE = ("held-out losses and task metrics only, no latency, so the machine's load (recorded per run in the "
             "JSON) does not bias them; seconds are wall clock under that load.")


def _render_step(task: dict[str, Any]) -> list[str]:
    metric_names = list(task["original"])
    groups: dict[tuple, list] = {}
    for r in task["rows"]:
        key = (", ".join(f"{k} {v}" for k, v in r["budget"].items()), r["level"], r["step_scale"], r["lr"])
        groups.setdefault(key, []).append(r)
    med = lambda values: statistics.median(values)  # noqa: E731

    def summed(rows, pick):  # Σ over a run's curves (blocks) of pick(curve) / Σ of their step-0 losses
        return med([sum(pick(c) * c["curve"][0][1] for c in r["curves"]) / sum(c["curve"][0][1] for c in r["curves"])
                    for r in rows])

    def count(rows, test):
        return f"{sum(test(c) for r in rows for c in r['curves'])}/{sum(len(r['curves']) for r in rows)}"

    table = [[budget, level, scale, f"{lr:g}", fmt(med([max(c["early_max_ratio"] or 0 for c in r["curves"])
                                                          for r in rs]), 3),
              count(rs, lambda c: (c["early_max_ratio"] or 0) > 1), fmt(summed(rs, lambda c: c["end_ratio"]), 3),
              fmt(summed(rs, lambda c: c["best_ratio"]), 3),
              count(rs, lambda c: c["patience"]["kept"] == 0), fmt(summed(rs, lambda c: c["patience"]["ratio"]), 3),
              count(rs, lambda c: c["patience_min_evals"]["kept"] == 0),
              fmt(summed(rs, lambda c: c["patience_min_evals"]["ratio"]), 3),
              *(fmt(med([r["recovered"][m] for r in rs]), 4) for m in metric_names),
              *(fmt(rs[0]["closed"][m], 4) for m in metric_names), fmt(med([r["seconds"] for r in rs]), 0)]
             for (budget, level, scale, lr), rs in groups.items()]
    curves = []
    for r in task["rows"]:
        head = (f"{', '.join(f'{k} {v}' for k, v in r['budget'].items())}, {r['level']}, {r['step_scale']}, "
                f"lr {r['lr']:g}, seed {r['seed']}")
        for number, c in enumerate(r["curves"], 1):
            where = f" block {number}" if len(r["curves"]) > 1 else ""
            curves.append(f"- {head}{where}: " + ", ".join(f"{s}: {loss:.4g}" for s, loss in c["curve"]))
    return [f"{task['steps']} steps (block-wise: shared equally by the blocks), batch {task['batch']}, cosine schedule, "
            f"no warm-up, held-out loss every {task['eval_every']} steps with no early stop, {task['samples']} "
            f"samples (a fifth held out), seeds {task['seeds']} (medians over them). Original: "
            f"{', '.join(f'{k} {fmt(v, 4)}' for k, v in task['original'].items())}. Step: absolute = plain Adam "
            "(every weight moves by about lr), relative = lr times the tensor's RMS at the start (floored at a tenth "
            "of the trained tensors' mean RMS). Losses are ratios to the step-0 held-out loss (block-wise: sums "
            f"over the blocks); 'early max' is the highest over steps 1..{EARLY_STEPS} (the largest over blocks), "
            "'rose' counts the curves (runs × blocks) that went above their step-0 loss there. 'patience' replays "
            f"`patience={PATIENCE}` on each curve: curves that would stop keeping nothing (step 0), and the loss kept; "
            f"'after {MIN_EVALS} evals' replays the same rule not stopping before {MIN_EVALS} evaluations. The task "
            "metrics are of the best held-out step of the full run, on the test split.", "",
            markdown_table(["budget", "level", "step", "lr", "early max ×", "rose", "end ×", "best ×",
                            f"patience {PATIENCE}: kept nothing", "kept ×", f"after {MIN_EVALS} evals: kept nothing",
                            "kept ×", *[f"{m} recovered" for m in metric_names],
                            *[f"{m} closed" for m in metric_names], "s"], table),
            "", CURVES_HEADING, "", *curves, ""]


RENDERERS = {"shards": _render_shards, "warmup": _render_warmup, "step": _render_step}


def readme_sections(data: dict[str, Any]) -> dict[str, str]:
    """The README section of a full run: ``recovery_shards``, ``recovery_warmup`` or
    ``recovery_step`` (its tables, without the curves)."""
    tasks = data.get("tasks", [])
    study = tasks[0]["study"] if tasks else "shards"
    parts = []
    for task in tasks:
        body = RENDERERS[study](task)
        if CURVES_HEADING in body:
            body = body[:body.index(CURVES_HEADING)]
        parts += [f"**{task['task']}**", "", *body]
    name = f"recovery_{study}"
    parts.append(f"Full results: `benchmarks/results/{name}.md`.")
    return {name: "\n".join(parts)}


def _extra_args(parser) -> None:
    parser.add_argument("--study", choices=tuple(STUDIES), default="shards",
                        help="gradient shards on a process pool vs one process, the step-size warm-up, or absolute "
                             "vs relative Adam steps")


def main(argv: list[str] | None = None) -> None:
    benchmark_main(argv, __doc__, {**SHARD_PLANS, **WARMUP_PLANS, **STEP_PLANS}, "recovery_scale", run_one, render,
                   extra_args=_extra_args)


if __name__ == "__main__":
    main()
