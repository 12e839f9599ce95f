"""Low rank + sparse (W ≈ L + S) against low rank alone at equal parameter budgets, on three
real models and their real tasks.

Run from the repository root::

    python -m benchmarks.sparse_residual                 # all three tasks (about 25 min on 2 cores)
    python -m benchmarks.sparse_residual --quick         # digits only

For every task at its keep ratio (``KEEPS``), data-aware independent fits with the calibration
of ``benchmarks.data_aware`` (disjoint from evaluation, see its docstring):

- ``L only``: ``compress(keep=K)``;
- ``L+S rows, auto``: ``sparse_share="auto"``: per layer the share of the budget given to whole
  input rows (run as ``[x·U, x[:, rows]]·[V; S_rows]``; for k×k convs whole input channels, a
  Gather and a k×k conv added to the chain), chosen among 0, 0.1, 0.2, 0.35, 0.5 by held-out
  reconstruction error (a share > 0 must beat the plain chain by 1 %), after dropping the
  shares whose layer would run more than 25 % slower than the plain chain of the same budget
  (chain and residual timed interleaved in onnxruntime, median ratio of 7 blocks) and every
  share of a layer whose chain runs under 0.05 ms; finally the written model is checked
  against its L-only twin: the residuals of the layers with the best held-out gains are kept
  as far as they lower the held-out output error, if the model stays within 3 % of the L-only
  model's latency, else every layer falls back to its plain chain (column ``residual check``);
- ``L+S rows, 0.2``: a fixed share of 0.2 for every layer (no latency check, no fallback);
- ``L+S unstructured, 0.2``: entries stored as a sparse initializer — a file-size saving only.

Columns: task metrics, params ratio, file size of the written model, latency ratios against the
original at batch 1 and 32 (2 threads, all four models and the original interleaved, block
medians), the number of layers with a residual and the largest per-layer time of an L + S layer
over the plain chain of its budget (``--layer-latency`` timings, batch 1, 2 threads), and for the
unstructured residuals how much of their energy sits in their top 10 % rows and columns.

Results: ``benchmarks/results/sparse_residual.{json,md}``.
"""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import benchmark_main, fmt, markdown_table, time_against_original
from benchmarks.data_aware import HOLDOUT_EVERY, METRIC_COLUMNS, TASKS, task_inputs

LOGGER = logging.getLogger("benchmarks.sparse_residual")

THREADS = 2
LATENCY_BATCHES = (1, 32)
KEEPS = {"digits_cnn": 0.05, "ppocr_rec": 0.35, "minilm": 0.35}
CONFIGS = {
    "L only": {},
    "L+S rows, auto": {"sparse_share": "auto", "sparse_structure": "rows"},
    "L+S rows, 0.2": {"sparse_share": 0.2, "sparse_structure": "rows"},
    "L+S unstructured, 0.2": {"sparse_share": 0.2, "sparse_structure": "unstructured"},
}


