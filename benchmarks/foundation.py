"""Foundation benchmark: the `onnx-lrsd` CLI on every bundled zoo graph and PP-OCRv4.

    python -m benchmarks.foundation            # full run (about 35-60 min on a busy 2-core box)
    python -m benchmarks.foundation --quick    # a ~1-2 minute subset
    python -m benchmarks.foundation --parts 4  # re-run some parts, merged into the last results

Every measurement goes through the real command line (`onnx-lrsd inspect|compress|bench
--json` in a subprocess), so argument parsing, loading, saving and verification are part of
what is timed. Three parts:

1. `inspect` and `compress --keep 0.5` on the 9 zoo graphs of the onnx wheel (seeded random
   weights, written to a temp dir) and on PP-OCRv4 recognition: targets and skipped layers,
   params / MACs / file-size ratios, output error, wall time and peak RSS; compress is run
   with the inherited BLAS threading (what a user gets) and again with
   `OPENBLAS_NUM_THREADS=1`. Then `compress --rank '*=full'` (every layer factorized at full
   rank) must reproduce the outputs within 1e-5 relative; its error is also re-checked
   in-process on a second seeded input. Random weights have no low-rank structure, so the
   keep-0.5 errors of the zoo graphs are large by construction: they say nothing about
   accuracy on real weights.
2. `bench` of ResNet-50 against its keep-0.5 compression at 2 threads, batch 1 and 8, for
   `--method auto|channel|tucker2|spatial`: 3 separate interleaved `bench` runs per
   configuration, median speedup, beside the MACs ratio. The zoo graphs hard-code batch 1
   (input shape and a `Reshape` to [1, 2048]), so batch 8 runs on a batchable copy (input
   dim 0 symbolic, the Reshape's leading 1 made 0 = "copy"). An onnxruntime profile splits
   the latency per original layer to show which chains miss their FLOP ratio.
3. Wall time and peak RSS (`os.wait4` rusage of the child) of `compress --keep 0.5` on
   VGG-19 (143M parameters) against its file size.
4. The decomposition kernels' BLAS threading under load: one exact SVD of a conv-sized matrix
   with OpenBLAS's default threads and with one, with and without a busy core.

The library measured is a `git archive HEAD` snapshot (see `run_in_snapshot`; `--live` measures
the working tree instead), so commits made during the hour-long run cannot change it midway.

Writes `benchmarks/results/foundation.{json,md}` (`foundation.quick.*` with --quick).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CLI = [sys.executable, "-m", "onnx_lrsd.cli"]

ZOO = ("bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet",
       "squeezenet", "vgg19", "zfnet512")
QUICK_ZOO = ("squeezenet", "shufflenet")
OCR = "ppocr_rec"
OCR_DIMS = {"?": 48, "p2o.DynamicDimension.1": 320}  # height is a literal '?' dim_param
FULL_RANK_TOLERANCE = 1e-5
METHODS = ("auto", "channel", "tucker2", "spatial")
ALL_PARTS = {1, 2, 3, 4}
ONE_BLAS_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


# --------------------------------------------------------------------------- CLI runner


@dataclass
class CliRun:
    """One `onnx-lrsd` subprocess: exit code, parsed --json output, wall time, peak RSS."""

    args: list
    returncode: int
    wall_s: float
    peak_rss_mb: float
    load_before: float
    data: Optional[dict] = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.data is not None


_WRAPPER = """
import os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(f"{usage.ru_maxrss} {time.perf_counter() - start}")
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def run_cli(args: list, env_extra: Optional[dict] = None, timeout: float = 7200) -> CliRun:
    """Run `onnx-lrsd ARGS` through a small wrapper process that `os.wait4`s it.

    The wrapper matters: Linux carries the RSS high-water mark of the forking process into
    the child's `ru_maxrss` at exec, so a child forked straight from this (large) process
    would report at least this process's peak. Forked from the small wrapper, the child's
    `ru_maxrss` is its own. Wall time is measured in the wrapper, around the child only.
    """
    env = dict(os.environ, **(env_extra or {}))
    load = load_average()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        command = [sys.executable, "-c", _WRAPPER, rss.name, *CLI, *(str(a) for a in args)]
        proc = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=ROOT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the wrapper's own process group: it and the CLI child
            proc.wait()
        measured = rss.read().split()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    maxrss_kb, wall = (int(measured[0]), float(measured[1])) if len(measured) == 2 else (0, float("nan"))
    run = CliRun(args=[str(a) for a in args], returncode=proc.returncode, wall_s=round(wall, 2),
                 peak_rss_mb=round(maxrss_kb / 1024, 1), load_before=load)
    if proc.returncode == 0:
        try:
            run.data = json.loads(stdout)
        except json.JSONDecodeError as exc:
            run.error = f"bad JSON: {exc}"
    else:
        lines = [line for line in stderr.splitlines() if line.strip() and "W:onnxruntime" not in line]
        run.error = (lines[-1] if lines else f"exit {proc.returncode}")[:300]
    return run


# --------------------------------------------------------------------------- models


