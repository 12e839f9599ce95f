"""Width reduction on a mobile net with depthwise convs, squeeze-excitation and residual Adds,
against low rank at the same MACs; and where channel groups are blocked, and why.

Run from the repository root::

    python -m benchmarks.width_mobile                      # PP-OCR direction classifier + ResNet-50 (zoo)
    python -m benchmarks.width_mobile --tasks ppocr_cls    # the classifier only (~5 min on 2 shared cores)
    python -m benchmarks.width_mobile --quick              # the classifier at one width, short timings
    python -m benchmarks.width_mobile --render-only        # rewrite the Markdown from the JSON

``ppocr_cls`` (``benchmarks/tasks/ocr_cls.py``): RapidOCR's trained text-direction classifier
(MobileNetV3-small style: depthwise convs, squeeze-excitation with hard-sigmoid gates,
hard-swish, residual Adds, a flatten into the classifier), on rendered text lines in both
directions; metrics ``acc`` / ``acc_hard`` (direction accuracy on clean / small noisy print) and
``agree`` / ``agree_hard`` (same answer as the original). Calibration: 128 lines of another
vocabulary and seed (``task.calibration_feeds``), disjoint from the evaluation lines.

- ``width greedy K``: ``prune_model`` keeps K of every coupled channel group's channels (widths
  of groups of 16 or more rounded to multiples of `MULTIPLE`), chosen by greedy reconstruction
  of the readers' outputs, readers refitted by least squares with an intercept. A residual
  chain (the producers of every operand of an Add chain and the readers of the chain) is one
  group. ``width energy`` / ``nystrom`` K: other channel choices; ``cut`` K: no refit;
  ``width greedy sequential K``: groups narrowed in graph order, each refitted on the inputs the
  partly narrowed model gives it.
- ``width allocated, MACs of greedy K``: per-group widths for the MACs of ``width greedy K``
  (``PruneOptions(target_macs=...)``: error curves, each group's sensitivity probed in onnxruntime);
- ``low rank, MACs of width K``: ``onnx_lrsd.compress(target_macs=M)`` (the global low-rank
  allocation, data-aware, independent), M the MACs ratio of ``width greedy K``; where low rank
  cannot reach M, the row says so and one more row gives low rank at its own smallest MACs.

All models are timed together, interleaved with the original (``time_against_original``: 2
threads, spinning off, block medians) at batch 1 and 32; output error: relative L2 of the
output (class probabilities) on the batch-32 timing input (evaluation lines).

``resnet50_zoo``: the onnx wheel's ResNet-50 graph with seeded random weights
(``onnx_lrsd.testing.zoo``; batch fixed at 1 by the graph), for its groups and latency only: every
bottleneck stage's residual stream is one group reaching through the pooled flatten into the
classifier. Width models keep K of every group's channels chosen by activation energy (the
greedy choice over the 2048-channel stage costs minutes), refitted on 8 Gaussian inputs; output
error of the centred log-probabilities (the logits up to their mean) on 4 others; latency at
batch 1.

Results: ``benchmarks/results/width_mobile.{json,md}``. The machine is shared with other jobs:
latency is only reported as interleaved ratios.
"""
from __future__ import annotations

import logging
import re
import time
from types import SimpleNamespace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import benchmark_main, fmt, markdown_table, results_header, time_against_original

LOGGER = logging.getLogger("benchmarks.width_mobile")

THREADS = 2
MULTIPLE = 8
TASK_NAMES = ("ppocr_cls", "resnet50_zoo")
KEEPS = (0.9, 0.75, 0.6, 0.5)
QUICK_KEEPS = (0.75,)
COMPARE_KEEP = 0.6  # energy / nystrom / cut / sequential beside greedy at this keep
CALIBRATION = (128, 16)  # lines, batch
ZOO_KEEPS = (0.75, 0.5)
METRICS = {"ppocr_cls": ("acc", "acc_hard", "agree", "agree_hard"), "resnet50_zoo": ()}


def _group_summary(groups, blocked) -> dict[str, Any]:
    return {"groups": [{"name": g.name, "kind": "heads" if g.block > 1 else "channels", "channels": g.channels,
                        "producers": list(g.producers), "consumers": list(g.consumers),
                        "depthwise": list(g.depthwise), "residual_adds": list(g.residual_adds)} for g in groups],
            "blocked": [{"name": b.name, "channels": b.channels, "producers": list(b.producers), "reason": b.reason}
                        for b in blocked]}


