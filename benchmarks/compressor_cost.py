"""The compressor's own cost: wall time and peak memory of `compress` per model, BEFORE (the
exact-SVD path of an older commit) and AFTER (this checkout), in the same run on the same
machine; plus the time of one truncated SVD against layer size, by solver.

Models: every zoo graph of the onnx wheel data-free at keep 0.5, PP-OCRv4 rec data-free at keep
0.5 (its symbolic dims from a real line), MiniLM data-aware at keep 0.5 with 256 calibration
sentences (mask ``attention_mask``). Every compress runs in its own subprocess (peak RSS is the
child's VmHWM), BEFORE and AFTER interleaved model by model, each stopped after
``--cap`` seconds (reported as "> cap"). BEFORE runs another checkout (``--before``, a worktree
of the older commit with its own venv); AFTER this one.

Layer sizes: one `truncated_svd` of a seeded Gaussian matrix (a flat spectrum, the hardest case
for a truncated solver) of the shapes of real zoo layers, at the keep-0.5 rank r = nm/(2(n+m)),
by the exact solver (LAPACK gesdd, as before) and auto (the Gram solver), each in a subprocess
with one BLAS thread (the library's default) and the same cap.

    python -m benchmarks.compressor_cost --before 4145c4a [--cap 420] [--quick]
    python -m benchmarks.compressor_cost --before /path/to/checkout-with-.venv

``--before COMMIT`` exports that commit (``git archive``) into a temporary directory and installs it
into a venv there over the system site-packages (no network); ``--before DIR`` uses a checkout
with its own ``.venv``. Writes benchmarks/results/compressor_cost{,.quick}.json (with the run
record, `benchmarks.common.run_record`), .md and _layers.png. The machine is shared with other
jobs: the load average is recorded before every measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
KEEP = 0.5
MINILM_SENTENCES = 256
MINILM_BATCH = 32
ZOO = ("bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet", "squeezenet",
       "vgg19", "zfnet512")
QUICK_ZOO = ("squeezenet", "resnet50")
LAYER_SHAPES = ((576, 64), (2304, 256), (4608, 512), (1024, 4096), (4096, 4096), (9216, 4096), (25088, 4096))
QUICK_LAYER_SHAPES = ((576, 64), (2304, 256), (4608, 512))
LAYER_REPEATS = 3
REPEAT_BELOW_S = 20.0
TARGETS_S = {"resnet50": 20.0, "minilm_256": 30.0}
ZOO_TARGET_S = 60.0


# --------------------------------------------------------------------------- children (stdlib + onnx_lrsd only)


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM: reset by exec, unlike ru_maxrss, which keeps
    the forking parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child_compress(spec: dict) -> dict:
    """Compress spec['model'] as spec says; the wall time of `compress_file` and this process's peak RSS."""
    import numpy as np

    from onnx_lrsd.api import compress_file

    calibration = None
    if spec.get("calib"):
        with np.load(spec["calib"]) as data:
            count = int(data["count"])
            calibration = [{k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(f"{i}/")}
                           for i in range(count)]
    options = dict(spec.get("options", {}))
    from onnx_lrsd.config import CompressConfig

    if "accept_error" in CompressConfig.__dataclass_fields__:
        options["accept_error"] = True  # seeded zoo weights have flat spectra: large errors are expected
    if "dims" in options:
        options["dims"] = tuple(tuple(d) for d in options["dims"])
    start = time.perf_counter()
    result = compress_file(spec["model"], spec["output"], calibration=calibration, **options)
    seconds = time.perf_counter() - start
    report = result.report
    return {"seconds": seconds, "peak_rss_mb": _peak_rss_mb(),
            "params_ratio": report.params_ratio, "output_error": max(report.output_errors.values(), default=None)}