def run_task(name: str, workdir: Path, budget: float, blocks: int) -> dict[str, Any]:
    from onnx_lrsd import compress
    from onnx_lrsd.model.io import save_model

    task, settings, feeds, latency_feeds, dims = task_inputs(name, LATENCY_BATCHES)
    keep = KEEPS[name]
    kxk = kxk_convs(task.model_path)
    out: dict[str, Any] = {"task": name, "keep": keep, "original": task.evaluate(task.model_path),
                           "original_bytes": task.model_path.stat().st_size, "rows": []}
    for label, options in CONFIGS.items():
        row: dict[str, Any] = {"label": label, **options}
        try:
            start = time.perf_counter()
            result = compress(task.model_path, calibration=feeds, keep=keep, mode="independent",
                              mask_input=task.mask_input, calib_samples=settings.samples, calib_batch=settings.batch,
                              holdout_every=HOLDOUT_EVERY, dims=dims, latency_threads=THREADS,
                              layer_latency=options.get("sparse_structure") == "rows", **options)
            row["compress_s"] = time.perf_counter() - start
            path = workdir / f"{name}_{len(out['rows'])}.onnx"
            save_model(result.model, path)
            report = result.report
            residual = [layer for layer in report.layers if layer.residual]
            check = report.residual_check
            shares = [layer.latency.residual_share for layer in residual
                      if layer.latency is not None and layer.latency.residual_share is not None]
            row.update(path=str(path), params_ratio=report.params_ratio, file_bytes=path.stat().st_size,
                       output_errors=report.output_errors, metrics=task.evaluate(path),
                       residual_layers=len(residual), max_residual_time=max(shares) if shares else None,
                       kxk_residual_layers=sum(1 for layer in residual if layer.op == "Conv" and layer.residual == "rows"
                                               and layer.name in kxk),
                       residual_check=None if check is None else check.__dict__,
                       concentration=residual_concentration(result.model),
                       layers=[{"name": layer.name, "method": layer.method, "ranks": list(layer.ranks),
                                "residual": layer.residual, "residual_size": layer.residual_size,
                                "data_error": layer.data_error,
                                "latency": layer.latency.__dict__ if layer.latency else None}
                               for layer in report.layers])
            LOGGER.info("%s %s: %s params %.3f, %d residual layers (%.0f s)", name, label,
                        {k: round(v, 4) for k, v in row["metrics"].items()}, report.params_ratio, len(residual),
                        row["compress_s"])
        except Exception as exc:
            row.update(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
            LOGGER.error("%s %s failed: %s", name, label, exc)
        out["rows"].append(row)
    done = [r for r in out["rows"] if "error" not in r]
    for batch in LATENCY_BATCHES:
        timing = time_against_original(task.model_path, [Path(r["path"]) for r in done], latency_feeds[batch],
                                       threads=THREADS, budget_s=budget, blocks=blocks)
        for row, ratio in zip(done, timing.ratios):
            row[f"lat_b{batch}"] = ratio
    return out


TOP_SHARE = 0.1
"""`residual_concentration` looks at the top 10 % of a residual's rows and of its columns."""


def residual_concentration(model) -> dict[str, list[float]] | None:
    """For the unstructured residuals (sparse initializers) of `model`: per layer, the share of
    the residual's squared entries in its top `TOP_SHARE` rows, and in its top columns — near 1
    would mean whole rows / channels could carry it; None without sparse initializers."""
    from onnx import numpy_helper

    shares: dict[str, list[float]] = {"rows": [], "columns": []}
    for sparse in model.graph.sparse_initializer:
        shape = tuple(sparse.dims)
        indices = numpy_helper.to_array(sparse.indices)
        coords = np.stack(np.unravel_index(indices, shape), 1) if indices.ndim == 1 else indices
        energy = numpy_helper.to_array(sparse.values).astype(np.float64) ** 2
        if len(shape) != 2 or not energy.sum():
            continue
        for axis, key in enumerate(("rows", "columns")):
            per = np.sort(np.bincount(coords[:, axis], weights=energy, minlength=shape[axis]))[::-1]
            shares[key].append(float(per[:max(1, round(TOP_SHARE * shape[axis]))].sum() / energy.sum()))
    return shares if shares["rows"] else None


def concentration_text(shares: dict[str, list[float]] | None) -> str:
    if not shares:
        return ""
    return "; ".join(f"{key} {np.median(v):.2f} ({min(v):.2f}–{max(v):.2f})" for key, v in shares.items())


def kxk_convs(path: Path) -> set[str]:
    """Names of the model's target convs with a kernel larger than 1×1."""
    from onnx_lrsd import inspect_model

    return {t.name for t in inspect_model(path).targets
            if t.op == "Conv" and any(k > 1 for k in t.weight_shape[2:])}


def check_text(check: dict[str, Any] | None) -> str:
    if check is None:
        return ""
    verdict = f"{check['kept_layers']} of {check['layers']} kept" if check["kept"] else \
        f"{check['layers']} fell back"
    return (f"{verdict} (error {check['error']:.3f} vs L only {check['plain_error']:.3f}, "
            f"latency {check['latency_ratio']:.2f})")


def results_table(tasks: list[dict[str, Any]]) -> str:
    headers = ["task", "keep", "configuration", *METRIC_COLUMNS, "params", "file MB", "lat b1", "lat b32",
               "residual layers (k×k conv)", "L+S / plain chain (worst layer)", "residual check",
               "S energy in top 10% rows; columns (median, range)", "compress s"]
    rows = []
    for t in tasks:
        rows.append([t["task"], "", "original", *[fmt(t["original"].get(m)) for m in METRIC_COLUMNS], "1",
                     fmt(t["original_bytes"] / 1e6, 2), "1", "1", "", "", "", "", ""])
        for r in t["rows"]:
            if "error" in r:
                rows.append([t["task"], t["keep"], r["label"], *[""] * len(METRIC_COLUMNS), "", "", "", "", "", "", "",
                             "", r["error"]])
                continue
            worst = r.get("max_residual_time")
            rows.append([t["task"], t["keep"], r["label"], *[fmt(r["metrics"].get(m)) for m in METRIC_COLUMNS],
                         fmt(r["params_ratio"]), fmt(r["file_bytes"] / 1e6, 2), fmt(r.get("lat_b1")),
                         fmt(r.get("lat_b32")), f"{r['residual_layers']} ({r.get('kxk_residual_layers', 0)})",
                         "" if worst is None else f"{1 + worst:.2f}", check_text(r.get("residual_check")),
                         concentration_text(r.get("concentration")), fmt(r["compress_s"], 1)])
    return markdown_table(headers, rows)


def render(data: dict[str, Any]) -> str:
    m = data["machine"]
    return "\n\n".join([
        "# Low rank + sparse against low rank alone at equal budgets",
        f"`python -m benchmarks.sparse_residual {' '.join(data['argv'])}` — {m.get('date')}, onnx_lrsd commit "
        f"{m.get('git_commit')}, {m.get('cpu')}, onnxruntime {m.get('onnxruntime')}; total "
        f"{data['total_s'] / 60:.1f} min. Latency ratios: compressed / original median (2 threads, interleaved "
        "blocks; below 1 is faster). `L+S / plain chain`: the slowest residual layer's time over the plain "
        "chain of the same parameter budget, each layer timed alone (batch 1, 2 threads). `S energy`: "
        "for unstructured residuals, the share of a layer's squared residual entries in its top 10 % rows "
        "(and columns) of the stored matrix, median and range over the layers (near 1 would mean whole "
        "rows or channels could carry the residual).",
        results_table(data["tasks"]),
    ]) + "\n"


def main(argv: list[str] | None = None) -> None:
    benchmark_main(argv, __doc__, TASKS, "sparse_residual",
                   lambda task, workdir, budget, blocks, args, results: run_task(task, workdir, budget, blocks), render)


if __name__ == "__main__":
    main()


# --------------------------------------------------------------------------- README


def readme_sections(data: dict[str, Any]) -> dict[str, str]:
    """``sparse_residual``: L only against L + S at equal params, with file size and latency."""
    from benchmarks.data_aware import TASK_LABELS, TASKS as SETTINGS, metric_text

    headers = ["model, task (original)", "keep", "configuration", "metrics", "params", "file MB", "latency b1 / b32",
               "L+S layer / plain chain (worst)", "residual check"]
    rows = []
    for t in data["tasks"]:
        names = SETTINGS[t["task"]].metrics
        first = f"{TASK_LABELS[t['task']]} ({metric_text(t['original'], names)}, {t['original_bytes'] / 1e6:.2f} MB)"
        for r in t["rows"]:
            if "error" in r:
                rows.append([first, t["keep"], r["label"], r["error"][:100], "", "", "", "", ""])
            else:
                worst = r.get("max_residual_time")
                rows.append([first, t["keep"], r["label"], metric_text(r["metrics"], names), fmt(r["params_ratio"]),
                             fmt(r["file_bytes"] / 1e6, 2), f"{fmt(r.get('lat_b1'), 2)} / {fmt(r.get('lat_b32'), 2)}",
                             "" if worst is None else f"{1 + worst:.2f}", check_text(r.get("residual_check"))])
            first = ""
    return {"sparse_residual": markdown_table(headers, rows, "lrllrrrrl")
            + "\n\nLatency: compressed median over the original's, 2 threads, interleaved (below 1 is faster). "
              "`L+S layer / plain chain`: the slowest residual layer alone against the plain chain of its budget."}