def write_zoo(names, workdir: Path) -> dict:
    from onnx_lrsd.testing.zoo import zoo_model

    paths = {}
    for name in names:
        path = workdir / f"{name}.onnx"
        if not path.exists():
            onnx.save(zoo_model(name, seed=0), str(path))
        paths[name] = path
    return paths


def ocr_path() -> Path:
    from benchmarks.tasks.ocr import rec_model_path

    return rec_model_path()


def dim_args(dims: dict) -> list:
    return [item for name, value in dims.items() for item in ("--dim", f"{name}={value}")]


def fixed_shape_macs(path: Path, dims: dict) -> int:
    """MACs with the symbolic input dims fixed (batch 1), for models the library can only
    count per position (its `model_macs` counts unknown dims as 1)."""
    from onnx_lrsd.plan.cost import model_macs

    model = onnx.load(str(path))
    for inp in model.graph.input:
        for index, dim in enumerate(inp.type.tensor_type.shape.dim):
            if dim.HasField("dim_param"):
                value = dims.get(dim.dim_param, 1 if index == 0 else None)
                if value is not None:
                    dim.Clear()
                    dim.dim_value = value
    del model.graph.value_info[:]
    return model_macs(model)


def recheck_error(original: Path, compressed: Path, dims: dict, seed: int = 1) -> float:
    """Largest relative output error on a seeded input different from `compress`'s own."""
    from onnx_lrsd.runtime.bench import make_session, relative_output_errors, run_outputs
    from onnx_lrsd.runtime.feeds import random_feeds

    model = onnx.load(str(original), load_external_data=False)
    feeds = random_feeds(model, dims=dims, seed=seed)
    del model
    sessions = [make_session(p, threads=2) for p in (original, compressed)]
    outputs = [run_outputs(s, feeds) for s in sessions]
    names = [o.name for o in sessions[0].get_outputs()]
    return max(relative_output_errors(outputs[0], outputs[1], names).values())


# --------------------------------------------------------------------------- part 1


def summarize_compress(run: CliRun) -> dict:
    row = {"ok": run.ok, "wall_s": run.wall_s, "peak_rss_mb": run.peak_rss_mb, "load_before": run.load_before}
    if not run.ok:
        row["error"] = run.error
        return row
    d = run.data
    methods = Counter(layer["method"] for layer in d["layers"])
    row.update(
        params_before=d["before"]["params"], params_after=d["after"]["params"],
        macs_before=d["before"]["macs"], macs_after=d["after"]["macs"],
        file_bytes_before=d["before"]["file_bytes"], file_bytes_after=d["after"]["file_bytes"],
        params_ratio=d["params_ratio"], macs_ratio=d["macs_ratio"], size_ratio=d["size_ratio"],
        output_error=max(d["output_errors"].values()) if d["output_errors"] else None,
        factorized=sum(n for m, n in methods.items() if m != "dense"), dense=methods.get("dense", 0),
        methods=dict(methods), report_seconds=d["seconds"],
        timings={k: round(v, 3) for k, v in d["timings"].items() if v >= 0.01},
    )
    return row


def part1(models: dict, workdir: Path, blas_default: bool) -> list:
    rows = []
    for name, (path, dims) in models.items():
        log(f"part 1: {name}")
        row = {"model": name, "file_mb": round(path.stat().st_size / 2**20, 1)}
        run = run_cli(["inspect", path, "--json"])
        row["inspect"] = {"ok": run.ok, "wall_s": run.wall_s, "error": run.error}
        if run.ok:
            d = run.data
            row["inspect"].update(params=d["params"], macs=d["macs"], targets=len(d["targets"]),
                                  skipped=len(d["skipped"]),
                                  skip_reasons=dict(Counter(s["reason"] for s in d["skipped"]).most_common(4)),
                                  target_share=sum(t["share"] for t in d["targets"]))
        out = workdir / f"{name}.keep05.onnx"
        base = ["compress", path, "-o", out, "--keep", "0.5", "--json", "-q", *dim_args(dims)]
        if blas_default:
            row["compress"] = summarize_compress(run_cli(base))
            log(f"  keep 0.5 (default BLAS threads): {row['compress'].get('wall_s')} s "
                f"err {row['compress'].get('output_error')}")
        row["compress_1blas"] = summarize_compress(run_cli(base, ONE_BLAS_THREAD))
        log(f"  keep 0.5 (OPENBLAS_NUM_THREADS=1): {row['compress_1blas'].get('wall_s')} s")
        if not blas_default:
            row["compress"] = row["compress_1blas"]
        if dims and row["compress"]["ok"]:
            before, after = fixed_shape_macs(path, dims), fixed_shape_macs(out, dims)
            row["compress"]["macs_fixed_dims"] = {"before": before, "after": after, "ratio": after / before}
        full = workdir / f"{name}.full.onnx"
        run = run_cli(["compress", path, "-o", full, "--rank", "*=full", "--json", "-q", *dim_args(dims)],
                      ONE_BLAS_THREAD)
        row["full_rank"] = summarize_compress(run)
        if run.ok:
            row["full_rank"]["recheck_error"] = recheck_error(path, full, dims)
            err = max(row["full_rank"]["output_error"], row["full_rank"]["recheck_error"])
            row["full_rank"]["max_error"] = err
            row["full_rank"]["pass"] = err <= FULL_RANK_TOLERANCE
            log(f"  full rank: error {err:.2e} ({'pass' if err <= FULL_RANK_TOLERANCE else 'FAIL'})")
        for p in (out, full):
            p.unlink(missing_ok=True)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- part 2