def _child_svd(spec: dict) -> dict:
    """Time one truncated SVD of a seeded Gaussian [n, m] matrix at rank r by spec['solver']."""
    import numpy as np

    from onnx_lrsd.decompose import truncated_svd
    from onnx_lrsd.plan.factorize import low_rank

    n, m, r = spec["n"], spec["m"], spec["rank"]
    w = np.random.default_rng(0).standard_normal((n, m)) / np.sqrt(n)
    start = time.perf_counter()
    if spec["solver"] == "before":
        low_rank(w, r)  # the older checkout: its only path (exact, randomized above 2048 at low rank)
    else:
        truncated_svd(w, r, spec["solver"])
    return {"seconds": time.perf_counter() - start,
            "peak_rss_mb": _peak_rss_mb()}


def _child(path: str) -> None:
    spec = json.loads(Path(path).read_text())
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas") if spec["kind"] == "svd" else _null():
        out = _child_compress(spec) if spec["kind"] == "compress" else _child_svd(spec)
    print("RESULT " + json.dumps(out), flush=True)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------- driver


def _run_child(python: str, spec: dict, cap: float, workdir: Path) -> dict:
    """Run one child; {"seconds", "peak_rss_mb", ...} or {"capped": cap} / {"failed": message}."""
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    load = os.getloadavg()[0]
    start = time.perf_counter()
    try:
        done = subprocess.run([python, str(HERE / "compressor_cost.py"), "--child", str(spec_path)], cwd=workdir,
                              capture_output=True, text=True, timeout=cap)
    except subprocess.TimeoutExpired:
        return {"capped": cap, "load_before": load}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"failed": f"exit {done.returncode}: {tail[:200]}", "load_before": load}
    out = json.loads(lines[-1][len("RESULT "):])
    out.update(load_before=load, process_s=time.perf_counter() - start)
    return out


def _save_feeds(feeds: list, path: Path) -> None:
    import numpy as np

    arrays = {f"{i}/{k}": v for i, feed in enumerate(feeds) for k, v in feed.items()}
    np.savez(path, count=np.array(len(feeds)), **arrays)


def _before_checkout(before: str, workdir: Path) -> tuple[str, str]:
    """The python of the BEFORE code and its short commit: ``before`` is a checkout with its own
    ``.venv``, or a commit of this repository, exported into ``workdir`` and run by this python
    with the export first on its path (``passes/`` linked as ``onnx_lrsd/passes``, as setup.cfg's
    ``package_dir`` installs it; nothing installed, no network)."""
    if Path(before).is_dir():
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=before, capture_output=True,
                                text=True).stdout.strip()
        return str(Path(before) / ".venv" / "bin" / "python"), commit
    repo = HERE.parent
    resolved = subprocess.run(["git", "rev-parse", "--short", f"{before}^{{commit}}"], cwd=repo, capture_output=True,
                              text=True)
    if resolved.returncode:
        raise SystemExit(f"--before {before}: neither a directory nor a commit of {repo}")
    commit, checkout = resolved.stdout.strip(), workdir / "before"
    checkout.mkdir()
    archive = subprocess.run(["git", "archive", commit], cwd=repo, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(checkout)], input=archive, check=True)
    if (checkout / "passes").is_dir() and not (checkout / "onnx_lrsd" / "passes").exists():
        (checkout / "onnx_lrsd" / "passes").symlink_to(checkout / "passes", target_is_directory=True)
    python = workdir / "before_python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH="{checkout}" exec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    return str(python), commit


def _models(workdir: Path, zoo: tuple[str, ...], with_tasks: bool) -> list[dict]:
    """(name, model path, options, calibration file) of every measured model."""
    import onnx

    sys.path.insert(0, str(HERE.parent))
    from onnx_lrsd.testing.zoo import zoo_model

    models = []
    for name in zoo:
        path = workdir / f"{name}.onnx"
        onnx.save(zoo_model(name, seed=0), str(path))
        models.append({"name": name, "model": str(path), "options": {"keep": KEEP}, "calib": None,
                       "what": "zoo graph, seeded weights, data-free"})
    if not with_tasks:
        return models
    from benchmarks.data_aware import symbolic_dims
    from benchmarks.tasks.minilm import MiniLMTask
    from benchmarks.tasks.ocr import OcrRecTask

    ocr = OcrRecTask()
    ocr.prepare()
    dims = symbolic_dims(ocr.model_path, ocr.latency_feeds(1))
    models.append({"name": "ppocr_v4_rec", "model": str(ocr.model_path), "options": {"keep": KEEP, "dims": dims},
                   "calib": None, "what": "PP-OCRv4 rec (real weights), data-free"})
    minilm = MiniLMTask()
    minilm.prepare()
    feeds = minilm.calibration_feeds(MINILM_SENTENCES, MINILM_BATCH)
    calib = workdir / "minilm_calib.npz"
    _save_feeds(feeds, calib)
    models.append({"name": "minilm_256", "model": str(minilm.model_path), "calib": str(calib),
                   "options": {"keep": KEEP, "mode": "independent", "mask_input": minilm.mask_input},
                   "what": f"all-MiniLM-L6-v2 (real weights), data-aware, {MINILM_SENTENCES} sentences"})
    return models


