"""Common interface of the benchmark tasks.

A :class:`Task` couples one real ONNX model with real data: calibration feeds drawn from data
disjoint from the evaluation set, a deterministic task metric that can score any model with the
same inputs and outputs (for example a compressed copy), and a realistic batch for latency
measurements.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

LOGGER = logging.getLogger(__name__)

#: Root of the repository (``benchmarks/tasks/base.py`` -> repo root).
REPO_ROOT: Path = Path(__file__).resolve().parents[2]
#: Git-ignored directory for models and data derived at run time.
CACHE_DIR: Path = REPO_ROOT / "benchmarks" / "cache"
#: Threads used by every evaluation session, so that metrics and timings are comparable.
EVAL_THREADS: int = 2
#: Evaluation splits: ``test`` is what benchmarks report; ``search`` is disjoint from it and from
#: calibration, for a search that picks a model by its metric (which must never see ``test``).
SPLITS: tuple[str, ...] = ("test", "search")


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; one of {', '.join(SPLITS)}")


def make_session(model_path: Path, threads: int = EVAL_THREADS) -> ort.InferenceSession:
    """Create a CPU onnxruntime session for evaluation.

    Spinning is disabled so that an evaluation session does not steal the other core from
    sessions that a benchmark keeps alive at the same time.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def batch_slices(n_items: int, batch_size: int) -> list[slice]:
    """Consecutive slices of at most ``batch_size`` items covering ``range(n_items)``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [slice(start, min(start + batch_size, n_items)) for start in range(0, n_items, batch_size)]


@dataclass
class Task(ABC):
    """A real model with a real task.

    Attributes:
        name: Registry name of the task (``"digits_cnn"``, ``"ppocr_rec"``, ``"minilm"``).
        model_path: The original ONNX model; it exists once :meth:`prepare` has run.
        mask_input: For token models, the input whose zeros mark padding positions (so that
            calibration statistics can drop them); ``None`` for other models.
    """

    name: str
    model_path: Path
    mask_input: str | None = None

    @abstractmethod
    def prepare(self) -> None:
        """Build or locate the model and any cached data; idempotent."""

    @abstractmethod
    def calibration_feeds(self, n_samples: int, batch_size: int) -> list[dict[str, np.ndarray]]:
        """Feed dicts for onnxruntime built from data disjoint from the evaluation data.

        Args:
            n_samples: Total number of samples over all feeds.
            batch_size: Samples per feed (the last feed may be smaller).
        """

    @abstractmethod
    def evaluate(self, model_path: Path, split: str = "test") -> dict[str, float]:
        """Task metrics of ``model_path`` (same inputs/outputs as the original) in onnxruntime,
        on the ``test`` split (reported) or the disjoint ``search`` split (see `SPLITS`)."""

    @abstractmethod
    def latency_feeds(self, batch: int) -> dict[str, np.ndarray]:
        """A realistic input batch of ``batch`` samples for timing."""