def _prune(model, feeds, stats, orders, keep, criterion, path: Path, **options) -> dict[str, Any]:
    from onnx_lrsd.model.io import save_model
    from onnx_lrsd.passes.prune import PruneOptions, prune_model

    start = time.perf_counter()
    result = prune_model(model, feeds, PruneOptions(keep=keep, criterion=criterion, multiple=MULTIPLE, **options),
                         stats=stats, orders=orders)
    save_model(result.model, path)
    return {"path": path, "seconds": time.perf_counter() - start,
            "widths": {p.group.name: [p.width, p.group.channels] for p in result.plans}}


def _evaluate(rows, original: Path, error_feeds: list[dict], evaluate=None, view=lambda y: y) -> None:
    """Params, MACs, output error (relative L2 of `view(output)` over `error_feeds`) and task
    metrics of every row."""
    from benchmarks.tasks.base import make_session
    from benchmarks.width import _model_stats

    base = _model_stats(original)
    reference = make_session(original)
    want = [view(reference.run(None, f)[0].astype(np.float64)) for f in error_feeds]
    for r in rows:
        if "path" not in r:
            continue
        LOGGER.info("evaluating %s", r["label"])
        stats = _model_stats(r["path"])
        session = make_session(r["path"])
        got = [view(session.run(None, f)[0].astype(np.float64)) for f in error_feeds]
        error = np.sqrt(sum(np.sum((g - w) ** 2) for g, w in zip(got, want)) / sum(np.sum(w ** 2) for w in want))
        r.update(params_ratio=stats["params"] / base["params"], macs_ratio=stats["macs"] / base["macs"],
                 file_mb=stats["file_mb"], output_error=float(error),
                 metrics=evaluate(r["path"]) if evaluate is not None else {})
        r["path"] = str(r["path"])


def _time(rows, original: Path, feeds_by_batch: dict[int, dict], budget_s: float, blocks: int, out: dict) -> None:
    timed = [r for r in rows if "path" in r and r.get("timed", True)]
    LOGGER.info("timing %d models", len(timed))
    for batch, feeds in feeds_by_batch.items():
        latency = time_against_original(original, [r["path"] for r in timed], feeds, threads=THREADS,
                                        budget_s=budget_s, blocks=blocks)
        out[f"latency_b{batch}"] = latency.to_dict()
        for r, ratio in zip(timed, latency.ratios):
            r[f"latency_b{batch}"] = ratio


def run_cls(workdir: Path, budget_s: float, blocks: int, quick: bool) -> dict[str, Any]:
    from benchmarks.tasks import get_task
    from benchmarks.width import _low_rank, _model_stats
    from onnx_lrsd.model.io import load_model
    from onnx_lrsd.passes.prune import channel_groups, channel_orders, group_statistics

    task = get_task("ppocr_cls")
    task.prepare()
    original = Path(task.model_path)
    model = load_model(original)
    samples, batch = CALIBRATION
    feeds = task.calibration_feeds(samples, batch)
    start = time.perf_counter()
    groups, blocked = channel_groups(model)
    stats = group_statistics(model, groups, feeds)
    out: dict[str, Any] = {"task": "ppocr_cls", "calibration": {"samples": samples, "batch": batch},
                           "stats_s": time.perf_counter() - start, **_group_summary(groups, blocked)}
    criteria = ("greedy",) if quick else ("greedy", "nystrom", "energy")
    orders = {c: channel_orders(groups, stats, c) for c in criteria}
    keeps = QUICK_KEEPS if quick else KEEPS
    rows: list[dict[str, Any]] = [{"label": "original", "kind": "original", "path": original}]
    for keep in keeps:
        rows.append({"label": f"width greedy {keep}", "kind": "width", "criterion": "greedy", "keep": keep,
                     **_prune(model, feeds, stats, orders["greedy"], keep, "greedy", workdir / f"greedy_{keep}.onnx")})
        if quick or keep != COMPARE_KEEP:
            continue
        for criterion in criteria[1:]:
            rows.append({"label": f"width {criterion} {keep}", "kind": "width", "criterion": criterion, "keep": keep,
                         "timed": False, **_prune(model, feeds, stats, orders[criterion], keep, criterion,
                                                  workdir / f"{criterion}_{keep}.onnx")})
        rows.append({"label": f"cut greedy {keep}", "kind": "cut", "criterion": "greedy", "keep": keep, "timed": False,
                     **_prune(model, feeds, stats, orders["greedy"], keep, "greedy", workdir / f"cut_{keep}.onnx",
                              refit=False)})
        rows.append({"label": f"width greedy sequential {keep}", "kind": "width sequential", "criterion": "greedy",
                     "keep": keep, **_prune(model, feeds, None, None, keep, "greedy",
                                            workdir / f"sequential_{keep}.onnx", sequential=True)})
    base_macs = _model_stats(original)["macs"]
    settings = SimpleNamespace(samples=samples, batch=batch)
    for keep in keeps:
        width = next(r for r in rows if r["kind"] == "width" and r.get("criterion") == "greedy" and r["keep"] == keep)
        macs = _model_stats(width["path"])["macs"] / base_macs
        if not quick:
            rows.append({"label": f"width allocated, MACs of greedy {keep}", "kind": "width allocated",
                         "criterion": "greedy", "keep": keep, "target_macs": macs,
                         **_prune(model, feeds, stats, orders["greedy"], 1.0, "greedy",
                                  workdir / f"allocated_{keep}.onnx", target_macs=macs)})
        label = f"low rank, MACs of width {keep}"
        try:
            rows.append({"label": label, "kind": "low rank", "keep": keep,
                         **_low_rank(original, feeds, settings, None, macs, workdir / f"lowrank_{keep}.onnx")})
        except Exception as exc:  # a failure is a result too
            LOGGER.warning("%s failed: %s", label, exc)
            rows.append({"label": label, "kind": "low rank", "keep": keep, "target_macs": macs, "error": str(exc)})
            floor = re.search(r"smallest allocation keeps ([0-9.]+)", str(exc))
            if floor and not any(r["kind"] == "low rank floor" for r in rows):
                target = min(float(floor.group(1)) + 0.01, 0.99)
                rows.append({"label": f"low rank, its smallest MACs ({target:.2f} asked)", "kind": "low rank floor",
                             **_low_rank(original, feeds, settings, None, target, workdir / "lowrank_floor.onnx")})
    _time(rows[1:], original, {b: task.latency_feeds(b) for b in (1, 32)}, budget_s, blocks, out)
    rows[0].update(latency_b1=1.0, latency_b32=1.0)
    _evaluate(rows, original, [task.latency_feeds(32)], task.evaluate)
    out["rows"] = rows
    return out


