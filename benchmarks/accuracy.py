"""Test accuracy of digit-CNN models on the committed MNIST-5k test set.

    python -m benchmarks.accuracy models/digits_cnn.onnx out/digits_cnn_lrsd.onnx
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnxruntime as ort

TEST_SET = Path(__file__).resolve().parent.parent / "models" / "digits_test.npz"


def accuracy(model: Path, images: np.ndarray, labels: np.ndarray) -> float:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: images})[0]
    return float((logits.argmax(axis=1) == labels).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path)
    args = parser.parse_args()
    data = np.load(TEST_SET)
    for model in args.models:
        print(f"{model}: test accuracy {accuracy(model, data['input'], data['label']):.4f} "
              f"on {len(data['label'])} MNIST-5k test images")


if __name__ == "__main__":
    main()
