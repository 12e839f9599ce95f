"""A build step: compress to a latency target and fail the build when the metric drops too far.

    python examples/pipeline_gate.py model.onnx small.onnx --calib calib.npz --test test.npz \
        [--speedup 1.3] [--max-drop 0.01]

Exit 0 with the compressed model written when the metric of the compressed model is at most
`--max-drop` below the original's; exit 1 (and no model left behind) otherwise, so a CI job
fails. Copy it and replace `accuracy` with your metric (higher is better) and the .npz files
with your data: calibration data to fit the layers, and test data the compressor never saw.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import onnxruntime as ort

import onnx_lrsd


def accuracy(model_path: str, test_path: str) -> float:
    """Top-1 accuracy on the test .npz: arrays named after the inputs, plus `label`."""
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    with np.load(test_path) as data:
        feeds = {i.name: data[i.name] for i in session.get_inputs()}
        labels = data["label"]
    logits = session.run(None, feeds)[0]
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("output")
    parser.add_argument("--calib", required=True, help="calibration .npz (arrays named after the inputs)")
    parser.add_argument("--test", required=True, help="held-out test .npz (inputs and `label`)")
    parser.add_argument("--speedup", type=float, default=1.3, help="wanted speedup in onnxruntime")
    parser.add_argument("--max-drop", type=float, default=0.01, help="largest accepted metric drop")
    args = parser.parse_args(argv)

    try:
        result = onnx_lrsd.compress_file(args.model, args.output, calibration=[args.calib],
                                         target_latency=args.speedup)
    except onnx_lrsd.LrsdError as exc:
        print(f"FAIL: {exc}", file=sys.stderr)
        return 1
    before, after = accuracy(args.model, args.test), accuracy(args.output, args.test)
    allocation = result.report.allocation
    speedup = allocation.measured_speedup if allocation is not None else None
    print(f"params {result.report.params_ratio:.3f}, speedup {speedup or float('nan'):.2f}x, "
          f"accuracy {before:.4f} -> {after:.4f}")
    if before - after > args.max_drop:
        os.remove(args.output)
        print(f"FAIL: accuracy dropped by {before - after:.4f} (> {args.max_drop}); {args.output} removed",
              file=sys.stderr)
        return 1
    print(f"OK: wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