def run_zoo(workdir: Path, budget_s: float, blocks: int) -> dict[str, Any]:
    import onnx

    from onnx_lrsd.passes.prune import channel_groups, channel_orders, group_statistics
    from onnx_lrsd.testing.zoo import zoo_model

    model = zoo_model("resnet50", seed=0)
    original = workdir / "resnet50_zoo.onnx"
    onnx.save(model, str(original))
    name = model.graph.input[0].name
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(7)
    feeds = [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(8)]
    check = [{name: np.random.default_rng([8, i]).standard_normal(shape).astype(np.float32)} for i in range(4)]
    start = time.perf_counter()
    groups, blocked = channel_groups(model)
    stats = group_statistics(model, groups, feeds, max_positions=1024)
    orders = channel_orders(groups, stats, "energy")
    out: dict[str, Any] = {"task": "resnet50_zoo", "stats_s": time.perf_counter() - start,
                           **_group_summary(groups, blocked)}
    rows: list[dict[str, Any]] = [{"label": "original", "kind": "original", "path": original}]
    for keep in ZOO_KEEPS:
        rows.append({"label": f"width energy {keep}", "kind": "width", "criterion": "energy", "keep": keep,
                     **_prune(model, feeds, stats, orders, keep, "energy", workdir / f"resnet_{keep}.onnx")})
    _time(rows[1:], original, {1: check[0]}, budget_s, blocks, out)
    rows[0].update(latency_b1=1.0)
    _evaluate(rows, original, check, view=_centered_log)
    out["rows"] = rows
    return out


def _centered_log(probabilities: np.ndarray) -> np.ndarray:
    """log p − mean log p per row: the logits up to their mean (the probabilities of random
    weights are near uniform, their own error says little)."""
    log = np.log(np.maximum(probabilities, 1e-30))
    return log - log.mean(axis=-1, keepdims=True)


def run_one(name: str, workdir: Path, budget_s: float, blocks: int, args, results_dir: Path) -> dict[str, Any]:
    if name == "resnet50_zoo":
        return run_zoo(workdir, budget_s, blocks)
    return run_cls(workdir, budget_s, blocks, args.quick)


# ----------------------------------------------------------------------------------- rendering
def _reason_kind(reason: str) -> str:
    """What blocked a group: the op (or the residual Add) the reason starts with."""
    if reason.startswith("residual Add"):
        return "residual Add: " + _reason_kind(reason.split(" joins a branch where ", 1)[-1])
    return reason.split("'")[0].strip() or reason


