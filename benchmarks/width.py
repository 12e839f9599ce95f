"""Structured width reduction against low rank at matched measured latency, on real tasks.

Run from the repository root::

    python -m benchmarks.width                        # PP-OCRv4 rec, MiniLM, PP-OCRv4 det (~1 h on 2 shared cores)
    python -m benchmarks.width --tasks ppocr_rec      # one task (the registry runs each task into its own file:
                                                      # width.json, width_minilm.json, width_det.json)
    python -m benchmarks.width --quick                # PP-OCRv4 det only (~1 min), into width.quick.json
    python -m benchmarks.width --render-only          # rewrite the Markdown from the JSON

For every task (``benchmarks/tasks``; calibration data as in ``benchmarks/data_aware``, disjoint
from the evaluation data):

- ``width <criterion> K``: ``onnx_lrsd.passes.prune.prune_model`` keeps K of every coupled channel
  group's channels (widths of wide groups rounded to `MULTIPLE`; attention heads untouched), chosen by ``energy``
  (E[h²]·‖w‖²), ``nystrom`` (greedy column subset of the consumers' input covariance) or
  ``greedy`` (greedy reconstruction of the consumers' outputs), consumers refitted by least
  squares with an intercept; ``cut`` rows drop the refit (plain slicing, greedy choice);
- ``low rank, MACs of width K``: ``onnx_lrsd.compress(target_macs=M)``, the global low-rank
  allocation (error curves weighted by measured sensitivities), M the MACs ratio of
  ``width greedy K``. Equal MACs, not a latency target: on this shared machine the latency
  search of ``target_latency`` did not converge (its rounds measured the same kind of model at
  1.03x and 1.86x), so models are matched by MACs and every one is timed in the same
  interleaved session — compare the measured latency columns;
- ``width K' + low rank, MACs of width K``: the width model of the next milder keep K', then
  the low-rank allocation on top down to the MACs of ``width greedy K`` (two steps, not one
  allocation);
- MiniLM ``+ heads h/12``: FFN groups at K and h of the 12 attention heads of every layer kept
  (Q/K/V columns and output-projection rows of a head; the output projection refitted);
- PP-OCR rec ``width greedy sequential K``: groups narrowed one after another, each chosen
  and refitted on the inputs the partly narrowed model gives it (``PruneOptions(sequential=True)``);
- PP-OCR rec ``width allocated``: per-group widths for the params (or MACs) of ``width greedy K``
  (``PruneOptions(target_params=...)`` / ``target_macs``: error curves, sensitivities probed in
  onnxruntime).

Criteria (``CRITERIA`` per task) and the plain cut are compared at ``COMPARE_KEEPS``; low rank
at ``LOW_RANK_KEEPS``.

All models of a task are timed together, interleaved with the original
(``time_against_original``: 2 threads, spinning off, block medians) at batch 1 and 32; the
task metrics (every metric of the task) come from ``task.evaluate``; the output error is the
relative L2 error of the first output on the batch-32 latency input (evaluation data).

``ppocr_det`` (PP-OCRv4 detection, LCNet-style backbone with depthwise convs, squeeze-excitation
and an FPN neck): the coupled groups found, the blocked ones with their reasons, and width
models' params, MACs, latency (batch 1, 320×320 pages of rendered text lines) and output
error / text-pixel agreement on evaluation pages (calibration pages use another seed and
vocabulary).

Results: ``benchmarks/results/width.{json,md}``. The machine is shared with other jobs:
latency is only reported as interleaved ratios.
"""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import benchmark_main, fmt, markdown_table, results_header, time_against_original

LOGGER = logging.getLogger("benchmarks.width")

