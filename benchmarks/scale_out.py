"""Scale-out: the same compression run locally and on Ray clusters, for wall time, driver memory
and equality of the outputs.

    python -m benchmarks.scale_out                          # loopback clusters of 1 and 2 worker nodes
    python -m benchmarks.scale_out --ray-address HOST:PORT  # an existing cluster (as many as given)
    python -m benchmarks.scale_out --models minilm --quick

Models:
- ``minilm``: all-MiniLM-L6-v2 (``benchmarks/tasks/minilm.py``; 36 MatMuls, 384/1536 wide), keep
  0.5 on 256 calibration sentences (batches of 32, attention mask): calibration shards and
  per-layer fits on the executor. ``--minilm-target-params R`` runs a global allocation instead
  (error curves and sensitivity probes on the executor too; minutes per run on 2 cores).
- ``synthetic``: a transformer generated here (seeded random weights; ``--blocks`` blocks of
  q/k/v/o 1024×1024 and FFN 1024→4096→1024 MatMuls, single-head attention, LayerNorm, plus a
  two-MatMul head: 50 MatMuls and 103M parameters at 8 blocks), keep 0.5 on 40 random sequences
  of 64 tokens (5 batches, one held out): calibration (1.4 GB of Gram statistics, twice with the
  held-out copy) and 50 whitened fits of up to 4096×1024.

Every run is a fresh subprocess (``--worker``): wall time of ``compress`` (Ray connection
included), the driver's peak RSS (``getrusage``, the process's whole life) and what compress
added to it (sampled). Without ``--ray-address`` the clusters are started on this machine's
loopback by ``benchmarks.ray_cluster``: a head with no CPUs (it holds the driver and the object
store's shared values) and 1 or 2 worker nodes of ``--cpus-per-node`` CPUs each, torn down after.
Equality against the local run: the same method and ranks for every layer, the largest
relative difference of any initializer (max |a − b| / max |a|), and the relative difference of
the two compressed models' outputs on a calibration batch.

Results: ``benchmarks/results/scale_out.{json,md}`` (``--quick``: ``scale_out.quick.*``).
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from benchmarks.common import MB, RESULTS_DIR, PeakRSS, fmt, markdown_table, max_rss_bytes, run_record, \
    write_json, write_text

LOGGER = logging.getLogger("benchmarks.scale_out")
REPO = Path(__file__).resolve().parents[1]

WIDTH, FFN, SEQ = 1024, 4096, 64

SETTINGS = {
    "minilm": {"samples": 256, "batch": 32, "options": {"keep": 0.5, "mask_input": "attention_mask"}},
    "synthetic": {"samples": 40, "batch": 8, "options": {"keep": 0.5}},
}
QUICK = {"minilm": {"samples": 64, "batch": 16}, "synthetic": {"samples": 16, "batch": 4}}


# --------------------------------------------------------------------------- the synthetic transformer


def synthetic_transformer(blocks: int = 8, seed: int = 0) -> onnx.ModelProto:
    """x [batch, seq, 1024] -> `blocks` × (single-head attention + FFN, post-LayerNorm) -> a
    two-MatMul head; MatMul weights N(0, 1/in), 6 per block + 2."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def weight(name: str, n: int, m: int) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal((n, m)) / np.sqrt(n)).astype(np.float32), name))
        return name

    def const(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def node(op: str, inputs: List[str], name: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    scale, gamma, beta = const("scale", 1 / np.sqrt(WIDTH)), const("gamma", np.ones(WIDTH)), const("beta", np.zeros(WIDTH))
    x = "x"
    for b in range(blocks):
        p = f"block{b}"
        q, k, v = (node("MatMul", [x, weight(f"{p}/W{r}", WIDTH, WIDTH)], f"{p}/{r}") for r in "qkv")
        kt = node("Transpose", [k], f"{p}/kT", perm=[0, 2, 1])
        scores = node("Mul", [node("MatMul", [q, kt], f"{p}/qk"), scale], f"{p}/scores")
        attn = node("MatMul", [node("Softmax", [scores], f"{p}/softmax", axis=-1), v], f"{p}/attn")
        o = node("MatMul", [attn, weight(f"{p}/Wo", WIDTH, WIDTH)], f"{p}/o")
        x = node("LayerNormalization", [node("Add", [x, o], f"{p}/res1"), gamma, beta], f"{p}/ln1", axis=-1)
        h = node("Relu", [node("MatMul", [x, weight(f"{p}/W1", WIDTH, FFN)], f"{p}/ffn1")], f"{p}/relu")
        f = node("MatMul", [h, weight(f"{p}/W2", FFN, WIDTH)], f"{p}/ffn2")
        x = node("LayerNormalization", [node("Add", [x, f], f"{p}/res2"), gamma, beta], f"{p}/ln2", axis=-1)
    h = node("Relu", [node("MatMul", [x, weight("head/W1", WIDTH, WIDTH)], "head/fc1")], "head/relu")
    y = node("MatMul", [h, weight("head/W2", WIDTH, WIDTH)], "head/fc2")
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, "synthetic_transformer",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", WIDTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", WIDTH])], inits)
    del y
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def synthetic_feeds(samples: int, batch: int, seed: int = 1) -> List[Dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((min(batch, samples - i), SEQ, WIDTH)).astype(np.float32)}
            for i in range(0, samples, batch)]


