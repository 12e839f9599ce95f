"""Embedding tables as low-rank targets: MiniLM's word-embedding table, closed form only, ``search`` split.

all-MiniLM-L6-v2 keeps 0.52 of its parameters in the word-embedding table E [30522, 384], a
Gather(E, input_ids). The library factors it like any layer (y = onehot(ids)·E, Gram diag(c),
c the token counts in the calibration samples, padding not counted): E ≈ U·V, minimising
Σ_v (c_v + λ·mean(c))·‖E_v − U_v V‖², written as Gather(U, ids)·V. Two studies, every model
scored on the task's ``search`` split (never on ``test``: λ is chosen here):

1. the ridge λ (`lookup_ridge`): the table alone factored at rank `TABLE_RANK`, everything else
   dense, for each of `RIDGES`;
2. ``compress(target_params=0.8, method="prune+lowrank")`` (FFN / head widths and every layer's
   rank, the table's included, in one allocation) against the same run with the table kept dense
   (``--skip`` on it), at the default λ.

Run: ``python -m benchmarks.embedding_table`` (about 15 min on the shared 2-core machine) →
``benchmarks/results/embedding_table.{json,md}``. No recovery, no latency: the closed form's
metrics only (recall@1 and cosine to the original's embeddings, with the other retrieval metrics).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import onnx

from benchmarks.common import benchmark_main, fmt, markdown_table

LOGGER = logging.getLogger("benchmarks.embedding_table")
TABLE = "embeddings/word/Gather"
TABLE_RANK = 128
RIDGES = (0.0, 0.1, 1.0, 4.0, 16.0)
CALIB_SAMPLES, CALIB_BATCH = 256, 32
PARAMS = 0.8
SPLIT = "search"
TASKS = {"minilm": None}


def run_one(name: str, workdir: Path, latency_budget_s: float, blocks: int, args, results_dir: Path) -> dict[str, Any]:
    from benchmarks.tasks import get_task
    from onnx_lrsd import compress
    from onnx_lrsd.config import CompressConfig, LayerOverride

    task = get_task(name)
    task.prepare()
    calib = task.calibration_feeds(CALIB_SAMPLES, CALIB_BATCH)
    original = task.evaluate(task.model_path, split=SPLIT)
    LOGGER.info("original on %s: %s", SPLIT, original)

    def scored(label: str, **options) -> dict[str, Any]:
        start = time.perf_counter()
        result = compress(task.model_path, calibration=calib, calib_samples=CALIB_SAMPLES, calib_batch=CALIB_BATCH,
                          mask_input=task.mask_input, verify=False, **options)
        seconds = time.perf_counter() - start
        path = workdir / "closed.onnx"
        onnx.save(result.model, str(path))
        metrics = task.evaluate(path, split=SPLIT)
        table = next((layer for layer in result.report.layers if layer.name == TABLE), None)
        row = {"label": label, "metrics": metrics, "params_ratio": result.report.params_ratio, "compress_s": seconds,
               "table_rank": table.ranks[0] if table is not None and table.ranks else None,
               "widths": [dataclasses.asdict(w) for w in result.report.widths]}
        LOGGER.info("%s: params %.3f, table rank %s, %s", label, row["params_ratio"], row["table_rank"], metrics)
        return row

    ridges = [dict(scored(f"table alone at rank {TABLE_RANK}, λ {ridge:g}", lookup_ridge=ridge,
                          overrides=(LayerOverride(TABLE, rank=TABLE_RANK), LayerOverride("*", skip=True))),
                   ridge=ridge) for ridge in RIDGES]
    allocation = [scored("prune+lowrank, table in play", method="prune+lowrank", target_params=PARAMS,
                         width_criterion="energy"),
                  scored("prune+lowrank, table dense", method="prune+lowrank", target_params=PARAMS,
                         width_criterion="energy", overrides=(LayerOverride(TABLE, skip=True),))]
    return {"task": name, "split": SPLIT, "original": original, "calib_samples": CALIB_SAMPLES,
            "default_lookup_ridge": CompressConfig().lookup_ridge, "ridges": ridges, "allocation": allocation}


def render(data: dict[str, Any]) -> str:
    lines = ["# Embedding tables as low-rank targets (closed form, `search` split)", "",
             f"Machine shared with other jobs; run `{' '.join(data['argv']) or '(defaults)'}` at commit "
             f"{data['run'].get('commit', '?')}. Calibration: {CALIB_SAMPLES} samples (padding not counted).", ""]
    for task in data["tasks"]:
        names = list(task["original"])
        head = ["model", "params", "table rank", *names, "compress s"]
        original = ["original", "1", "", *[fmt(task["original"][m]) for m in names], ""]

        def row(r):
            return [r["label"], fmt(r["params_ratio"]), str(r["table_rank"] or "dense"),
                    *[fmt(r["metrics"][m]) for m in names], fmt(r["compress_s"], 1)]
        lines += [f"## {task['task']}: the ridge λ (`lookup_ridge`, default {task['default_lookup_ridge']:g})", "",
                  f"The word-embedding table alone at rank {TABLE_RANK}, every other layer dense; each token weighs "
                  "its calibration count + λ·mean count.", "",
                  markdown_table(head, [original] + [row(r) for r in task["ridges"]], "lr" + "r" * (len(head) - 2)), "",
                  f"## {task['task']}: params {PARAMS} with `method=\"prune+lowrank\"` (width criterion energy)", "",
                  markdown_table(head, [original] + [row(r) for r in task["allocation"]], "lr" + "r" * (len(head) - 2)),
                  ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    benchmark_main(argv, __doc__, TASKS, "embedding_table", run_one, render, quick_tasks=("minilm",))


if __name__ == "__main__":
    main()
