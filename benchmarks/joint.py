"""Joint decomposition of repeated layers (JMD) against separate data-aware fits at equal params.

Run from the repository root::

    python -m benchmarks.joint              # MiniLM and ResNet-50 (about 25 min on 2 cores)
    python -m benchmarks.joint --quick      # MiniLM at keep 0.35, off and left only, no global rows
    python -m benchmarks.joint --global-only --output benchmarks/results/joint_global
                                            # the global-allocation rows and ResNet-50

MiniLM (``benchmarks/tasks/minilm``, calibration and evaluation as in ``benchmarks.data_aware``):
at each keep of ``MINILM_KEEPS``, ``joint="off"`` (every layer fitted alone) against
``"left"`` (a shared input-side factor per group), ``"right"`` (output side) and ``"auto"``
(per group the better of them or separate, by held-out error). Groups are found
automatically: the same projection of the 6 layers (query, key, value, attention output,
FFN in, FFN out: 6 groups of 6). Every group gets the parameters its members' separate plans
would use, so params ratios match. At keep 0.35 also the global allocation
(``target_params`` = the separate model's params ratio) with each joint setting: there
every group is one decision of the allocation (all dense, separate fits, or joint at a
shared rank, by predicted damage).

ResNet-50 from the onnx wheel's model zoo (seeded random weights: structure and latency only,
calibrated and verified on seeded random images): same-shaped convs of the same kind form
groups (conv channel chains share their k×k or their 1×1 factor).

Columns: task metrics (MiniLM), the largest relative output error on held-out calibration
batches, params ratio, latency ratios at batch 1 and 32 (MiniLM) or 1 (ResNet-50; its input
batch is fixed), 2 threads, interleaved with the original, and the groups fitted jointly.

Results: ``benchmarks/results/joint.{json,md}``.
"""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.common import benchmark_main, fmt, markdown_table, time_against_original
from benchmarks.data_aware import HOLDOUT_EVERY, task_inputs

LOGGER = logging.getLogger("benchmarks.joint")
THREADS = 2
MINILM_KEEPS = (0.5, 0.35, 0.25)
JOINTS = ("off", "left", "right", "auto")
""""both" is left out: its alternating fit takes minutes per MiniLM group (see the note)."""
QUICK_JOINTS = ("off", "left")
"""``--quick``: separate fits against the shared input side only."""
RESNET_KEEP = 0.35
RESNET_JOINTS = ("off", "right")
"""ResNet-50's conv groups are up to 4608 inputs wide: the left (ALS) fit takes minutes per group
there, so the ResNet row compares separate fits with the closed-form shared output side."""
RESNET_SAMPLES = 8
RESNET_POSITIONS = 1024
"""Random calibration images and im2col positions per image for ResNet-50: its weights are
random, so its statistics only need to be well-posed (4608-wide 3×3 convs make a Gram update
cost positions × 4608² flops per image)."""
GLOBAL_KEEPS = (0.35,)
GLOBAL_JOINTS = ("off", "left", "right", "auto")
"""With a params target equal to the separate keep's, every group is one decision of the
global allocation."""
METRICS = ("recall@1", "mrr", "cosine")
BENCHMARKS = {"minilm": None, "resnet50": None}


def _row(result, path: Path, seconds: float, joint: str) -> dict[str, Any]:
    from onnx_lrsd.model.io import save_model

    save_model(result.model, path)
    report = result.report
    return {"joint": joint, "path": str(path), "compress_s": seconds, "params_ratio": report.params_ratio,
            "output_error": max(report.output_errors.values()),
            "groups": [g.__dict__ for g in report.joint_groups]}


