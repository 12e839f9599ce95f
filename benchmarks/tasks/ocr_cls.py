"""``ppocr_cls``: PP-OCR text-direction classification (upright or turned 180°) of rendered lines.

Model: ``models/ch_ppocr_mobile_v2.0_cls_infer.onnx`` from the ``rapidocr_onnxruntime`` wheel, a
trained MobileNetV3-small-style classifier (depthwise convs, squeeze-excitation, hard-swish,
residual Adds) with two classes ``['0', '180']``. Its declared batch dim is ``-1``, which ONNX
does not allow, and its height and width are both named ``?``; `prepare` writes a copy with the
symbolic dims ``batch``, ``height``, ``width`` (nothing else changed) to
``benchmarks/cache/ppocr_cls.onnx``.

Data: text lines rendered as for the PP-OCR recognition task (``benchmarks.tasks.ocr``:
``make_text`` / ``render_line``, DejaVu fonts), the odd-numbered lines of a set turned by 180°,
preprocessed as RapidOCR's ``TextClassifier`` does (resize to height 48 keeping the aspect ratio,
width capped at 192 — OpenCV bilinear reproduced in numpy —, ``(x / 255 - 0.5) / 0.5``, right zero
padding to 192).

- ``normal`` evaluation set: 400 lines, words from scikit-learn's dataset descriptions, clean
  28-34 px fonts;
- ``hard`` evaluation set: 400 lines of the same text source in small, low-contrast, blurred,
  noisy print (the recognition task's hard style);
- ``search`` split: the same two styles with other seeds (200 lines each);
- calibration: words from Python standard-library docstrings, another seed, normal and hard
  styles alternating, both orientations.

Metrics: ``acc`` / ``acc_hard``: share of lines whose predicted direction (argmax) is the true
one; ``agree`` / ``agree_hard``: share of lines on which the model answers as the original
model does.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from benchmarks.tasks.base import CACHE_DIR, Task, batch_slices, check_split, make_session
from benchmarks.tasks.ocr import (HARD_STYLE, NORMAL_STYLE, RenderStyle, calibration_vocabulary,
                                  evaluation_vocabulary, make_text, render_line, resize_norm_img)

INPUT_NAME = "x"
CLS_HEIGHT = 48
CLS_WIDTH = 192
EVAL_BATCH = 8
N_EVAL_LINES = 400
N_SEARCH_LINES = 200
SEED_NORMAL = 1101
SEED_HARD = 2202
SEED_CALIB = 3303
SEED_SEARCH_NORMAL = 4404
SEED_SEARCH_HARD = 5505
MODEL_PATH: Path = CACHE_DIR / "ppocr_cls.onnx"
#: Clean print a little larger than the recognition task's normal style (a direction classifier
#: sees the whole line squeezed into 192 pixels).
CLEAN_STYLE = RenderStyle(font_size=(28, 34), text_gray=NORMAL_STYLE.text_gray,
                          background_gray=NORMAL_STYLE.background_gray, blur_radius=(0.0, 0.0),
                          noise_sigma=NORMAL_STYLE.noise_sigma)


def cls_source_path() -> Path:
    """The direction classifier inside the installed ``rapidocr_onnxruntime`` wheel."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "rapidocr_onnxruntime is not installed (pip install --no-deps rapidocr_onnxruntime==1.4.4)")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    if not path.is_file():
        raise FileNotFoundError(f"PP-OCR direction classifier not found at {path}")
    return path


def write_symbolic_batch_copy(source: Path, target: Path) -> None:
    """`source` with the declared dims of its inputs and outputs that ONNX cannot express made
    symbolic: a negative batch dim becomes ``batch``, and the height and width, both named
    ``?`` (which would tie them to one value), become ``height`` and ``width``."""
    model = onnx.load(str(source))
    names = {0: "batch", 2: "height", 3: "width"}
    for value in list(model.graph.input) + list(model.graph.output):
        for index, dim in enumerate(value.type.tensor_type.shape.dim):
            if (dim.HasField("dim_value") and dim.dim_value < 0) or dim.dim_param == "?":
                dim.dim_param = names.get(index, f"dim{index}")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    onnx.save(model, str(partial))
    partial.replace(target)