def make_batchable(src: Path, dst: Path) -> list:
    """Copy with input dim 0 symbolic ('N'), every constant Reshape target starting with 1
    given a leading 0 (copy the input's batch) and unnamed nodes named `n{index}`. Returns the
    patched Reshape targets."""
    model = onnx.load(str(src))
    inits = {t.name: t for t in model.graph.initializer}
    names = {t.name for t in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in names:
            continue
        dim0 = inp.type.tensor_type.shape.dim[0]
        dim0.Clear()
        dim0.dim_param = "N"
    for index, node in enumerate(model.graph.node):
        node.name = node.name or f"n{index}"  # the names `compress` reports, so profiles line up
    patched = []
    for node in model.graph.node:
        if node.op_type == "Reshape" and len(node.input) > 1 and node.input[1] in inits:
            shape = numpy_helper.to_array(inits[node.input[1]])
            if shape.size and shape[0] == 1:
                new = shape.copy()
                new[0] = 0
                inits[node.input[1]].CopyFrom(numpy_helper.from_array(new, node.input[1]))
                patched.append(shape.tolist())
    del model.graph.value_info[:]
    for out in model.graph.output:
        if out.type.tensor_type.shape.dim:
            out.type.tensor_type.shape.dim[0].Clear()
            out.type.tensor_type.shape.dim[0].dim_param = "N"
    onnx.save(model, str(dst))
    return patched


def batch8_on_original(path: Path) -> str:
    """What onnxruntime says when the fixed-batch zoo graph is fed a batch of 8."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    try:
        session.run(None, {inp.name: np.zeros((8, 3, 224, 224), np.float32)})
        return "ran"
    except Exception as exc:  # onnxruntime's exception types vary
        return str(exc).strip().splitlines()[0][:240]


def profile_layers(path: Path, batch: int, runs: int, warmup: int = 3, threads: int = 2) -> dict:
    """Mean per-run kernel time (µs) per original layer, from an onnxruntime profile.

    Chain nodes are named `{layer}/lrsd/...`; onnxruntime's fusions (Conv+Add+Relu, NCHWc)
    keep the Conv's name, so summing node events by the name before `/lrsd/` gives each
    original layer's time (reorder nodes and the rest get their own buckets). Events of the
    warm-up runs are dropped.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix("")) + f".b{batch}"
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {session.get_inputs()[0].name: rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)}
    for _ in range(warmup + runs):
        session.run(None, feeds)
    profile = Path(session.end_profiling())
    events = json.loads(profile.read_text())
    profile.unlink(missing_ok=True)
    run_starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    if len(run_starts) < warmup + runs:
        raise RuntimeError(f"profile of {path} has {len(run_starts)} runs, expected {warmup + runs}")
    first_timed = run_starts[warmup]
    attribute = layer_attribution(path)
    totals: dict = {}
    for event in events:
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith("_kernel_time") or event["ts"] < first_timed:
            continue
        layer = attribute(name[: -len("_kernel_time")])
        totals[layer] = totals.get(layer, 0.0) + event["dur"]
    return {layer: total / runs for layer, total in totals.items()}


_FUSED_AFTER_CONV = {"BatchNormalization", "Relu", "Add", "Sum", "Clip"}


def layer_attribution(path: Path):
    """A function mapping an onnxruntime profile node name to the model layer it runs.

    Chain nodes keep `{layer}/lrsd/...` names. onnxruntime's NCHWc transformer renames a
    Conv fused with its BatchNormalization / Relu / residual Add to `{output tensor}_nchwc`,
    the output being the last fused node's; walking back from that tensor through the fused
    ops finds the Conv. At a residual Add whose two inputs both come from Convs (projection
    shortcut), the later Conv is the one the Add was fused into (the other must run first).
    """
    model = onnx.load(str(path), load_external_data=False)
    nodes = list(model.graph.node)
    order = {id(n): i for i, n in enumerate(nodes)}
    producer = {out: n for n in nodes for out in n.output}
    names = {n.name for n in nodes}

    def conv_output(tensor: str):
        node = producer.get(tensor)
        if node is not None and node.op_type == "BatchNormalization":
            node = producer.get(node.input[0])
        return node if node is not None and node.op_type in ("Conv", "Gemm", "MatMul") else None

    def attribute(event_node: str) -> str:
        if "/lrsd/" in event_node:
            return event_node.split("/lrsd/")[0]
        if event_node in names or not event_node.endswith("_nchwc"):
            return event_node
        node = producer.get(event_node[: -len("_nchwc")])
        while node is not None and node.op_type in _FUSED_AFTER_CONV:
            if node.op_type in ("Add", "Sum"):
                convs = [c for c in (conv_output(i) for i in node.input) if c is not None]
                if not convs:
                    return event_node
                node = max(convs, key=lambda c: order[id(c)])
            else:
                node = producer.get(node.input[0])
        if node is None:
            return event_node
        return node.name.split("/lrsd/")[0]

    return attribute


