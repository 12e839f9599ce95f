"""Models whose weights live in external data compress layer by layer through memory maps:
the peak resident set stays within the model's size plus a fixed margin, and the output is
written with external data. The >2 GB model is marked slow; CI runs a 144 MB one with the
mapping threshold lowered to reach the same code."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from helpers.large_models import PEAK_RSS_SNIPPET, write_gemm_stack

MARGIN_MB = 800
"""Interpreter and libraries (~150 MB), one layer's float64 work (8192²: 512 MB) and the
compressed weights' copies; independent of the number of layers. Measured: +204 MB for the
144 MB model alone, up to +550 MB when other tests ran before in the same session (heap
state of the machine; not understood), +768 MB for the 2.3 GB model. Before the memory maps
the 384 MB model of this kind peaked at 8.7x its size."""


QUIET_MEMORY = {"OPENBLAS_NUM_THREADS": "1", "NUMPY_MADVISE_HUGEPAGE": "0"}
"""One BLAS thread (one set of buffers), and numpy's large arrays not advised into 2 MB
transparent huge pages, which make the resident set depend on the machine's fragmentation
(one CI run measured +540 MB instead of +204 MB with them)."""


def _compress_measured(model, output, config, *args):
    argv = ["onnx-lrsd", "compress", str(model), "-o", str(output), "--keep", "0.25", "--config", str(config),
            "--json", "-q", *args]
    run = subprocess.run([sys.executable, "-c", PEAK_RSS_SNIPPET.format(argv=argv)], capture_output=True, text=True,
                         timeout=3600, env={**os.environ, **QUIET_MEMORY})
    assert run.returncode == 0, run.stderr
    peak_kb = int(next(line for line in run.stderr.splitlines() if line.startswith("PEAK_RSS_KB")).split()[1])
    return json.loads(run.stdout), peak_kb * 1024


def _check(directory, widths, map_above_mb):
    model, weight_bytes = write_gemm_stack(directory, widths)
    layers = len(widths) - 1
    config = directory / "config.json"
    config.write_text(json.dumps({"map_weights_above_mb": map_above_mb}))
    output = directory / "out" / "small.onnx"
    output.parent.mkdir()
    source_bytes = model.read_bytes(), (directory / "model.onnx.data").stat().st_size
    report, peak = _compress_measured(model, output, config)
    print(f"model {weight_bytes / 2**20:.0f} MiB, peak RSS {peak / 2**20:.0f} MiB "
          f"({peak / weight_bytes:.2f}x, {(peak - weight_bytes) / 2**20:+.0f} MiB)")
    assert peak <= weight_bytes + MARGIN_MB * 2**20
    assert (model.read_bytes(), (directory / "model.onnx.data").stat().st_size) == source_bytes
    assert sorted(p.name for p in output.parent.iterdir()) == ["small.onnx", "small.onnx.data"]
    assert all(layer["method"] == "svd" for layer in report["layers"]) and len(report["layers"]) == layers
    assert 0.2 < report["after"]["file_bytes"] / report["before"]["file_bytes"] < 0.3
    assert report["output_errors"]["y"] < 0.05  # rank-64 weights plus noise, kept at a rank above 64
    written = onnx.load(str(output), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in written.graph.initializer if t.dims[0] > 1)
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    assert np.isfinite(session.run(None, {"x": np.ones((2, widths[0]), np.float32)})[0]).all()


def test_external_data_model_compresses_within_its_size_plus_a_margin(tmp_path):
    _check(tmp_path, widths=[3072] * 5, map_above_mb=64)


@pytest.mark.slow
def test_model_over_2gb_compresses_within_its_size_plus_a_margin(tmp_path):
    """9 Gemms of 2048 × 32768, alternately widening and narrowing (2.3 GiB of float32
    weights, 256 MiB each, the size of an 8192² layer at a sixteenth of its Gram eigenproblem);
    a few minutes, ~3 GB of disk."""
    try:
        _check(tmp_path, widths=[2048, 32768] * 5, map_above_mb=1024)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)