def make_lines(seed: int, n_lines: int, vocabulary: tuple[str, ...], styles: tuple[RenderStyle, ...]
               ) -> tuple[np.ndarray, np.ndarray]:
    """``n_lines`` preprocessed ``[n, 3, 48, 192]`` inputs and their directions (0: upright,
    1: turned 180°, every odd line). Line ``i`` uses ``default_rng([seed, i])`` and style
    ``styles[i % len(styles)]``."""
    inputs = np.empty((n_lines, 3, CLS_HEIGHT, CLS_WIDTH), dtype=np.float32)
    labels = np.arange(n_lines) % 2
    for index in range(n_lines):
        rng = np.random.default_rng([seed, index])
        while True:
            crop = render_line(rng, make_text(rng, vocabulary), styles[index % len(styles)])
            if crop is not None:
                break
        if labels[index]:
            crop = np.ascontiguousarray(crop[::-1, ::-1])
        inputs[index] = resize_norm_img(crop, width=CLS_WIDTH, height=CLS_HEIGHT)
    return inputs, labels


@dataclass
class OcrClsTask(Task):
    """PP-OCR direction classifier; metrics ``acc``, ``acc_hard``, ``agree``, ``agree_hard``."""

    name: str = "ppocr_cls"
    model_path: Path = MODEL_PATH
    _sets: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict, init=False, repr=False)
    _original: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, init=False, repr=False)

    def prepare(self) -> None:
        """Write the model copy with a symbolic batch dim (once)."""
        if not self.model_path.is_file():
            write_symbolic_batch_copy(cls_source_path(), self.model_path)

    def sets(self, split: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{"": normal, "_hard": hard}`` (inputs, directions) of ``split``."""
        check_split(split)
        if split not in self._sets:
            vocabulary = evaluation_vocabulary()
            seeds, count = ((SEED_NORMAL, SEED_HARD), N_EVAL_LINES) if split == "test" else \
                ((SEED_SEARCH_NORMAL, SEED_SEARCH_HARD), N_SEARCH_LINES)
            self._sets[split] = {"": make_lines(seeds[0], count, vocabulary, (CLEAN_STYLE,)),
                                 "_hard": make_lines(seeds[1], count, vocabulary, (HARD_STYLE,))}
        return self._sets[split]

    def calibration_feeds(self, n_samples: int, batch_size: int) -> list[dict[str, np.ndarray]]:
        """Lines of the calibration vocabulary and seed, clean and hard styles alternating
        (pairs of lines: each style in both directions)."""
        inputs, _ = make_lines(SEED_CALIB, n_samples, calibration_vocabulary(),
                               (CLEAN_STYLE, CLEAN_STYLE, HARD_STYLE, HARD_STYLE))
        return [{INPUT_NAME: inputs[part]} for part in batch_slices(n_samples, batch_size)]

    def predict(self, model_path: Path, inputs: np.ndarray) -> np.ndarray:
        """Predicted direction (argmax of the two scores) of every line."""
        session = make_session(model_path)
        output = session.get_outputs()[0].name
        return np.concatenate([session.run([output], {INPUT_NAME: inputs[part]})[0].argmax(axis=1)
                               for part in batch_slices(len(inputs), EVAL_BATCH)])

    def evaluate(self, model_path: Path, split: str = "test") -> dict[str, float]:
        """Direction accuracy and agreement with the original on the normal and hard sets of ``split``."""
        self.prepare()
        sets = self.sets(split)
        if split not in self._original:
            self._original[split] = {key: self.predict(self.model_path, inputs) for key, (inputs, _) in sets.items()}
        metrics: dict[str, float] = {}
        for key, (inputs, labels) in sets.items():
            predicted = self.predict(model_path, inputs)
            metrics[f"acc{key}"] = float(np.mean(predicted == labels))
            metrics[f"agree{key}"] = float(np.mean(predicted == self._original[split][key]))
        return metrics

    def latency_feeds(self, batch: int) -> dict[str, np.ndarray]:
        """``batch`` lines of the normal evaluation set (cycled if more are asked for)."""
        inputs = self.sets("test")[""][0]
        return {INPUT_NAME: np.ascontiguousarray(inputs[np.arange(batch) % len(inputs)])}
