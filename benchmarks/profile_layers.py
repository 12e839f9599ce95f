"""Per-layer profiles and `bench` on real models: does every kernel map back to a layer?

    python -m benchmarks.profile_layers            # all models (about 10 min on a busy 2-core box)
    python -m benchmarks.profile_layers --quick    # digits, MiniLM, ResNet-50

1. Mapping: for the digit CNN, all-MiniLM-L6-v2 (sequence 128), PP-OCRv4 recognition
   (48×320) and the 9 model-zoo graphs of the onnx wheel, and for each one's `--keep 0.5`
   compression (data-free: the chains' structure and cost, not their accuracy, matter here),
   `onnx_lrsd.runtime.profile.profile_layers` at batch 1, 2 threads, 10 runs: how many model nodes,
   executed kernels and layers; whether every node is accounted for exactly once (a layer's
   node or not executed); whether every Conv / Gemm / MatMul has time of its own (chains: under
   the layer they replace); the kernels' share of the run time.
2. `bench` (`onnx_lrsd.runtime.bench.compare_models`: warm interleaved latency, cold start and peak
   RSS in 3 fresh processes, per-layer profiles) of MiniLM against its data-aware keep-0.5
   compression (64 calibration texts) at batch 1 and 8, sequence 128, and of ResNet-50 and
   PP-OCRv4 against their keep-0.5 compressions at batch 1.

Writes `benchmarks/results/profile_layers.{json,md}`.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import onnx

import onnx_lrsd
from benchmarks.common import RESULTS_DIR, markdown_table, run_record, write_json, write_text
from onnx_lrsd.runtime.bench import compare_models
from onnx_lrsd.runtime.feeds import random_feeds
from onnx_lrsd.model.io import load_model, save_model
from onnx_lrsd.runtime.profile import WEIGHT_OPS, layer_of, name_nodes, profile_layers
from onnx_lrsd.testing.zoo import ZOO_MODELS, zoo_model

MINILM = Path(__file__).resolve().parent / "cache" / "minilm.onnx"
MINILM_DIMS = {"sequence": 128}
OCR_DIMS = {"?": 48, "p2o.DynamicDimension.1": 320}


def _models(quick: bool):
    """(name, loader, dims) of every model measured."""
    from benchmarks.tasks.ocr import rec_model_path

    yield "digit CNN", lambda: load_model(Path(__file__).resolve().parents[1] / "models" / "digits_cnn.onnx"), {}
    yield "all-MiniLM-L6-v2", lambda: load_model(_minilm_path()), MINILM_DIMS
    if not quick:
        yield "PP-OCRv4 rec", lambda: load_model(rec_model_path()), OCR_DIMS
    for name in (("resnet50",) if quick else ZOO_MODELS):
        yield name, (lambda name=name: zoo_model(name)), {}


def _minilm_path() -> Path:
    if not MINILM.is_file():
        from benchmarks.build_minilm_onnx import build

        build(MINILM)
    return MINILM


def accounting(model: onnx.ModelProto, profile) -> dict:
    named = onnx.ModelProto()
    named.CopyFrom(model)
    name_nodes(named)
    names = [n.name for n in named.graph.node]
    covered = [n for layer in profile.layers for n in layer.nodes] + list(profile.unexecuted)
    weight_layers = {layer_of(n.name) for n in named.graph.node if n.op_type in WEIGHT_OPS}
    timed = {layer.name for layer in profile.layers if layer.ms > 0}
    return {"nodes": len(names), "kernels": profile.kernels, "layers": len(profile.layers),
            "unexecuted": len(profile.unexecuted), "every_node_once": sorted(covered) == sorted(names),
            "weight_layers": len(weight_layers), "weight_layers_timed": len(weight_layers & timed),
            "kernel_share_of_run": profile.op_ms / profile.run_ms, "op_ms": profile.op_ms,
            "top": [(layer.name, layer.op, round(layer.ms, 3)) for layer in profile.layers[:3]]}


def mapping_rows(quick: bool, workdir: Path) -> tuple[list[dict], dict]:
    rows, compressed_paths = [], {}
    for name, load, dims in _models(quick):
        model = load()
        start = time.perf_counter()
        small = onnx_lrsd.compress(model, keep=0.5, verify=False, dims=tuple(dims.items())).model
        seconds = time.perf_counter() - start
        feeds = random_feeds(model, batch=1, dims=dims)
        for variant, m in (("original", model), ("keep 0.5", small)):
            profile = profile_layers(m, feeds, threads=2, runs=10)
            rows.append(dict(model=name, variant=variant, **accounting(m, profile)))
            print(f"{name} {variant}: {rows[-1]}", flush=True)
        if name in ("resnet50", "PP-OCRv4 rec"):
            paths = workdir / f"{name}.onnx", workdir / f"{name}.keep05.onnx"
            save_model(model, paths[0])
            save_model(small, paths[1])
            compressed_paths[name] = (paths, dims)
        print(f"  compressed in {seconds:.1f} s", flush=True)
    return rows, compressed_paths


def minilm_pair(workdir: Path) -> tuple[Path, Path]:
    from benchmarks.tasks.minilm import MiniLMTask

    task = MiniLMTask()
    calibration = task.calibration_feeds(64, 16)
    small = workdir / "minilm.keep05.onnx"
    onnx_lrsd.compress_file(_minilm_path(), small, keep=0.5, calibration=calibration, mask_input=task.mask_input)
    return _minilm_path(), small


def bench_rows(pairs: dict) -> list[dict]:
    rows = []
    for (name, batch), ((original, small), dims) in pairs.items():
        comparison = compare_models(original, small, threads=2, batch=batch, dims=dims, runs=30, warmup=5,
                                    profile_runs=10, cold_repeats=3)
        print(comparison.to_text(10), flush=True)
        rows.append({"model": name, "batch": batch, "dims": dims, "comparison": comparison.to_dict(),
                     "text": comparison.to_text(10)})
    return rows


def markdown(mapping: list[dict], benches: list[dict]) -> str:
    lines = ["# Per-layer profiles mapped back to the model's layers", "",
             "`python -m benchmarks.profile_layers`: onnxruntime's profiler at ORT_ENABLE_ALL, batch 1, 2 threads, "
             "10 runs; `keep 0.5` is the data-free compression. *every node once*: each model node is a profiled "
             "layer's node or listed as not executed (constant-folded), exactly once; *weight layers timed*: Conv / "
             "Gemm / MatMul layers (a chain counts as its layer) with time of their own.", ""]
    lines.append(markdown_table(
        ["model", "variant", "nodes", "kernels", "layers", "not executed", "every node once", "weight layers timed",
         "kernel time / run time", "slowest layer"],
        [[r["model"], r["variant"], r["nodes"], r["kernels"], r["layers"], r["unexecuted"],
          "yes" if r["every_node_once"] else "NO", f"{r['weight_layers_timed']} / {r['weight_layers']}",
          f"{r['kernel_share_of_run']:.3f}", f"{r['top'][0][0]} ({r['top'][0][2]} ms)"] for r in mapping],
        "llrrrrcrrl"))
    for b in benches:
        lines += ["", f"## `bench` {b['model']}, batch {b['batch']}" + (f", {b['dims']}" if b["dims"] else ""), "",
                  "```", b["text"], "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    run = run_record("benchmarks.profile_layers", sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="lrsd-profile-") as tmp:
        workdir = Path(tmp)
        mapping, pairs = mapping_rows(args.quick, workdir)
        minilm = minilm_pair(workdir)
        bench_pairs = {("all-MiniLM-L6-v2 (data-aware keep 0.5)", 1): (minilm, MINILM_DIMS),
                       ("all-MiniLM-L6-v2 (data-aware keep 0.5)", 8): (minilm, MINILM_DIMS)}
        for name, (paths, dims) in pairs.items():
            bench_pairs[(name, 1)] = (paths, dims)
        benches = bench_rows(bench_pairs)
    stem = "profile_layers.quick" if args.quick else "profile_layers"
    write_json(RESULTS_DIR / f"{stem}.json", {"run": run, "machine": run["machine"], "mapping": mapping,
                                               "bench": [{k: v for k, v in b.items() if k != "text"} for b in benches]})
    write_text(RESULTS_DIR / f"{stem}.md", markdown(mapping, benches))


if __name__ == "__main__":
    main()


# --------------------------------------------------------------------------- README


def readme_sections(data: dict) -> dict:
    """``profile_layers``: how completely the per-layer profile maps kernels to the model's nodes."""
    mapping = data["mapping"]
    complete = sum(1 for r in mapping if r["every_node_once"] and r["weight_layers_timed"] == r["weight_layers"])
    models = sorted({r["model"] for r in mapping})
    nodes = [r["nodes"] for r in mapping]
    return {"profile_layers": f"On {len(models)} models ({', '.join(models)}), original and compressed "
                              f"({len(mapping)} graphs, {min(nodes)} to {max(nodes)} nodes), {complete} of "
                              f"{len(mapping)} have every node accounted for exactly once and every Conv / Gemm / "
                              "MatMul layer (a chain as its layer) with time of its own."}
