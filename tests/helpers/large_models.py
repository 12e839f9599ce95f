"""A synthetic model of a few large Gemms written straight to external data, one layer at a
time (never the whole model in memory), and a peak-RSS probe for a subprocess.

`write_gemm_stack(directory, width, layers)` writes ``model.onnx`` + ``model.onnx.data``: x
[batch, width] → Gemm (transB) → Relu → … → y, each weight [width, width] float32 of a
decaying spectrum (so that a low-rank fit is meaningful), each bias [width].
"""
from __future__ import annotations

from pathlib import Path
from typing import Tuple

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


def layer_weight(width: int, index: int, rank: int = 64) -> np.ndarray:
    """[width, width] float32: a rank-`rank` part with a decaying spectrum plus small noise,
    built in blocks of rows so no float64 copy of the whole matrix exists."""
    rng = np.random.default_rng(index)
    left = (rng.standard_normal((width, rank)) * (0.8 ** np.arange(rank))).astype(np.float32)
    right = rng.standard_normal((rank, width)).astype(np.float32)
    weight = np.empty((width, width), np.float32)
    for start in range(0, width, 2048):
        stop = min(start + 2048, width)
        block = left[start:stop] @ right
        block += 0.01 * rng.standard_normal(block.shape, dtype=np.float32)
        weight[start:stop] = block / np.sqrt(width)
    return weight


def write_gemm_stack(directory: Path, width: int, layers: int) -> Tuple[Path, int]:
    """Write the model; returns its path and the bytes of its weights."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.onnx"
    location = path.name + ".data"
    initializers, nodes, offset = [], [], 0
    with open(directory / location, "wb") as data:
        for index in range(layers):
            for name, values in ((f"fc{index}.weight", layer_weight(width, index)),
                                 (f"fc{index}.bias", np.full(width, 0.01, np.float32))):
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
    graph = helper.make_graph(nodes, "gemm_stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])], initializers)
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