THREADS = 2
MULTIPLE = {"minilm": 8, "ppocr_rec": 16, "ppocr_det": 8}  # widths of wide groups rounded to these multiples
KEEPS = {"minilm": (0.75, 0.5, 0.35), "ppocr_rec": (0.9, 0.75, 0.6), "ppocr_det": (0.75, 0.5)}
COMPARE_KEEPS = {"minilm": (0.5,), "ppocr_rec": (0.9, 0.75, 0.6)}  # all criteria and the plain cut
LOW_RANK_KEEPS = {"minilm": (0.5, 0.35), "ppocr_rec": (0.75, 0.6)}  # low rank (and width + low rank) matched
HEADS = {"minilm": (0.5, 9)}  # one extra row: FFN groups at this keep and attention heads at this many
ALLOCATED = {"ppocr_rec": 0.75}  # one extra row: widths allocated for the params of width greedy at this keep
SEQUENTIAL = {"ppocr_rec": (0.75,)}  # extra rows: width greedy at these keeps, groups narrowed in sequence
CRITERIA = {"minilm": ("energy", "greedy"), "ppocr_rec": ("energy", "nystrom", "greedy")}  # nystrom: 3 min on MiniLM
TASK_NAMES = ("ppocr_rec", "minilm", "ppocr_det")
DET_SIZE = 320


def _model_stats(path: Path) -> dict[str, float]:
    import onnx

    from onnx_lrsd.plan.cost import count_params, model_macs

    model = onnx.load(str(path))
    return {"params": count_params(model), "macs": model_macs(model), "file_mb": path.stat().st_size / 2**20}