def model_and_feeds(name: str, samples: int, batch: int, blocks: int, work: Path):
    if name == "minilm":
        from benchmarks.tasks import get_task

        task = get_task("minilm")
        task.prepare()
        return task.model_path, task.calibration_feeds(samples, batch)
    path = work / f"synthetic_{blocks}.onnx"
    if not path.exists():
        onnx.save(synthetic_transformer(blocks), path)
    return path, synthetic_feeds(samples, batch)


# --------------------------------------------------------------------------- one run (subprocess)


def worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Compress once with spec's executor; write the model to spec["output"]."""
    import onnx_lrsd
    from onnx_lrsd.model.io import save_model

    work = Path(spec["work"])
    model_path, feeds = model_and_feeds(spec["model"], spec["samples"], spec["batch"], spec["blocks"], work)
    options = dict(SETTINGS[spec["model"]]["options"], calib_batch=spec["batch"])
    if spec["model"] == "minilm" and spec.get("target_params"):
        options = dict(options, keep=0.5, target_params=spec["target_params"])
    if spec["executor"] == "ray":
        options.update(executor="ray", ray_address=spec["address"])
    with PeakRSS() as memory:
        start = time.perf_counter()
        result = onnx_lrsd.compress(str(model_path), calibration=feeds, **options)
        seconds = time.perf_counter() - start
    save_model(result.model, Path(spec["output"]))
    timings = result.report.timings
    return {"compress_s": seconds, "driver_maxrss_mb": max_rss_bytes() / MB, **memory.to_dict(),
            "params_ratio": result.report.params_ratio, "output_errors": result.report.output_errors,
            "layers": [(layer.name, layer.method, list(layer.ranks)) for layer in result.report.layers],
            "timings": {k: round(v, 3) for k, v in timings.items()}}