def _rows_table(t: dict[str, Any]) -> str:
    metrics = METRICS[t["task"]]
    headers = ["configuration", *([" / ".join(metrics)] if metrics else []), "output error", "params", "MACs",
               "latency b1 / b32"]
    rows = []
    for r in t["rows"]:
        if "error" in r:
            rows.append([r["label"], *([""] if metrics else []), f"failed: {r['error'][:100]}", "", "", ""])
            continue
        m = r.get("metrics", {})
        latency = " / ".join(fmt(r.get(f"latency_b{b}"), 2) or "–" for b in (1, 32)) \
            if any(f"latency_b{b}" in r for b in (1, 32)) else ""
        rows.append([r["label"], *([" / ".join(fmt(m.get(k)) for k in metrics)] if metrics else []),
                     fmt(r.get("output_error"), 3), fmt(r.get("params_ratio")), fmt(r.get("macs_ratio")), latency])
    return markdown_table(headers, rows, "l" + ("l" if metrics else "") + "rrrr")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _groups_text(t: dict[str, Any]) -> list[str]:
    groups = t["groups"]
    residual = [g for g in groups if g["residual_adds"]]
    lines = [f"{len(groups)} coupled channel groups ({sum(bool(g['depthwise']) for g in groups)} through depthwise "
             f"convs, {sum(len(g['producers']) > 1 and not g['residual_adds'] for g in groups)} with a "
             f"squeeze-excitation or gating producer, {len(residual)} residual chains joined into one group each: "
             + "; ".join(f"{g['name']} {g['channels']} channels, {len(g['producers'])} producers, "
                         f"{len(g['consumers'])} readers, {_count(len(g['residual_adds']), 'Add')}" for g in residual[:6])
             + ("; …" if len(residual) > 6 else "") + f"); {len(t['blocked'])} blocked:"]
    reasons: dict[str, list[dict]] = {}
    for b in t["blocked"]:
        reasons.setdefault(_reason_kind(b["reason"]), []).append(b)
    table = [[kind, len(items), ", ".join(f"{b['name']} ({b['channels']})" for b in items[:3]), items[0]["reason"]]
             for kind, items in sorted(reasons.items())]
    if table:
        lines.append(markdown_table(["blocked by", "groups", "first producers (channels)", "reason (first)"], table))
    return lines


def render(data: dict[str, Any]) -> str:
    lines = results_header(data, "Width reduction on a mobile net (depthwise, squeeze-excitation, residual Adds) "
                           "against low rank", "benchmarks.width_mobile")
    for t in data["tasks"]:
        lines += [f"## {t['task']}", "", _rows_table(t), ""]
        if "stats_s" in t:
            lines += [f"Statistics {t['stats_s']:.0f} s.", ""]
        lines += ["\n\n".join(_groups_text(t)), ""]
    return "\n".join(lines)


def readme_sections(data: dict[str, Any]) -> dict[str, str]:
    """``width_mobile``: per model every configuration's metrics, output error, params, MACs and
    latency, the coupled groups (residual chains joined) and the blocked ones with the reason."""
    parts = []
    for t in data["tasks"]:
        metrics = METRICS[t["task"]]
        title = {"ppocr_cls": "PP-OCR text-direction classifier", "resnet50_zoo":
                 "ResNet-50 graph, seeded random weights (groups and latency only)"}[t["task"]]
        parts += [f"**{t['task']}** — {title}" + (f" ({', '.join(metrics)}):" if metrics else ":"), _rows_table(t),
                  *_groups_text(t)]
    parts.append("Width rows keep that share of every coupled group's channels (criterion named, readers refitted by "
                 "least squares; `cut`: no refit); low rank rows are `compress(target_macs=...)` at the MACs of the "
                 "width model named; what each row is: `benchmarks/width_mobile.py`. `acc`: direction accuracy "
                 "(0° / 180°) on clean lines, `acc_hard` on small noisy print; `agree`: same answer as the original. "
                 "Output error: relative L2 of the output on evaluation data. Latency: median over the original's, "
                 "2 threads, all models of one net interleaved in one session (below 1 is faster; empty: not timed; "
                 "–: not at that batch).")
    return {"width_mobile": "\n\n".join(parts)}


def main(argv=None) -> None:
    benchmark_main(argv, __doc__, TASK_NAMES, "width_mobile", run_one, render, quick_tasks=("ppocr_cls",))


if __name__ == "__main__":
    main()
