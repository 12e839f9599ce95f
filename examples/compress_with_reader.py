"""Compress a model you bring, fitted on your own data through a CalibrationDataReader.

    python examples/compress_with_reader.py model.onnx small.onnx --data samples.npz [--keep 0.5]

Copy this file and change `NpzReader` to read your data: any object with `get_next()` that
returns one feed dict {input name: array} per call and None at the end works (onnxruntime's
`CalibrationDataReader` protocol, so readers written for static quantization work as they are).
A few hundred samples like the ones the model will see are enough; the last batches are held
out and the output error is measured on them.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

import onnx_lrsd


class NpzReader(CalibrationDataReader):
    """Feed dicts of `batch` samples from an .npz file whose arrays are named after the model's
    inputs (samples along axis 0); other arrays (labels) are ignored."""

    def __init__(self, path: str, input_names: list[str], batch: int = 16, limit: int | None = None):
        with np.load(path) as data:
            missing = [name for name in input_names if name not in data.files]
            if missing:
                raise SystemExit(f"{path} has no array named {', '.join(missing)} (it has {', '.join(data.files)})")
            arrays = {name: data[name][:limit] for name in input_names}
        count = len(next(iter(arrays.values())))
        self._batches = iter([{name: a[i:i + batch] for name, a in arrays.items()} for i in range(0, count, batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def input_names(model_path: str) -> list[str]:
    """The model's real inputs (initializers listed as inputs excluded)."""
    import onnx

    model = onnx.load(model_path, load_external_data=False)
    constants = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in constants]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("output")
    parser.add_argument("--data", required=True, help=".npz with one array per model input, samples along axis 0")
    parser.add_argument("--keep", type=float, default=0.5, help="fraction of each layer's parameters kept")
    parser.add_argument("--samples", type=int, default=256, help="calibration samples used")
    args = parser.parse_args(argv)

    reader = NpzReader(args.data, input_names(args.model), limit=args.samples)
    try:
        result = onnx_lrsd.compress_file(args.model, args.output, calibration=reader, keep=args.keep)
    except onnx_lrsd.LrsdError as exc:  # bad model or data, nothing to compress, error too large
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    print(result.report.to_text())
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