def _output_error(original: Path, candidate: Path, feeds: dict) -> float:
    from benchmarks.tasks.base import make_session

    want = make_session(original).run(None, feeds)[0].astype(np.float64)
    got = make_session(candidate).run(None, feeds)[0].astype(np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _prune(model, feeds, stats, orders, keep, criterion, refit, path: Path, mask_input, widths=None,
           multiple: int = 8, **options) -> dict[str, Any]:
    from onnx_lrsd.model.io import save_model
    from onnx_lrsd.passes.prune import PruneOptions, prune_model

    start = time.perf_counter()
    result = prune_model(model, feeds, PruneOptions(keep=keep, criterion=criterion, refit=refit, multiple=multiple,
                                                    mask_input=mask_input, heads=widths is not None, **options),
                         stats=stats, orders=orders, widths=widths)
    save_model(result.model, path)
    return {"path": path, "seconds": time.perf_counter() - start,
            "widths": {p.group.name: [p.width, p.group.channels] for p in result.plans}}


def _low_rank(source: Path, feeds, settings, mask_input, macs: float, path: Path) -> dict[str, Any]:
    """The low-rank global allocation (``compress(target_macs=...)``, data-aware, independent)
    keeping `macs` of the source's MACs."""
    from onnx_lrsd import compress
    from onnx_lrsd.model.io import save_model

    start = time.perf_counter()
    result = compress(source, calibration=feeds, mode="independent", mask_input=mask_input,
                      calib_samples=settings.samples, calib_batch=settings.batch, holdout_every=5,
                      latency_threads=THREADS, target_macs=macs)
    save_model(result.model, path)
    return {"path": path, "seconds": time.perf_counter() - start, "target_macs": macs}


def _group_summary(groups, blocked) -> dict[str, Any]:
    return {"groups": [{"name": g.name, "channels": g.channels, "producers": list(g.producers),
                        "consumers": list(g.consumers), "depthwise": list(g.depthwise),
                        "concats": list(g.concats)} for g in groups],
            "blocked": [{"name": b.name, "channels": b.channels, "reason": b.reason} for b in blocked]}


def run_task(name: str, workdir: Path, budget_s: float, blocks: int) -> dict[str, Any]:
    """Width models (criteria, refit and cut), low rank and width + low rank at the width
    models' MACs; timed together, evaluated on the task."""
    from benchmarks.data_aware import task_inputs
    from onnx_lrsd.model.io import load_model
    from onnx_lrsd.passes.prune import channel_groups, channel_orders, group_statistics

    task, settings, feeds, latency_feeds, _ = task_inputs(name)
    original = Path(task.model_path)
    model = load_model(original)
    start = time.perf_counter()
    groups, blocked = channel_groups(model)
    stats = group_statistics(model, groups, feeds, task.mask_input)
    out: dict[str, Any] = {"task": name, "calibration": {"samples": settings.samples, "batch": settings.batch},
                           "stats_s": time.perf_counter() - start, **_group_summary(groups, blocked), "rows": []}
    orders, out["order_s"] = {}, {}
    LOGGER.info("statistics in %.0f s", out["stats_s"])
    for criterion in CRITERIA[name]:
        t0 = time.perf_counter()
        orders[criterion] = channel_orders(groups, stats, criterion)
        out["order_s"][criterion] = time.perf_counter() - t0
        LOGGER.info("%s order in %.0f s", criterion, out["order_s"][criterion])
    rows: list[dict[str, Any]] = [{"label": "original", "kind": "original", "path": original}]
    for keep in KEEPS[name]:
        for criterion in CRITERIA[name] if keep in COMPARE_KEEPS[name] else ("greedy",):
            row = _prune(model, feeds, stats, orders[criterion], keep, criterion, True,
                         workdir / f"{name}_width_{criterion}_{keep}.onnx", task.mask_input, multiple=MULTIPLE[name])
            rows.append({"label": f"width {criterion} {keep}", "kind": "width", "criterion": criterion, "keep": keep,
                         **row})
        if keep in COMPARE_KEEPS[name]:
            row = _prune(model, feeds, stats, orders["greedy"], keep, "greedy", False,
                         workdir / f"{name}_cut_{keep}.onnx", task.mask_input, multiple=MULTIPLE[name])
            rows.append({"label": f"cut greedy {keep}", "kind": "cut", "criterion": "greedy", "keep": keep, **row})
    if name in HEADS:
        from onnx_lrsd.plan.width import keep_count

        keep, heads = HEADS[name]
        widths = {g.name: heads if g.block > 1 else keep_count(g.channels, keep, MULTIPLE[name]) for g in groups}
        row = _prune(model, feeds, stats, orders["greedy"], keep, "greedy", True, workdir / f"{name}_heads.onnx",
                     task.mask_input, widths=widths, multiple=MULTIPLE[name])
        rows.append({"label": f"width greedy {keep} + heads {heads}/{groups[-1].channels}", "kind": "width+heads",
                     "criterion": "greedy", "keep": keep, **row})
    for keep in SEQUENTIAL.get(name, ()):
        row = _prune(model, feeds, None, None, keep, "greedy", True, workdir / f"{name}_sequential_{keep}.onnx",
                     task.mask_input, multiple=MULTIPLE[name], sequential=True)
        rows.append({"label": f"width greedy sequential {keep}", "kind": "width sequential", "criterion": "greedy",
                     "keep": keep, **row})
    if name in ALLOCATED:
        import onnx

        from onnx_lrsd.plan.cost import count_params

        from onnx_lrsd.plan.cost import model_macs

        reference = next(r for r in rows if r.get("criterion") == "greedy" and r.get("keep") == ALLOCATED[name])
        written = onnx.load(str(reference["path"]))
        for kind, measure in (("params", count_params), ("macs", model_macs)):
            target = measure(written) / measure(model)
            row = _prune(model, feeds, stats, orders["greedy"], 1.0, "greedy", True,
                         workdir / f"{name}_allocated_{kind}.onnx", task.mask_input, multiple=MULTIPLE[name],
                         **{f"target_{kind}": target})
            rows.append({"label": f"width allocated, {kind} of greedy {ALLOCATED[name]}", "kind": "width allocated",
                         "criterion": "greedy", "keep": ALLOCATED[name], f"target_{kind}": target, **row})
    width_rows = {r["keep"]: r for r in rows if r.get("criterion") == "greedy" and r["kind"] == "width"}
    macs = {k: _model_stats(r["path"])["macs"] for k, r in width_rows.items()}
    base_macs = _model_stats(original)["macs"]
    previous = None
    for keep in KEEPS[name]:
        if keep in LOW_RANK_KEEPS[name]:
            try:
                row = _low_rank(original, feeds, settings, task.mask_input, macs[keep] / base_macs,
                                workdir / f"{name}_lowrank_{keep}.onnx")
                rows.append({"label": f"low rank, MACs of width {keep}", "kind": "low rank", "keep": keep, **row})
            except Exception as exc:  # a failure is a result too
                LOGGER.warning("low rank at the MACs of width %s failed: %s", keep, exc)
                rows.append({"label": f"low rank, MACs of width {keep}", "kind": "low rank", "keep": keep,
                             "error": str(exc)})
            if previous is not None:
                try:
                    row = _low_rank(width_rows[previous]["path"], feeds, settings, task.mask_input,
                                    macs[keep] / macs[previous], workdir / f"{name}_both_{keep}.onnx")
                    rows.append({"label": f"width {previous} + low rank, MACs of width {keep}", "kind": "both",
                                 "keep": keep, **row})
                except Exception as exc:
                    LOGGER.warning("width + low rank failed: %s", exc)
        previous = keep
    timed = [r for r in rows[1:] if "path" in r and r["kind"] != "cut" and r.get("criterion") in (None, "greedy")]
    LOGGER.info("timing %d models", len(timed))
    for batch in (1, 32):
        latency = time_against_original(original, [r["path"] for r in timed], latency_feeds[batch],
                                        threads=THREADS, budget_s=budget_s, blocks=blocks)
        out[f"latency_b{batch}"] = latency.to_dict()
        for r, ratio in zip(timed, latency.ratios):
            r[f"latency_b{batch}"] = ratio
    base = _model_stats(original)
    for r in rows:
        if "path" not in r:
            continue
        LOGGER.info("evaluating %s", r["label"])
        s = _model_stats(r["path"])
        r.update(params_ratio=s["params"] / base["params"], macs_ratio=s["macs"] / base["macs"],
                 output_error=_output_error(original, r["path"], latency_feeds[32]) if r["kind"] != "original" else 0.0,
                 metrics=task.evaluate(r["path"]))
        r["path"] = str(r["path"])
    out["rows"] = rows
    out["params"] = base["params"]
    return out


# ----------------------------------------------------------------------------------- detection
def _det_pages(seed: int, count: int, vocabulary) -> np.ndarray:
    """`count` 320×320 pages of rendered text lines, normalised as RapidOCR's detector input."""
    from benchmarks.tasks.ocr import HARD_STYLE, NORMAL_STYLE, make_text, render_line

    pages = np.empty((count, 3, DET_SIZE, DET_SIZE), np.float32)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        page = np.full((DET_SIZE, DET_SIZE, 3), rng.integers(190, 255), np.float64)
        y = int(rng.integers(4, 20))
        while y < DET_SIZE - 20:
            crop = render_line(rng, make_text(rng, vocabulary), NORMAL_STYLE if rng.random() < 0.6 else HARD_STYLE)
            if crop is None:
                continue
            h, w = min(crop.shape[0], DET_SIZE - y), min(crop.shape[1], DET_SIZE)
            x = int(rng.integers(0, DET_SIZE - w + 1))
            page[y:y + h, x:x + w] = crop[:h, :w]
            y += h + int(rng.integers(2, 24))
        pages[index] = ((page / 255.0 - mean) / std).transpose(2, 0, 1)
    return pages


def run_det(workdir: Path, budget_s: float, blocks: int) -> dict[str, Any]:
    import importlib.util

    from benchmarks.tasks.base import make_session
    from benchmarks.tasks.ocr import calibration_vocabulary, evaluation_vocabulary
    from onnx_lrsd.model.io import load_model
    from onnx_lrsd.passes.prune import channel_groups, channel_orders, group_statistics

    original = Path(importlib.util.find_spec("rapidocr_onnxruntime").origin).parent / "models" / \
        "ch_PP-OCRv4_det_infer.onnx"
    model = load_model(original)
    groups, blocked = channel_groups(model)
    calib = _det_pages(3003, 16, calibration_vocabulary())
    evaluation = _det_pages(1001, 8, evaluation_vocabulary())
    feeds = [{"x": calib[i:i + 4]} for i in range(0, len(calib), 4)]
    stats = group_statistics(model, groups, feeds)
    orders = channel_orders(groups, stats, "greedy")
    out: dict[str, Any] = {"task": "ppocr_det", **_group_summary(groups, blocked), "rows": []}
    rows = [{"label": "original", "kind": "original", "path": original}]
    for keep in KEEPS["ppocr_det"]:
        rows.append({"label": f"width greedy {keep}", "kind": "width", "criterion": "greedy", "keep": keep,
                     **_prune(model, feeds, stats, orders, keep, "greedy", True, workdir / f"det_{keep}.onnx", None,
                              multiple=MULTIPLE["ppocr_det"])})
    latency = time_against_original(original, [r["path"] for r in rows[1:]], {"x": evaluation[:1]}, threads=THREADS,
                                    budget_s=budget_s, blocks=blocks)
    out["latency_b1"] = latency.to_dict()
    base = _model_stats(original)
    want = np.concatenate([make_session(original).run(None, {"x": evaluation[i:i + 1]})[0] for i in range(8)])
    for r, ratio in zip(rows, (1.0,) + latency.ratios):
        s = _model_stats(r["path"])
        got = np.concatenate([make_session(r["path"]).run(None, {"x": evaluation[i:i + 1]})[0] for i in range(8)])
        text_want, text_got = want > 0.3, got > 0.3
        r.update(params_ratio=s["params"] / base["params"], macs_ratio=s["macs"] / base["macs"], latency_b1=ratio,
                 output_error=float(np.linalg.norm(got - want) / np.linalg.norm(want)),
                 metrics={"text_iou": float((text_want & text_got).sum() / max((text_want | text_got).sum(), 1))},
                 path=str(r["path"]))
    out["rows"] = rows
    return out


def run_one(name: str, workdir: Path, budget_s: float, blocks: int, args, results_dir: Path) -> dict[str, Any]:
    if name == "ppocr_det":
        return run_det(workdir, budget_s, blocks)
    return run_task(name, workdir, budget_s, blocks)


# ----------------------------------------------------------------------------------- rendering
METRICS = {"minilm": ("recall@1", "mrr", "cosine"), "ppocr_rec": ("char_acc", "char_acc_hard"),
           "ppocr_det": ("text_iou",)}


def render(data: dict[str, Any]) -> str:
    lines = results_header(data, "Structured width reduction against low rank at matched latency",
                           "benchmarks.width")
    for t in data["tasks"]:
        metrics = METRICS[t["task"]]
        lines += [f"## {t['task']}", ""]
        headers = ["configuration", *metrics, "output error", "params", "MACs", "lat b1", "lat b32"]
        rows = []
        for r in t["rows"]:
            if "error" in r:
                rows.append([r["label"], *([""] * len(metrics)), f"failed: {r['error']}", "", "", "", ""])
                continue
            m = r.get("metrics", {})
            rows.append([r["label"], *(fmt(m.get(k)) for k in metrics), fmt(r.get("output_error"), 4),
                         fmt(r.get("params_ratio")), fmt(r.get("macs_ratio")), fmt(r.get("latency_b1")),
                         fmt(r.get("latency_b32"))])
        lines += [markdown_table(headers, rows, "l" + "r" * (len(headers) - 1)), ""]
        if "order_s" in t:
            lines += [f"Statistics {t['stats_s']:.0f} s; channel orders: "
                      + ", ".join(f"{k} {v:.0f} s" for k, v in t["order_s"].items()) + ".", ""]
        lines += [f"{len(t['groups'])} coupled groups ("
                  + ", ".join(f"{g['name']} {g['channels']}" for g in t["groups"][:8])
                  + (", …" if len(t["groups"]) > 8 else "") + f"); {_through_concat(t)}{len(t['blocked'])} blocked:",
                  ""]
        reasons: dict[str, list[str]] = {}
        for b in t["blocked"]:
            kind = b["reason"].split("'")[0].strip() or b["reason"]
            reasons.setdefault(kind, []).append(b["name"])
        lines += [markdown_table(["blocked by", "count", "producers (first 4)"],
                                 [[k, len(v), ", ".join(v[:4])] for k, v in sorted(reasons.items())]), ""]
    return "\n".join(lines)


def _requested(data: dict[str, Any]) -> list[str]:
    """The tasks a run was asked for (``--tasks``, else all of `TASK_NAMES`)."""
    argv = list(data.get("argv") or [])
    if "--tasks" not in argv:
        return list(TASK_NAMES)
    rest = argv[argv.index("--tasks") + 1:]
    return [a for a in rest[:next((i for i, a in enumerate(rest) if a.startswith("--")), len(rest))]]


def _through_concat(t: dict[str, Any]) -> str:
    """'N read through a channel Concat (names); ' when groups reach readers through a Concat."""
    joined = [g for g in t["groups"] if g.get("concats")]
    if not joined:
        return ""
    concats = sorted({c for g in joined for c in g["concats"]})
    return f"{len(joined)} read through a channel Concat ({', '.join(concats)}) at their offsets; "


def readme_sections(data: dict[str, Any]) -> dict[str, str]:
    """``width`` (``width_minilm`` / ``width_det`` for a run of that task alone): per task every configuration's
    metrics (all of the task's), output error, params, MACs and latency at batch 1 / 32, and the
    coupled and blocked channel groups."""
    requested = _requested(data)
    parts = []
    for t in data["tasks"]:
        metrics = METRICS[t["task"]]
        rows = []
        for r in t["rows"]:
            if "error" in r:
                rows.append([r["label"], f"failed: {r['error'][:100]}", "", "", "", ""])
                continue
            m = r.get("metrics", {})
            rows.append([r["label"], " / ".join(fmt(m.get(k)) for k in metrics), fmt(r.get("output_error"), 3),
                         fmt(r.get("params_ratio")), fmt(r.get("macs_ratio")),
                         " / ".join(fmt(r.get(f"latency_b{b}"), 2) or "–" for b in (1, 32))
                         if any(f"latency_b{b}" in r for b in (1, 32)) else ""])
        reasons: dict[str, int] = {}
        for b in t["blocked"]:
            kind = b["reason"].split("'")[0].strip() or b["reason"]
            reasons[kind] = reasons.get(kind, 0) + 1
        parts += [f"**{t['task']}** ({', '.join(metrics)}):",
                  markdown_table(["configuration", " / ".join(metrics), "output error", "params", "MACs",
                                  "latency b1 / b32"], rows, "llrrrr"),
                  f"{len(t['groups'])} coupled channel groups; {_through_concat(t)}{len(t['blocked'])} blocked"
                  + (" by " + ", ".join(f"{k} ({v})" for k, v in sorted(reasons.items())) if reasons else "") + "."]
    missing = [n for n in requested if n not in {t["task"] for t in data["tasks"]}]
    if missing:
        parts.append(f"Not measured in this run: {', '.join(missing)}.")
    parts.append("Width rows keep that share of every coupled group's channels (criterion named, readers refitted by "
                 "least squares; `cut`: no refit); low rank rows are `compress(target_macs=...)` at the MACs of the "
                 "width model named; what each row is: `benchmarks/width.py`. Output error: relative L2 of the first "
                 "output on evaluation data. Latency: median over the original's, 2 threads, all models of a task "
                 "interleaved in one session (below 1 is faster; empty: not timed; –: not at that batch)."
                 + (" PP-OCRv4 det: `text_iou` is the overlap of the text-pixel maps (> 0.3) with the original's on "
                    "8 evaluation pages (320×320, rendered lines; calibration pages use another seed and vocabulary)."
                    if any(t["task"] == "ppocr_det" for t in data["tasks"]) else ""))
    name = {("minilm",): "width_minilm", ("ppocr_det",): "width_det"}.get(tuple(requested), "width")
    return {name: "\n\n".join(parts)}


def main(argv=None) -> None:
    benchmark_main(argv, __doc__, TASK_NAMES, "width", run_one, render, quick_tasks=("ppocr_det",))


if __name__ == "__main__":
    main()