def run_minilm(workdir: Path, budget: float, blocks: int, quick: bool, global_only: bool = False) -> dict[str, Any]:
    from onnx_lrsd import compress

    task, settings, feeds, latency, dims = task_inputs("minilm", (1, 32))
    out: dict[str, Any] = {"task": "minilm", "original": task.evaluate(task.model_path), "keeps": []}
    for keep in (GLOBAL_KEEPS if global_only else (0.35,) if quick else MINILM_KEEPS):
        rows = []
        for joint in (("off",) if global_only else QUICK_JOINTS if quick else JOINTS):
            try:
                start = time.perf_counter()
                result = compress(task.model_path, calibration=feeds, keep=keep, joint=joint, mask_input=task.mask_input,
                                  calib_samples=settings.samples, calib_batch=settings.batch,
                                  holdout_every=HOLDOUT_EVERY, dims=dims)
                row = _row(result, workdir / f"minilm_{keep}_{joint}.onnx", time.perf_counter() - start, joint)
                row["metrics"] = task.evaluate(Path(row["path"]))
                LOGGER.info("minilm keep %g joint %s: %s params %.3f", keep, joint, row["metrics"], row["params_ratio"])
            except Exception as exc:
                row = {"joint": joint, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            rows.append(row)
        off = next((r for r in rows if r["joint"] == "off" and "error" not in r), None)
        if keep in GLOBAL_KEEPS and off is not None and (global_only or not quick):  # quick: no global rows
            rows += global_rows(task, settings, feeds, dims, off["params_ratio"], workdir)
        done = [r for r in rows if "error" not in r]
        for batch in (1, 32):
            timing = time_against_original(task.model_path, [Path(r["path"]) for r in done], latency[batch],
                                           threads=THREADS, budget_s=budget, blocks=blocks)
            for r, ratio in zip(done, timing.ratios):
                r[f"lat_b{batch}"] = ratio
        out["keeps"].append({"keep": keep, "rows": rows})
    return out


def global_rows(task, settings, feeds, dims, params: float, workdir: Path) -> list[dict[str, Any]]:
    """The global allocation at `params` with each of `GLOBAL_JOINTS`: every group one
    decision (all dense, separate fits, or joint at a shared rank)."""
    from onnx_lrsd import compress

    rows = []
    for joint in GLOBAL_JOINTS:
        label = f"global {joint}"
        try:
            start = time.perf_counter()
            result = compress(task.model_path, calibration=feeds, target_params=params, joint=joint,
                              mask_input=task.mask_input, calib_samples=settings.samples, calib_batch=settings.batch,
                              holdout_every=HOLDOUT_EVERY, dims=dims)
            row = _row(result, workdir / f"minilm_global_{joint}.onnx", time.perf_counter() - start, label)
            row["allocation_joint"] = list(result.report.allocation.joint)
            row["metrics"] = task.evaluate(Path(row["path"]))
            LOGGER.info("minilm global params %.3f joint %s: %s, joint groups %s", params, joint, row["metrics"],
                        row["allocation_joint"])
        except Exception as exc:
            row = {"joint": label, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        rows.append(row)
    return rows


def run_resnet(workdir: Path, budget: float, blocks: int) -> dict[str, Any]:
    import onnx

    from onnx_lrsd import compress
    from onnx_lrsd.runtime.feeds import random_feeds
    from onnx_lrsd.testing.zoo import zoo_model

    model = zoo_model("resnet50")
    source = workdir / "resnet50.onnx"
    onnx.save(model, str(source))
    rows = []
    for joint in RESNET_JOINTS:
        try:
            start = time.perf_counter()
            result = compress(source, calibration="random", keep=RESNET_KEEP, joint=joint, calib_samples=RESNET_SAMPLES,
                              calib_batch=1, conv_positions=RESNET_POSITIONS)
            rows.append(_row(result, workdir / f"resnet50_{joint}.onnx", time.perf_counter() - start, joint))
        except Exception as exc:
            rows.append({"joint": joint, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
    done = [r for r in rows if "error" not in r]
    timing = time_against_original(source, [Path(r["path"]) for r in done], random_feeds(model, seed=5),
                                   threads=THREADS, budget_s=budget, blocks=blocks)
    for r, ratio in zip(done, timing.ratios):
        r["lat_b1"] = ratio
    return {"task": "resnet50", "keeps": [{"keep": RESNET_KEEP, "rows": rows}]}


def run_one(name: str, workdir: Path, budget: float, blocks: int, args, results) -> dict[str, Any]:
    if name == "minilm":
        return run_minilm(workdir, budget, blocks, args.quick, args.global_only)
    return run_resnet(workdir, budget, blocks)


def _groups_text(row: dict[str, Any]) -> str:
    joint = [g for g in row.get("groups", []) if g["side"] != "separate"]
    if not row.get("groups"):
        return ""
    sides = sorted({g["side"] for g in joint})
    return f"{len(joint)}/{len(row['groups'])} joint ({', '.join(sides) or '-'})"


def render(data: dict[str, Any]) -> str:
    headers = ["model", "keep", "joint", *METRICS, "output error", "params", "lat b1", "lat b32", "groups",
               "compress s"]
    rows = []
    for t in data["tasks"]:
        if "original" in t:
            rows.append([t["task"], "", "original", *[fmt(t["original"].get(m)) for m in METRICS], "0", "1", "1", "1",
                         "", ""])
        for entry in t["keeps"]:
            for r in entry["rows"]:
                if "error" in r:
                    rows.append([t["task"], entry["keep"], r["joint"], *[""] * len(METRICS), "", "", "", "", r["error"],
                                 ""])
                    continue
                metrics = r.get("metrics") or {}
                rows.append([t["task"], entry["keep"], r["joint"], *[fmt(metrics.get(m)) for m in METRICS],
                             f"{r['output_error']:.3e}", fmt(r["params_ratio"]), fmt(r.get("lat_b1")),
                             fmt(r.get("lat_b32")), _groups_text(r), fmt(r["compress_s"], 1)])
    m = data["machine"]
    return "\n\n".join([
        "# Joint (JMD) against separate data-aware decomposition at equal params",
        f"`python -m benchmarks.joint {' '.join(data['argv'])}` — {m.get('date')}, onnx_lrsd commit "
        f"{m.get('git_commit')}, {m.get('cpu')}, onnxruntime {m.get('onnxruntime')}; total {data['total_s'] / 60:.1f} "
        "min. Output error: the largest relative error over the outputs on held-out calibration batches. Latency "
        "ratios: compressed / original median (2 threads, interleaved blocks). ResNet-50 has seeded random weights.",
        markdown_table(headers, rows),
    ]) + "\n"


def main(argv: list[str] | None = None) -> None:
    benchmark_main(argv, __doc__, BENCHMARKS, "joint", run_one, render, quick_tasks=("minilm",),
                   extra_args=lambda parser: parser.add_argument(
                       "--global-only", action="store_true",
                       help="MiniLM: only the separate row at keep 0.35 and the global-allocation rows"))


if __name__ == "__main__":
    main()


# --------------------------------------------------------------------------- README


def readme_sections(data: dict[str, Any]) -> dict[str, str]:
    """``joint`` (or ``joint_global`` for a ``--global-only`` run): every joint setting against
    separate fits at equal params, every MiniLM metric, output error and latency."""
    headers = ["model", "keep", "joint", "recall@1 / mrr / cosine", "output error", "params", "latency b1 / b32",
               "groups fitted jointly"]
    rows = []
    for t in data["tasks"]:
        if "original" in t:
            rows.append([t["task"], "", "original", " / ".join(fmt(t["original"].get(m)) for m in METRICS), "0", "1",
                         "1 / 1", ""])
        for entry in t["keeps"]:
            for r in entry["rows"]:
                if "error" in r:
                    rows.append([t["task"], entry["keep"], r["joint"], r["error"][:100], "", "", "", ""])
                    continue
                metrics = r.get("metrics") or {}
                rows.append([t["task"], entry["keep"], r["joint"],
                             " / ".join(fmt(metrics.get(m)) for m in METRICS) if metrics else "",
                             f"{r['output_error']:.3f}", fmt(r["params_ratio"]),
                             f"{fmt(r.get('lat_b1'), 2)} / {fmt(r.get('lat_b32'), 2)}", _groups_text(r)])
    name = "joint_global" if "--global-only" in data.get("argv", []) else "joint"
    return {name: markdown_table(headers, rows, "lrllrrrl")
            + "\n\nOutput error: the largest relative error over the outputs on held-out calibration batches. "
              "Latency: compressed median over the original's, 2 threads, interleaved (ResNet-50: seeded random "
              "weights, batch 1 only)."}