def run_subprocess(spec: Dict[str, Any]) -> Dict[str, Any]:
    boot = "import sys; from benchmarks import scale_out; scale_out.main(['--worker', sys.argv[1]])"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", boot, json.dumps(spec)], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        LOGGER.error("%s run failed:\n%s", spec["label"], proc.stderr[-3000:])
        return {**spec, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    row = {**spec, **json.loads(proc.stdout.strip().splitlines()[-1]), "process_s": time.perf_counter() - start}
    LOGGER.info("%s / %s: compress %.1f s, driver peak RSS %.0f MB", spec["model"], spec["label"], row["compress_s"],
                row["driver_maxrss_mb"])
    return row


# --------------------------------------------------------------------------- equality


def compare(reference: Dict[str, Any], row: Dict[str, Any], feeds: Dict[str, np.ndarray]) -> Dict[str, Any]:
    """Same layer plans; largest relative initializer difference; relative output difference."""
    import onnxruntime as ort

    a, b = onnx.load(reference["output"]), onnx.load(row["output"])
    wa = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    wb = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    same_names = wa.keys() == wb.keys()
    weight_diff = max((float(np.max(np.abs(wa[n].astype(np.float64) - wb[n])) / max(float(np.max(np.abs(wa[n]))), 1e-30))
                       for n in wa if n in wb and wa[n].size and np.issubdtype(wa[n].dtype, np.floating)), default=0.0)
    outputs = []
    for model in (a, b):
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        outputs.append(session.run(None, {k: v for k, v in feeds.items() if k in names}))
    out_diff = max(float(np.linalg.norm(x.astype(np.float64) - y) / max(np.linalg.norm(x), 1e-30))
                   for x, y in zip(*outputs))
    return {"same_plans": reference["layers"] == row["layers"] and same_names,
            "max_weight_rel_diff": weight_diff, "output_rel_diff": out_diff}


# --------------------------------------------------------------------------- the study


def clusters(args) -> List[Dict[str, Any]]:
    """(label, address or None: start a loopback cluster of `nodes` worker nodes)."""
    if args.ray_address:
        return [{"label": f"ray {address}", "address": address, "nodes": None} for address in args.ray_address]
    return [{"label": f"ray, {n} worker node{'s' if n > 1 else ''} × {args.cpus_per_node} CPU",
             "address": None, "nodes": n} for n in args.nodes]


def study(args, model: str, work: Path) -> List[Dict[str, Any]]:
    """Every run of one model (local first in each repeat), compared with the first local run."""
    from benchmarks.ray_cluster import LoopbackCluster

    sizes = dict(SETTINGS[model], **(QUICK[model] if args.quick else {}))
    base = {"model": model, "samples": sizes["samples"], "batch": sizes["batch"], "blocks": args.blocks,
            "work": str(work), "target_params": args.minilm_target_params}
    runs = []
    for repeat in range(args.repeats):
        runs.append(run_subprocess({**base, "label": "local", "executor": "local", "address": None, "repeat": repeat,
                                    "output": str(work / f"{model}_local_{repeat}.onnx")}))
        for index, cluster in enumerate(clusters(args)):
            spec = {**base, "label": cluster["label"], "executor": "ray", "repeat": repeat,
                    "output": str(work / f"{model}_ray{index}_{repeat}.onnx")}
            if cluster["nodes"] is None:
                runs.append(run_subprocess({**spec, "address": cluster["address"]}))
                continue
            with LoopbackCluster(cluster["nodes"], cpus_per_node=args.cpus_per_node, head_cpus=0,
                                 object_store_mb=args.object_store_mb) as running:
                runs.append(run_subprocess({**spec, "address": running.address}))
    _, feeds = model_and_feeds(model, sizes["batch"], sizes["batch"], args.blocks, work)
    reference = next((r for r in runs if r["label"] == "local" and "error" not in r), None)
    for row in runs:
        if reference is not None and "error" not in row:
            row.update(compare(reference, row, feeds[0]))
    return runs


def render(rows: List[Dict[str, Any]], info: Dict[str, Any], args) -> str:
    parts = ["# Scale-out: local vs Ray", "",
             f"`python -m benchmarks.scale_out {' '.join(args.argv)}`".replace(" `", "`"), "",
             f"Machine: {info.get('cpu')}, {info.get('cores_logical')} cores, {info.get('memory_gb')} GB, load "
             f"{info.get('load_average_at_start')} at start; {info.get('date')}; Ray {info.get('ray')}, onnxruntime "
             f"{info.get('onnxruntime')}; commit {info.get('git_commit')}. One fresh process per run; wall time of `compress` (Ray connection "
             "included); driver peak RSS over the process's life (model, calibration batches and the "
             "library included) and what `compress` added to it. Equality against the local run of the "
             "same repeat: identical layer plans (method and ranks), the largest relative initializer "
             "difference and the relative output difference on a calibration batch.", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        sub = [r for r in rows if r["model"] == model]
        local = [r["compress_s"] for r in sub if r["label"] == "local" and "compress_s" in r]
        parts += [f"## {model} ({sub[0]['samples']} calibration samples, batches of {sub[0]['batch']}; "
                  f"{json.dumps(SETTINGS[model]['options'])}"
                  + (f", target_params {sub[0]['target_params']}" if model == "minilm" and sub[0].get("target_params")
                     else "") + ")", ""]
        table = []
        for r in sub:
            if "error" in r:
                table.append([r["label"], r.get("repeat"), "failed: " + r["error"], "", "", "", "", "", ""])
                continue
            t = r["timings"]
            table.append([r["label"], r["repeat"], fmt(r["compress_s"], 1),
                          fmt(r["compress_s"] / np.median(local), 2) if local else "",
                          fmt(t.get("collect_activations", 0.0), 1),
                          fmt(t.get("allocate_budget", 0.0) + t.get("reconstruct_feature_maps", 0.0)
                              + t.get("decompose_weights", 0.0), 1),
                          f"{r['driver_maxrss_mb']:.0f} / {r['rss_added_mb']:.0f}",
                          "yes" if r.get("same_plans") else "NO",
                          f"{r.get('max_weight_rel_diff', 0.0):.1e} / {r.get('output_rel_diff', 0.0):.1e}"])
        parts += [markdown_table(["executor", "repeat", "compress s", "÷ local", "calibrate s", "curves+probes+fits s",
                                  "driver peak / added MB", "same ranks", "max weight / output rel. diff"],
                                 table, "llrrrrrcr"), ""]
    return "\n".join(parts)


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,synthetic", help="comma-separated: minilm, synthetic")
    parser.add_argument("--ray-address", action="append", default=[], metavar="ADDR",
                        help="an existing Ray cluster (repeatable); default: loopback clusters on this machine")
    parser.add_argument("--nodes", default="1,2", help="worker nodes of the loopback clusters")
    parser.add_argument("--cpus-per-node", type=int, default=1)
    parser.add_argument("--object-store-mb", type=int, default=1024)
    parser.add_argument("--blocks", type=int, default=8, help="synthetic transformer blocks (6 MatMuls each, + 2)")
    parser.add_argument("--minilm-target-params", type=float, default=None, metavar="R",
                        help="MiniLM: a global allocation at this params ratio instead of keep 0.5")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="fewer calibration samples; results to *.quick.*")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.argv = argv
    args.models = [m for m in args.models.split(",") if m]
    unknown = set(args.models) - set(SETTINGS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)} (choose from {sorted(SETTINGS)})")
    args.nodes = [int(n) for n in args.nodes.split(",") if n]
    import ray

    run = run_record("benchmarks.scale_out", argv)
    info = dict(run["machine"], ray=ray.__version__)
    stem = "scale_out.quick" if args.quick else "scale_out"
    work = Path(tempfile.mkdtemp(prefix="scale_out_"))
    rows: List[Dict[str, Any]] = []
    for model in args.models:  # results written after every model
        rows += study(args, model, work)
        write_json(RESULTS_DIR / f"{stem}.json", {"run": run, "machine": info, "argv": argv, "settings": SETTINGS, "rows": rows})
        write_text(RESULTS_DIR / f"{stem}.md", render(rows, info, args))
    shutil.rmtree(work, ignore_errors=True)
    print(render(rows, info, args))


