"""A synthetic model of a few large Gemms written straight to external data, one layer at a
time (never the whole model in memory), and a peak-RSS probe for a subprocess.

`write_gemm_stack(directory, widths)` writes ``model.onnx`` + ``model.onnx.data``: x
[batch, widths[0]] → Gemm (transB) → Relu → … → y [batch, widths[-1]], layer i's weight
[widths[i+1], widths[i]] float32 of a decaying spectrum (so that a low-rank fit is
meaningful), its bias [widths[i+1]].
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper

ALIGN = 4096
"""External tensors start at page boundaries (onnxruntime maps aligned ones)."""


def _external(name: str, dims, location: str, offset: int, length: int) -> onnx.TensorProto:
    tensor = onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(dims),
                              data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def layer_weight(rows: int, cols: int, index: int, rank: int = 64) -> np.ndarray:
    """[rows, cols] float32: a rank-`rank` part with a decaying spectrum plus small noise,
    built in blocks of rows so no float64 copy of the whole matrix exists."""
    rng = np.random.default_rng(index)
    left = (rng.standard_normal((rows, rank)) * (0.8 ** np.arange(rank))).astype(np.float32)
    right = rng.standard_normal((rank, cols)).astype(np.float32)
    weight = np.empty((rows, cols), np.float32)
    for start in range(0, rows, 2048):
        stop = min(start + 2048, rows)
        block = left[start:stop] @ right
        block += 0.01 * rng.standard_normal(block.shape, dtype=np.float32)
        weight[start:stop] = block / np.sqrt(cols)
    return weight


def write_gemm_stack(directory: Path, widths: Sequence[int]) -> Tuple[Path, int]:
    """Write the model; returns its path and the bytes of its weights."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.onnx"
    location = path.name + ".data"
    initializers, nodes, offset = [], [], 0
    with open(directory / location, "wb") as data:
        layers = len(widths) - 1
        for index, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
            for name, values in ((f"fc{index}.weight", layer_weight(fan_out, fan_in, index)),
                                 (f"fc{index}.bias", np.full(fan_out, 0.01, np.float32))):
                pad = -offset % ALIGN
                data.write(b"\0" * pad)
                offset += pad
                data.write(values.tobytes())
                initializers.append(_external(name, values.shape, location, offset, values.nbytes))
                offset += values.nbytes
                del values
            source = "x" if index == 0 else f"act{index - 1}"
            last = index == layers - 1
            out = "y" if last else f"pre{index}"
            nodes.append(helper.make_node("Gemm", [source, f"fc{index}.weight", f"fc{index}.bias"], [out],
                                          name=f"fc{index}", transB=1))
            if not last:
                nodes.append(helper.make_node("Relu", [out], [f"act{index}"], name=f"relu{index}"))
    graph = helper.make_graph(nodes, "gemm_stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", widths[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", widths[-1]])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnx_lrsd-tests")
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path, offset


PEAK_RSS_SNIPPET = """
import resource, sys, runpy
sys.argv = {argv!r}
try:
    runpy.run_module("onnx_lrsd.cli", run_name="__main__")
except SystemExit as exc:
    code = exc.code
else:
    code = 0
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""
"""Runs the CLI in a fresh interpreter and prints its peak RSS (kB, Linux) on stderr."""