def layer_breakdown(original: Path, compressed: Path, report: dict, shapes: dict, batch: int, runs: int) -> dict:
    """Per-layer kernel-time ratio against MACs ratio; the two models are profiled in turn,
    3 times, and each layer's median is kept. `shapes`: weight shape per layer (inspect)."""
    dense_runs, chain_runs = [], []
    for _ in range(3):
        dense_runs.append(profile_layers(original, batch, runs))
        chain_runs.append(profile_layers(compressed, batch, runs))
    layers = {}
    for layer in report["layers"]:
        if layer["method"] == "dense":
            continue
        name = layer["name"]
        dense = [r.get(name) for r in dense_runs]
        chain = [r.get(name) for r in chain_runs]
        if None in dense or None in chain:
            continue
        d, c = statistics.median(dense), statistics.median(chain)
        shape = shapes.get(name, [])
        kernel = "x".join(map(str, shape[2:])) if len(shape) > 2 else "fc"
        layers[name] = {"method": layer["method"], "ranks": layer["ranks"], "weight_shape": shape,
                        "kernel": kernel, "positions": layer["macs_before"] // max(layer["params_before"], 1),
                        "macs": layer["macs_before"], "macs_ratio": layer["macs_after"] / layer["macs_before"],
                        "dense_us": round(d, 1), "chain_us": round(c, 1), "latency_ratio": c / d}
    total_dense = statistics.median(sum(r.values()) for r in dense_runs)
    total_chain = statistics.median(sum(r.values()) for r in chain_runs)
    return {"batch": batch, "runs": runs, "layers": layers, "kernel_total_us": [round(total_dense), round(total_chain)]}


def bench_reps(original: Path, candidate: Path, batch: int, reps: int, runs: int) -> dict:
    speedups, results = [], []
    for _ in range(reps):
        run = run_cli(["bench", original, candidate, "--threads", "2", "--batch", batch, "--runs", runs,
                       "--warmup", 3, "--json"])
        if not run.ok:
            return {"ok": False, "error": run.error}
        results.append(run.data)
        speedups.append(run.data["speedup"])
    last = results[-1]
    return {"ok": True, "batch": batch, "runs": runs, "speedups": [round(s, 3) for s in speedups],
            "speedup": statistics.median(speedups),
            "baseline_ms": statistics.median(r["baseline"]["latency"]["median_ms"] for r in results),
            "candidate_ms": statistics.median(r["candidate"]["latency"]["median_ms"] for r in results),
            "reported_batch": last["batch"], "output_error": max(last["output_errors"].values())}