def _cell(run: dict) -> str:
    if "capped" in run:
        return f"> {run['capped']:.0f}"
    if "failed" in run:
        return "failed"
    return f"{run['seconds']:.1f}"


def _mem(run: dict) -> str:
    return f"{run['peak_rss_mb']:.0f}" if "peak_rss_mb" in run else ""


def _verdict(m: dict):
    """(before, after, speedup text, the issue's target in s or None, "yes"/"no"/"") of one model."""
    b, a = m["before"], m["after"]
    speedup = f"{b['seconds'] / a['seconds']:.1f}×" if "seconds" in b and "seconds" in a else (
        f"> {b['capped'] / a['seconds']:.1f}×" if "capped" in b and "seconds" in a else "")
    target = TARGETS_S.get(m["name"], ZOO_TARGET_S if m["name"] in ZOO else None)
    met = "" if target is None or "seconds" not in a else ("yes" if a["seconds"] <= target else "no")
    return b, a, speedup, target, met


def render(data: dict) -> str:
    from benchmarks.common import markdown_table

    rows = []
    for m in data["models"]:
        b, a, speedup, target, met = _verdict(m)
        rows.append([m["name"], m["what"], f"{m['weight_params'] / 1e6:.1f}" if m.get("weight_params") else "",
                     _cell(b), _mem(b), _cell(a), _mem(a), speedup,
                     f"{target:.0f}" if target else "", met, f"{m['after'].get('load_before', 0):.1f}"])
    layer_rows = []
    for l in data["layers"]:
        runs = l["runs"]
        layer_rows.append([f"{l['n']}×{l['m']}", l["rank"], _cell(runs["before"]), _cell(runs["exact"]),
                           _cell(runs["auto"]), _mem(runs["before"]), _mem(runs["auto"])])
    machine = data["machine"]
    command = data["run"]["command"] if data.get("run") else data["command"]
    return "\n".join([
        "# Compressor cost: time and peak memory of `compress` before and after",
        "",
        f"Commit {machine['git_commit']} (AFTER); BEFORE is commit {data['before_commit']} "
        f"(`{data['before']}`). Command: `{command}`. Date {machine['date']}; "
        f"{machine['cores_logical']} cores, {machine['cpu']}, {machine['memory_gb']} GB. "
        f"**The machine was shared with other jobs** (load average at start "
        f"{machine['load_average_at_start']}; the last column gives the 1-min load before each AFTER run): "
        "absolute times are inflated and noisy, BEFORE and AFTER ran interleaved so they saw similar load.",
        "",
        f"Each compress ran in its own process (peak RSS = the child's VmHWM), stopped after {data['cap']:.0f} s "
        "(\"> cap\"). Library defaults otherwise (`blas_threads` 1, one process). Keep 0.5 everywhere."
        + ("" if data.get("complete") else " **The run was stopped before the end: only the rows below were "
                                           "measured.**"),
        "",
        markdown_table(["model", "what", "weights M", "before s", "before MB", "after s", "after MB", "speedup",
                        "target s", "met", "load"], rows, "lllrrrrrrll"),
        "",
        "## One truncated SVD against layer size",
        "",
        "Seeded Gaussian [n, m] (flat spectrum), keep-0.5 rank r = nm / (2(n+m)), one BLAS thread, own process; "
        f"the fastest of {LAYER_REPEATS} runs where a run took under {REPEAT_BELOW_S:.0f} s. "
        f"Stopped after {data.get('layer_cap', data['cap']):.0f} s. `before`: the older checkout's `low_rank` (exact gesdd; randomized above 2048 at r ≤ min/4); `exact`: "
        "this checkout's exact solver; `auto`: the Gram solver (eigh of the small side's Gram). Plot: "
        f"`{data['plot']}`.",
        "",
        markdown_table(["layer n×m", "rank", "before s", "exact s", "auto s", "before MB", "auto MB"], layer_rows,
                       "lrrrrrr"),
        "",
    ])


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for solver, style in (("before", "o-"), ("exact", "s--"), ("auto", "^-")):
        xs, ys = [], []
        for l in data["layers"]:
            run = l["runs"][solver]
            if "seconds" in run:
                xs.append(l["n"] * l["m"])
                ys.append(run["seconds"])
        ax.loglog(xs, ys, style, label=solver)
        capped = [l["n"] * l["m"] for l in data["layers"] if "capped" in l["runs"][solver]]
        if capped:
            ax.loglog(capped, [data.get("layer_cap", data["cap"])] * len(capped), "x", color=ax.lines[-1].get_color())
    ax.set_xlabel("layer size n·m (weights)")
    ax.set_ylabel("one truncated SVD at keep 0.5 (s)")
    ax.set_title("Compressor cost against layer size (x: stopped at the cap)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def readme_sections(data: dict) -> dict[str, str]:
    """``compressor_cost``: per model the wall time and peak RSS of `compress` BEFORE and AFTER,
    the speedup and the issue's target; then one truncated SVD against layer size by solver."""
    from benchmarks.common import markdown_table

    rows = []
    for m in data["models"]:
        b, a, speedup, target, met = _verdict(m)
        rows.append([m["name"], m["what"], f"{_cell(b)} / {_mem(b) or '–'}", f"{_cell(a)} / {_mem(a) or '–'}", speedup,
                     f"{target:.0f}" if target else "", met, f"{a.get('load_before', 0):.1f}"])
    layers = [[f"{l['n']}×{l['m']}", l["rank"], *(_cell(l["runs"][k]) for k in ("before", "exact", "auto")),
               f"{_mem(l['runs']['before']) or '–'} / {_mem(l['runs']['auto']) or '–'}"] for l in data["layers"]]
    quick = "--quick" in (data.get("argv") or data.get("command", "").split())
    expected = [*(QUICK_ZOO if quick else ZOO), *(() if quick else ("ppocr_v4_rec", "minilm_256")),
                *(f"{n}×{m}" for n, m in (QUICK_LAYER_SHAPES if quick else LAYER_SHAPES))]
    measured = {m["name"] for m in data["models"]} | {f"{l['n']}×{l['m']}" for l in data["layers"]}
    missing = [name for name in expected if name not in measured]
    stopped = f" **Not measured in this run: {', '.join(missing)}.**" if missing else ""
    return {"compressor_cost": "\n\n".join([
        f"BEFORE: commit `{data['before_commit']}` (exact SVD); AFTER: the commit above, interleaved model by model "
        f"in the same run, each `compress` in its own process (peak RSS: the child's VmHWM), keep 0.5, library "
        f"defaults (`blas_threads` 1), stopped after {data['cap']:.0f} s (\"> cap\"). The machine is shared with "
        f"other jobs: load average at start {data['machine']['load_average_at_start']}, the last column the 1-min "
        "load before each AFTER run; absolute times grow with it." + stopped,
        markdown_table(["model", "what", "before s / MB", "after s / MB", "speedup", "target s", "met",
                        "load before AFTER"], rows, "llrrrrlr"),
        "One truncated SVD of a seeded Gaussian [n, m] at the keep-0.5 rank, one BLAS thread, own process, "
        f"stopped after {data.get('layer_cap', data['cap']):.0f} s: `before` the older checkout's `low_rank`, "
        "`exact` this checkout's exact solver, `auto` the Gram solver (plot: `benchmarks/results/"
        f"{data['plot']}`).",
        markdown_table(["layer n×m", "rank", "before s", "exact s", "auto s", "peak MB before / auto"], layers,
                       "lrrrrr")])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--before", help="the older commit, or a checkout of it with its own .venv")
    parser.add_argument("--cap", type=float, default=420.0, help="seconds before a run is stopped")
    parser.add_argument("--layer-cap", type=float, default=240.0, help="the cap of one layer's SVD")
    parser.add_argument("--quick", action="store_true", help="two zoo graphs and three layer sizes")
    parser.add_argument("--render", type=Path, help="only write the .md and plot of this results .json (a run "
                                                    "stopped early: what it measured)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child)
        return
    if args.render:
        sys.path.insert(0, str(HERE.parent))
        from benchmarks.common import write_text

        data = json.loads(args.render.read_text())
        plot(data, args.render.with_name(data["plot"]))
        write_text(args.render.with_suffix(".md"), render(data))
        return
    if args.before is None:
        parser.error("--before is required")
    sys.path.insert(0, str(HERE.parent))
    from benchmarks.common import RESULTS_DIR, run_record, write_json, write_text

    suffix = ".quick" if args.quick else ""
    out_json = RESULTS_DIR / f"compressor_cost{suffix}.json"
    plot_path = RESULTS_DIR / f"compressor_cost{suffix}_layers.png"
    run = run_record("benchmarks.compressor_cost", argv)
    with tempfile.TemporaryDirectory(prefix="compressor_cost_") as tmp:
        workdir = Path(tmp)
        after_python = sys.executable
        before_python, before_commit = _before_checkout(args.before, workdir)
        data = {"argv": argv, "run": run, "machine": run["machine"], "before": args.before,
                "before_commit": before_commit, "cap": args.cap, "layer_cap": args.layer_cap, "plot": plot_path.name,
                "models": [], "layers": []}
        for model in _models(workdir, QUICK_ZOO if args.quick else ZOO, not args.quick):
            import onnx

            proto = onnx.load(model["model"], load_external_data=False)
            entry = {"name": model["name"], "what": model["what"],
                     "weight_params": sum(int(__import__("numpy").prod(i.dims)) for i in proto.graph.initializer)}
            del proto
            for label, python in (("before", before_python), ("after", after_python)):
                spec = {"kind": "compress", "model": model["model"], "output": str(workdir / f"{label}.onnx"),
                        "options": model["options"], "calib": model["calib"]}
                entry[label] = _run_child(python, spec, args.cap, workdir)
                print(f"{model['name']} {label}: {_cell(entry[label])} s, {_mem(entry[label])} MB", flush=True)
                for leftover in workdir.glob(f"{label}.onnx*"):
                    leftover.unlink()
            data["models"].append(entry)
            write_json(out_json, data)
        shapes = QUICK_LAYER_SHAPES if args.quick else LAYER_SHAPES
        for n, m in shapes:
            rank = n * m // (2 * (n + m))
            runs = {}
            for solver, python in (("before", before_python), ("exact", after_python), ("auto", after_python)):
                spec = {"kind": "svd", "n": n, "m": m, "rank": rank, "solver": solver}
                runs[solver] = _run_child(python, spec, args.layer_cap, workdir)
                for _ in range(LAYER_REPEATS - 1):  # the fastest of a few: the load comes and goes
                    if runs[solver].get("seconds", args.layer_cap) > REPEAT_BELOW_S:
                        break
                    again = _run_child(python, spec, args.layer_cap, workdir)
                    if again.get("seconds", args.layer_cap) < runs[solver]["seconds"]:
                        runs[solver] = again
                print(f"svd {n}x{m} r={rank} {solver}: {_cell(runs[solver])}", flush=True)
            data["layers"].append({"n": n, "m": m, "rank": rank, "runs": runs})
            write_json(out_json, data)
    data["complete"] = True
    plot(data, plot_path)
    write_json(out_json, data)
    write_text(out_json.with_suffix(".md"), render(data))
    print(f"wrote {out_json}, {out_json.with_suffix('.md')} and {plot_path}")


if __name__ == "__main__":
    main()