if __name__ == "__main__":
    main()


# --------------------------------------------------------------------------- README


def readme_sections(data: Dict[str, Any]) -> Dict[str, str]:
    """``scale_out``: wall time, driver memory and equality of every run against the local one."""
    table = []
    for r in data["rows"]:
        if "error" in r:
            table.append([r["model"], r["label"], "failed: " + r["error"][:80], "", "", ""])
            continue
        table.append([r["model"], r["label"], fmt(r["compress_s"], 1), f"{r['driver_maxrss_mb'] / 1024:.1f}",
                      "yes" if r.get("same_plans") else "no",
                      f"{r.get('max_weight_rel_diff', 0.0):.1e} / {r.get('output_rel_diff', 0.0):.1e}"])
    rows = {r["model"]: r for r in data["rows"]}
    described = {"minilm": "MiniLM at keep 0.5 on {samples} sentences",
                 "synthetic": "synthetic: a generated transformer of {matmuls} MatMuls at keep 0.5 on {samples} samples"}
    notes = [text.format(samples=rows[m]["samples"], matmuls=6 * rows[m]["blocks"] + 2)
             for m, text in described.items() if m in rows]
    return {"scale_out": markdown_table(["model", "run", "compress s", "driver peak RSS GB", "same ranks",
                                         "weights / outputs, relative difference to local"], table, "llrrll")
            + "\n\n" + "; ".join(notes) + ". Ray runs on loopback clusters on the same 2-core machine, where no "
              "real speedup is possible (the local run already uses both cores)."}