def part2(workdir: Path, quick: bool) -> dict:
    log("part 2: ResNet-50 latency")
    original = write_zoo(["resnet50"], workdir)["resnet50"]
    result: dict = {"batch8_fixed_graph": batch8_on_original(original)}
    batchable = workdir / "resnet50_dyn.onnx"
    result["patched_reshapes"] = make_batchable(original, batchable)
    from onnx_lrsd.runtime.bench import make_session

    feeds = {"gpu_0/data_0": np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    a, b = (make_session(p, threads=2).run(None, feeds)[0] for p in (original, batchable))
    result["batchable_max_abs_diff_b1"] = float(np.max(np.abs(a - b)))
    inspect = run_cli(["inspect", batchable, "--json"])
    shapes = {t["name"]: t["weight_shape"] for t in inspect.data["targets"]} if inspect.ok else {}
    batches = (1, 8)
    reps = 1 if quick else 3
    runs = {1: 20 if quick else 40, 8: 5 if quick else 12}
    methods = ("auto",) if quick else METHODS
    result["methods"] = {}
    for method in methods:
        out = workdir / f"resnet50_dyn.{method}.onnx"
        args = ["compress", batchable, "-o", out, "--keep", "0.5", "--json", "-q"]
        if method != "auto":
            args += ["--method", method]
        run = run_cli(args, ONE_BLAS_THREAD)
        entry = {"compress": summarize_compress(run)}
        result["methods"][method] = entry
        if not run.ok:
            log(f"  {method}: compress failed: {run.error}")
            continue
        entry["conv_kinds"] = dict(Counter(layer["method"] for layer in run.data["layers"]))
        for batch in batches:
            entry[f"b{batch}"] = bench_reps(batchable, out, batch, reps, runs[batch])
            log(f"  {method} batch {batch}: speedup {entry[f'b{batch}'].get('speedup')} "
                f"MACs ratio {entry['compress']['macs_ratio']:.3f}")
        if not quick:
            entry["layers"] = {f"b{batch}": layer_breakdown(batchable, out, run.data, shapes, batch,
                                                            8 if batch == 1 else 3) for batch in batches}
        entry["report_layers"] = [{k: layer[k] for k in ("name", "method", "ranks", "macs_before", "macs_after")}
                                  for layer in run.data["layers"]]
    return result


# --------------------------------------------------------------------------- part 3


def part3(workdir: Path, part1_rows: list) -> dict:
    """VGG-19's keep-0.5 compress runs of part 1 (both BLAS settings), run here if part 1 did not."""
    log("part 3: VGG-19 compress time and memory")
    path = write_zoo(["vgg19"], workdir)["vgg19"]
    result = {"file_mb": round(path.stat().st_size / 2**20, 1)}
    row = next((r for r in part1_rows if r["model"] == "vgg19"), None)
    for label, key, env in (("default_blas", "compress", None), ("one_blas_thread", "compress_1blas", ONE_BLAS_THREAD)):
        if row is not None and row.get(key, {}).get("ok"):
            entry = dict(row[key])
        else:
            out = workdir / "vgg19.keep05.p3.onnx"
            entry = summarize_compress(run_cli(["compress", path, "-o", out, "--keep", "0.5", "--json", "-q"], env))
            out.unlink(missing_ok=True)
        entry["rss_over_file"] = round(entry["peak_rss_mb"] / result["file_mb"], 2)
        result[label] = entry
        log(f"  {label}: {entry['wall_s']} s, peak RSS {entry['peak_rss_mb']} MB")
    return result


# --------------------------------------------------------------------------- part 4

_SVD_PROBE = """
import time, numpy as np, scipy.linalg
a = np.random.default_rng(0).random((576, 256))
times = []
for _ in range(7):
    start = time.perf_counter()
    scipy.linalg.svd(a, full_matrices=False, lapack_driver="gesdd")
    times.append(time.perf_counter() - start)
print(float(np.median(times)))
"""


def part4(hogs_list=(0, 1)) -> dict:
    """The decomposition kernels' BLAS threading under load: the median time of the exact SVD
    `onnx_lrsd.decompose.svd._svd` runs on a 576×256 weight (a 3×3 conv of 64→256 channels),
    with the inherited OpenBLAS threads and with one, while 0 or 1 busy-loop processes of ours
    occupy cores (on top of whatever else the machine runs)."""
    log("part 4: BLAS threads under load")
    rows = []
    for hogs in hogs_list:
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(hogs)]
        try:
            time.sleep(0.5)
            row = {"busy_processes": hogs, "load_before": load_average()}
            for label, env in (("default_ms", None), ("one_thread_ms", ONE_BLAS_THREAD)):
                out = subprocess.run([sys.executable, "-c", _SVD_PROBE], capture_output=True, text=True,
                                     env=dict(os.environ, **(env or {})), timeout=600)
                row[label] = round(float(out.stdout.strip()) * 1e3, 1) if out.returncode == 0 else None
        finally:
            for proc in busy:
                proc.kill()
                proc.wait()
        rows.append(row)
        log(f"  {hogs} busy: default {row['default_ms']} ms, 1 thread {row['one_thread_ms']} ms")
    return {"svd_576x256": rows}


# --------------------------------------------------------------------------- report


def fmt(value, spec=".3f", missing="—") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [f"# Foundation benchmark{' (quick subset)' if results['quick'] else ''}", "",
             f"onnx {env['onnx']}, onnxruntime {env['onnxruntime']}, numpy {env['numpy']}, {env['cpus']} CPUs, "
             f"load average {env['load_start']} at start / {env['load_end']} at end (other jobs were running); "
             f"total {results['total_minutes']:.1f} min. Library: `onnx_lrsd` at commit "
             f"`{str(env.get('snapshot_of'))[:10]}` (a snapshot, so parallel commits cannot change it mid-run). "
             "All numbers come from `onnx-lrsd ... --json` subprocesses; peak RSS is the CLI child's own "
             "`ru_maxrss` (`os.wait4`).",
             ""]
    latest = {tuple(run["parts"]): run for run in results.get("partial_runs", [])}  # the last re-run of each
    for extra in latest.values():
        e = extra["environment"]
        lines[-1:-1] = [f"Part(s) {', '.join(map(str, extra['parts']))} re-run on commit `{str(e.get('snapshot_of'))[:10]}`, "
                        f"load average {e['load_start']} / {e.get('load_end')}."]
    rows = results.get("part1") or []
    if rows:
        lines += ["## 1. inspect and compress --keep 0.5 (data-free), full-rank round trip", "",
                  "Zoo graphs carry seeded *random* weights: their spectra are flat, so the keep-0.5 output "
                  "errors (~0.5–1) are expected and say nothing about real-weight accuracy. PP-OCRv4 has real "
                  "weights but data-free truncation still wrecks it (activation-aware fitting is "
                  "needed). `compress s` uses the inherited BLAS threading; `1-BLAS s` the same command with "
                  "`OPENBLAS_NUM_THREADS=1`. Since e364837 `compress` runs its fits under "
                  "`threadpool_limits(config.blas_threads=1)`, so the two columns should agree (part 4 shows "
                  "what that avoids).", "",
                  "| model | file MB | targets | skipped | factorized | params | MACs | file | error @0.5 "
                  "| compress s | 1-BLAS s | peak RSS MB | full-rank error | ≤1e-5 |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|"]
        for row in rows:
            ins, comp, one, full = row["inspect"], row["compress"], row["compress_1blas"], row["full_rank"]
            macs = fmt(comp.get("macs_ratio"))
            if comp.get("macs_fixed_dims"):
                macs = f"{comp['macs_fixed_dims']['ratio']:.3f}¹"
            lines.append(
                f"| {row['model']} | {row['file_mb']} | {ins.get('targets', 'fail')} | {ins.get('skipped', '—')} | "
                f"{comp.get('factorized', 'fail')}/{(comp.get('factorized') or 0) + (comp.get('dense') or 0)} | "
                f"{fmt(comp.get('params_ratio'))} | {macs} | {fmt(comp.get('size_ratio'))} | "
                f"{fmt(comp.get('output_error'), '.2f')} | {comp.get('wall_s')} | {one.get('wall_s')} | "
                f"{comp.get('peak_rss_mb')} | {fmt(full.get('max_error'), '.1e')} | "
                f"{'yes' if full.get('pass') else 'NO'} |")
        failures = [(r["model"], k, r[k].get("error")) for r in rows for k in ("inspect", "compress", "full_rank")
                    if r[k].get("error")]
        worst = max((r["full_rank"].get("max_error") or 0.0) for r in rows)
        lines += ["", f"Max full-rank round-trip error over all models: **{worst:.2e}** "
                      f"(compress's own verify and an in-process re-check on a second seeded input; "
                      f"tolerance {FULL_RANK_TOLERANCE:g}).",
                  "Ratios are after/before. `factorized` = layers factorized / targets; the rest stay dense "
                  "because no factorization at keep 0.5 cuts both params and MACs with rank ≥ 8."]
        skipped = [f"{r['model']}: " + ", ".join(f"{n}× {reason}" for reason, n in r["inspect"]["skip_reasons"].items())
                   for r in rows if r["inspect"].get("skip_reasons")]
        if skipped:
            lines.append("Skipped weight layers (most common reasons): " + "; ".join(skipped) + ".")
        if any(r["compress"].get("macs_fixed_dims") for r in rows):
            lines.append("¹ PP-OCRv4's input has symbolic height and width; the library counts them as 1 even "
                         "with `--dim` (its report says MACs ratio "
                         + ", ".join(fmt(r["compress"].get("macs_ratio")) for r in rows
                                     if r["compress"].get("macs_fixed_dims"))
                         + "), so this ratio is recomputed on a copy with the input fixed to 1×3×48×320.")
        if failures:
            lines += ["", "Failures: " + "; ".join(f"{m} {k}: {e}" for m, k, e in failures)]
        lines.append("")
    p2 = results.get("part2")
    if p2:
        lines += ["## 2. ResNet-50 latency at --keep 0.5 (2 threads)", "",
                  f"Fed a batch of 8, the zoo graph fails: `{p2['batch8_fixed_graph'][:160]}`. "
                  f"So part 2 uses a batchable copy (input dim 0 → `N`, Reshape target "
                  f"{p2['patched_reshapes']} → leading 0); at batch 1 it matches the original to "
                  f"{p2['batchable_max_abs_diff_b1']:.1e} (max abs).", "",
                  "Speedup = dense median latency / compressed median latency, median of the interleaved "
                  "`onnx-lrsd bench` runs listed; `at FLOP ratio` = latency ratio ÷ MACs ratio "
                  "(1.00 = the chain runs exactly at its FLOP ratio, >1 = slower than its FLOPs promise).", "",
                  "| method | params | MACs | batch | dense ms | compressed ms | speedup (runs) | "
                  "ideal speedup | at FLOP ratio | output error |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for method, entry in p2["methods"].items():
            comp = entry["compress"]
            if not comp.get("ok"):
                lines.append(f"| {method} | compress failed: {comp.get('error')} |||||||||")
                continue
            for key in ("b1", "b8"):
                b = entry.get(key)
                if not b:
                    continue
                if not b.get("ok"):
                    lines.append(f"| {method} | | | {key[1:]} | bench failed: {b.get('error')} ||||||")
                    continue
                lines.append(
                    f"| {method} | {comp['params_ratio']:.3f} | {comp['macs_ratio']:.3f} | {b['batch']} | "
                    f"{b['baseline_ms']:.1f} | {b['candidate_ms']:.1f} | **{b['speedup']:.2f}** "
                    f"({', '.join(f'{s:.2f}' for s in b['speedups'])}) | {1 / comp['macs_ratio']:.2f} | "
                    f"{(1 / b['speedup']) / comp['macs_ratio']:.2f} | {b['output_error']:.2f} |")
        kinds = {m: e.get("conv_kinds") for m, e in p2["methods"].items() if e.get("conv_kinds")}
        if kinds:
            lines += ["", "Layer kinds chosen: " + "; ".join(
                f"{m}: " + ", ".join(f"{k} {n}" for k, n in sorted(v.items())) for m, v in kinds.items())
                + " (of 54 targets). 1×1 convs can only be factorized as `channel` and the FC only as "
                  "`svd`: a forced `--method tucker2`/`spatial` leaves every 1×1 conv dense, and "
                  "`--method channel` leaves the FC dense."]
        breakdowns = {m: e["layers"] for m, e in p2["methods"].items() if e.get("layers")}
        if breakdowns:
            lines += ["", "### Where the chains miss their FLOP ratio (onnxruntime profile, per original layer)", "",
                      "Kernel time of each factorized layer's dense node vs its chain, summed over a group "
                      "(median of 3 alternating profiled sessions per model); `rows` = output positions × batch, "
                      "the M of the products. The whole-model row includes the unfactorized kernels "
                      "(pooling, reorders). Profiling adds a fixed cost per node, and a chain has 2–3 nodes "
                      "where the dense layer has one, so these ratios lean against the chains compared "
                      "with the `bench` speedups above.", "",
                      "| method | batch | group | layers | rows | MACs ratio | time ratio | at FLOP ratio | dense µs | chain µs |",
                      "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
            for method, per_batch in breakdowns.items():
                for brk in per_batch.values():
                    batch = brk["batch"]
                    groups: dict = {}
                    for v in brk["layers"].values():
                        key = (f"{v['method']} {v['kernel']}", v["positions"] * batch)
                        groups.setdefault(key, []).append(v)
                    for (label, rows_), group in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
                        if method != "auto" and label.endswith(("1x1", "fc")):
                            continue  # the same layers as in auto (1×1 convs can only be `channel`)
                        lines.append(_group_row(method, batch, label, group, rows_))
                    tot = brk["kernel_total_us"]
                    lines.append(f"| {method} | {batch} | whole model | | | "
                                 f"{p2['methods'][method]['compress']['macs_ratio']:.3f} | {tot[1] / tot[0]:.3f} | "
                                 f"{(tot[1] / tot[0]) / p2['methods'][method]['compress']['macs_ratio']:.2f} | "
                                 f"{tot[0]} | {tot[1]} |")
            auto_layers = breakdowns.get("auto", {})
            for brk in auto_layers.values():
                worst = sorted(brk["layers"].items(),
                               key=lambda kv: kv[1]["chain_us"] - kv[1]["macs_ratio"] * kv[1]["dense_us"],
                               reverse=True)[:6]
                lines += ["", f"auto, batch {brk['batch']}: the layers losing most time against their FLOP "
                              "ratio (excess = chain µs − MACs ratio × dense µs):", "",
                          "| layer | weight | method | ranks | rows | MACs ratio | time ratio | excess µs |",
                          "|---|---|---|---|---:|---:|---:|---:|"]
                for name, v in worst:
                    excess = v["chain_us"] - v["macs_ratio"] * v["dense_us"]
                    lines.append(f"| {name} | {'×'.join(map(str, v['weight_shape']))} | {v['method']} | "
                                 f"{'×'.join(map(str, v['ranks']))} | {v['positions'] * brk['batch']} | "
                                 f"{v['macs_ratio']:.3f} | {v['latency_ratio']:.3f} | {excess:.0f} |")
        lines.append("")
    p3 = results.get("part3")
    if p3:
        lines += ["## 3. VGG-19 `compress --keep 0.5`: time and memory", "",
                  "| BLAS threads | file MB | wall s | peak RSS MB | RSS / file | decompose s | verify s | "
                  "params | error |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for label in ("default_blas", "one_blas_thread"):
            row = p3.get(label) or {}
            t = row.get("timings", {})
            lines.append(f"| {'inherited' if label == 'default_blas' else 'OPENBLAS_NUM_THREADS=1'} | "
                         f"{p3['file_mb']} | {row.get('wall_s')} | {row.get('peak_rss_mb')} | "
                         f"{row.get('rss_over_file')} | {fmt(t.get('decompose_weights'), '.1f')} | "
                         f"{fmt(t.get('verify_outputs'), '.1f')} | {fmt(row.get('params_ratio'))} | "
                         f"{fmt(row.get('output_error'), '.2f')} |")
        lines.append("")
    p4 = results.get("part4")
    if p4:
        lines += ["## 4. BLAS threading of the decomposition kernels under load", "",
                  "Median time of one exact SVD (`scipy.linalg.svd`, gesdd) of a 576×256 matrix — the size of a "
                  "3×3 conv 64→256 — in a fresh process, with OpenBLAS's default threads (2 here) and with "
                  "`OPENBLAS_NUM_THREADS=1`, while 0 or 1 extra busy-loop processes run (plus the machine's "
                  "other jobs). This is why `compress` pins its fits to one BLAS thread (`blas_threads`, "
                  "default 1); code that calls `onnx_lrsd.decompose` directly still gets the default threads.", "",
                  "| extra busy processes | load | default threads ms | 1 thread ms | slowdown |",
                  "|---:|---:|---:|---:|---:|"]
        for row in p4["svd_576x256"]:
            slow = (row["default_ms"] / row["one_thread_ms"]) if row["default_ms"] and row["one_thread_ms"] else None
            lines.append(f"| {row['busy_processes']} | {row['load_before']} | {row['default_ms']} | "
                         f"{row['one_thread_ms']} | {fmt(slow, '.1f')}× |")
        lines.append("")
    return "\n".join(lines)


def _group_row(method: str, batch: int, label: str, group: list, rows: int) -> str:
    dense = sum(v["dense_us"] for v in group)
    chain = sum(v["chain_us"] for v in group)
    macs_ratio = sum(v["macs"] * v["macs_ratio"] for v in group) / sum(v["macs"] for v in group)
    return (f"| {method} | {batch} | {label} | {len(group)} | {rows} | {macs_ratio:.3f} | {chain / dense:.3f} | "
            f"{(chain / dense) / macs_ratio:.2f} | {dense:.0f} | {chain:.0f} |")


def environment() -> dict:
    import onnxruntime

    info = {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "cpus": os.cpu_count(), "load_start": load_average(),
            "blas_env": {k: os.environ.get(k) for k in ONE_BLAS_THREAD}}
    try:
        from benchmarks.common import machine_info
    except ImportError:
        return info
    return {**machine_info(), **info}


SNAPSHOT_ENV = "LRSD_FOUNDATION_SNAPSHOT"


def run_in_snapshot(argv: list) -> int:
    """Re-run this script on a `git archive HEAD` copy of the repository.

    Other people commit to the library while a full run (~1 h) goes on; without a snapshot,
    part 1 and part 2 could measure different code. The copy holds HEAD's library and this
    script's working-tree version; `onnx_lrsd/passes` is linked to `passes/` so the package
    resolves inside the copy (not through the editable install's mapping to the live tree).
    """
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="lrsd-snapshot-") as tmp:
        snap = Path(tmp)
        archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(snap)], input=archive, check=True)
        for name in ("foundation.py", "common.py"):
            if (ROOT / "benchmarks" / name).is_file():
                (snap / "benchmarks" / name).write_bytes((ROOT / "benchmarks" / name).read_bytes())
        (snap / "onnx_lrsd" / "passes").symlink_to(Path("..") / "passes")
        (snap / ".snapshot_commit").write_text(commit + "\n")
        env = dict(os.environ, PYTHONPATH=str(snap) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   **{SNAPSHOT_ENV: commit})
        log(f"running on a snapshot of HEAD {commit[:10]} in {snap}")
        return subprocess.run([sys.executable, "-m", "benchmarks.foundation", *argv, "--results-dir", str(RESULTS)],
                              cwd=snap, env=env).returncode


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="A ~2-minute subset.")
    parser.add_argument("--workdir", type=Path, default=None, help="Keep the model files here (default: a temp dir).")
    parser.add_argument("--parts", default="1,2,3,4", help="Comma-separated parts to run (a subset "
                        "updates those parts of the existing results file).")
    parser.add_argument("--live", action="store_true",
                        help="Measure the working tree as it is (default: a snapshot of HEAD, see run_in_snapshot).")
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if not args.live and not os.environ.get(SNAPSHOT_ENV):
        sys.exit(run_in_snapshot(argv))
    parts = {int(p) for p in args.parts.split(",")}
    import onnxruntime

    import onnx_lrsd

    onnxruntime.set_default_logger_severity(3)
    start = time.perf_counter()
    results: dict = {"quick": args.quick, "environment": environment()}
    results["environment"]["library"] = str(Path(onnx_lrsd.__file__).parent)
    results["environment"]["snapshot_of"] = os.environ.get(SNAPSHOT_ENV) or "live working tree"
    log(f"measuring onnx_lrsd from {results['environment']['library']}")
    with tempfile.TemporaryDirectory(prefix="lrsd-foundation-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        if 1 in parts:
            names = QUICK_ZOO if args.quick else ZOO
            paths = write_zoo(names, workdir)
            models = {name: (paths[name], {}) for name in names}
            models[OCR] = (ocr_path(), OCR_DIMS)
            results["part1"] = part1(models, workdir, blas_default=True)
        if 2 in parts:
            results["part2"] = part2(workdir, args.quick)
        if 3 in parts and not args.quick:
            results["part3"] = part3(workdir, results.get("part1") or [])
        if 4 in parts:
            results["part4"] = part4((0,) if args.quick else (0, 1))
    results["environment"]["load_end"] = load_average()
    results["total_minutes"] = (time.perf_counter() - start) / 60
    stem = "foundation.quick" if args.quick else "foundation"
    args.results_dir.mkdir(parents=True, exist_ok=True)
    previous = args.results_dir / f"{stem}.json"
    if parts != ALL_PARTS and previous.is_file():  # a partial run updates its parts of the last results
        merged = json.loads(previous.read_text())
        merged.setdefault("partial_runs", []).append(
            {"parts": sorted(parts), "environment": results["environment"], "minutes": results["total_minutes"]})
        merged.update({k: v for k, v in results.items() if k.startswith("part") and k != "partial_runs"})
        results = merged
    (args.results_dir / f"{stem}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    text = markdown(results)
    (args.results_dir / f"{stem}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
