"""``ppocr_rec``: PP-OCRv4 text recognition on text lines rendered with Pillow.

Model: ``models/ch_PP-OCRv4_rec_infer.onnx`` from the ``rapidocr_onnxruntime`` wheel (its
character list is the model's ``metadata_props['character']``).

Data: single text lines rendered with the installed DejaVu fonts (Latin only: no installed font
has CJK glyphs), cropped like a detector's box, preprocessed exactly as RapidOCR's
``TextRecognizer`` does (OpenCV bilinear resize to height 48 keeping the aspect ratio, reproduced
bit for bit in numpy; ``(x / 255 - 0.5) / 0.5``; right zero padding to the batch width; NCHW) and
decoded with CTC greedy decoding. Every line ``i`` of a set is drawn from its own generator
``default_rng([seed, i])``, so any prefix of a set is stable.

- ``normal`` evaluation set: 200 lines, words from scikit-learn's bundled dataset descriptions,
  numbers, dates, prices and codes, font size 22-34 px, clean.
- ``hard`` evaluation set: 200 lines from the same text source, small fonts (9-12 px, upscaled
  by the preprocessing), lower contrast, slight Gaussian blur and Gaussian noise.
- calibration: a different text source (words from Python standard-library docstrings) and a
  different seed; half the lines in the normal style, half in the hard style.

Metric: character accuracy ``max(0, 1 - edit_distance(pred, gt) / len(gt))`` averaged over lines
(``char_acc`` on the normal set, ``char_acc_hard`` on the hard set).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from benchmarks.tasks.base import Task, batch_slices, check_split, make_session

LOGGER = logging.getLogger(__name__)

INPUT_NAME = "x"
REC_HEIGHT = 48
REC_WIDTH = 320
EVAL_BATCH = 1
N_EVAL_LINES = 200
SEED_NORMAL = 1001
SEED_HARD = 2002
SEED_CALIB = 3003
#: The ``search`` split: the evaluation vocabulary and styles, other seeds (other lines).
SEED_SEARCH_NORMAL = 4004
SEED_SEARCH_HARD = 5005
N_SEARCH_LINES = 100
MAX_CHARS = 22
FONT_DIR = Path("/usr/share/fonts")
#: Standard-library modules whose docstrings give the calibration vocabulary.
CALIB_MODULES = (
    "argparse",
    "bisect",
    "calendar",
    "collections",
    "csv",
    "datetime",
    "decimal",
    "difflib",
    "fractions",
    "functools",
    "heapq",
    "itertools",
    "json",
    "logging",
    "pathlib",
    "random",
    "shutil",
    "statistics",
    "string",
    "tarfile",
    "textwrap",
    "unittest",
    "zipfile",
)
_WORD_RE = re.compile(r"\b[A-Za-z]{2,12}\b")


@dataclass(frozen=True)
class RenderStyle:
    """Ranges from which one rendered line draws its appearance."""

    font_size: tuple[int, int]
    text_gray: tuple[int, int]
    background_gray: tuple[int, int]
    blur_radius: tuple[float, float]
    noise_sigma: tuple[float, float]


NORMAL_STYLE = RenderStyle(
    font_size=(22, 34),
    text_gray=(0, 70),
    background_gray=(205, 255),
    blur_radius=(0.0, 0.0),
    noise_sigma=(0.0, 3.0),
)
HARD_STYLE = RenderStyle(
    font_size=(9, 12),
    text_gray=(40, 100),
    background_gray=(150, 215),
    blur_radius=(0.3, 0.6),
    noise_sigma=(9.0, 16.0),
)


def rec_model_path() -> Path:
    """The PP-OCRv4 recognition model inside the installed ``rapidocr_onnxruntime`` wheel."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "rapidocr_onnxruntime is not installed (pip install --no-deps rapidocr_onnxruntime==1.4.4)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "ch_PP-OCRv4_rec_infer.onnx"
    if not path.is_file():
        raise FileNotFoundError(f"PP-OCRv4 recognition model not found at {path}")
    return path


def load_characters(model_path: Path) -> list[str]:
    """CTC classes as RapidOCR's ``CTCLabelDecode`` builds them: blank, the list, then space."""
    model = onnx.load(str(model_path), load_external_data=False)
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    return ["blank", *metadata["character"].splitlines(), " "]


def _linear_taps(src: int, dst: int, clamp_weights: bool) -> tuple[np.ndarray, ...]:
    """Source indices and 11-bit weights of OpenCV's ``INTER_LINEAR`` along one axis.

    OpenCV computes the position in float32 and rounds each weight independently. Along x,
    positions outside the image get all the weight on the border pixel; along y only the row
    indices are clamped (the weights keep their fractional values).
    """
    pos = ((np.arange(dst) + 0.5) * (src / dst) - 0.5).astype(np.float32)
    first = np.floor(pos).astype(np.int64)
    frac = pos - first.astype(np.float32)
    if clamp_weights:
        outside = (first < 0) | (first >= src - 1)
        frac[outside] = 0.0
        first = np.where(first < 0, 0, np.where(first >= src - 1, src - 1, first))
    w0 = np.rint((np.float32(1.0) - frac) * np.float32(2048)).astype(np.int64)
    w1 = np.rint(frac * np.float32(2048)).astype(np.int64)
    return np.clip(first, 0, src - 1), np.clip(first + 1, 0, src - 1), w0, w1


def cv2_resize_linear(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """``cv2.resize(image, (width, height))`` (``INTER_LINEAR``) for uint8 HxWxC images.

    Reproduces OpenCV's fixed-point arithmetic (11-bit weights, horizontal pass in int32,
    vertical pass as in its SIMD kernel: ``((S0>>4)*b0>>16) + ((S1>>4)*b1>>16) + 2 >> 2``);
    bit-exact against opencv-python 5.0 on random images, so no OpenCV dependency is needed.
    """
    src_h, src_w = image.shape[:2]
    x0, x1, a0, a1 = _linear_taps(src_w, width, clamp_weights=True)
    y0, y1, b0, b1 = _linear_taps(src_h, height, clamp_weights=False)
    pixels = image.astype(np.int64)
    rows = pixels[:, x0] * a0[None, :, None] + pixels[:, x1] * a1[None, :, None]
    top, bottom = rows[y0] >> 4, rows[y1] >> 4
    out = (((top * b0[:, None, None]) >> 16) + ((bottom * b1[:, None, None]) >> 16) + 2) >> 2
    return np.clip(out, 0, 255).astype(np.uint8)


def resize_norm_img(image: np.ndarray, width: int = REC_WIDTH, height: int = REC_HEIGHT) -> np.ndarray:
    """RapidOCR's ``TextRecognizer.resize_norm_img`` for a batch of fixed ``width``.

    Args:
        image: uint8 HxWx3 crop.
        width: Batch width (RapidOCR uses ``int(48 * max_wh_ratio)``, at least 320).
        height: Model input height.

    Returns:
        float32 ``[3, height, width]``: the crop resized to ``height`` keeping its aspect ratio
        (capped at ``width``), scaled to [-1, 1] and zero-padded on the right.
    """
    h, w = image.shape[:2]
    resized_w = min(width, int(math.ceil(height * (w / float(h)))))
    resized = cv2_resize_linear(image, resized_w, height).astype(np.float32)
    resized = resized.transpose((2, 0, 1)) / 255
    resized -= 0.5
    resized /= 0.5
    padded = np.zeros((3, height, width), dtype=np.float32)
    padded[:, :, :resized_w] = resized
    return padded


def ctc_greedy_decode(probs: np.ndarray, characters: list[str]) -> list[str]:
    """Greedy CTC decoding of ``[batch, time, classes]`` scores: merge repeats, drop blanks."""
    best = probs.argmax(axis=2)
    texts = []
    for row in best:
        keep = np.ones(len(row), dtype=bool)
        keep[1:] = row[1:] != row[:-1]
        keep &= row != 0
        texts.append("".join(characters[index] for index in row[keep]))
    return texts


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (unit insert, delete and substitute costs)."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def char_accuracy(prediction: str, truth: str) -> float:
    """``max(0, 1 - edit_distance / len(truth))``."""
    return max(0.0, 1.0 - edit_distance(prediction, truth) / len(truth))


@lru_cache(maxsize=1)
def evaluation_vocabulary() -> tuple[str, ...]:
    """Sorted unique words of scikit-learn's bundled dataset descriptions (``descr/*.rst``)."""
    import sklearn

    descr_dir = Path(sklearn.__file__).parent / "datasets" / "descr"
    words: set[str] = set()
    for path in sorted(descr_dir.glob("*.rst")):
        words.update(_WORD_RE.findall(path.read_text(encoding="utf-8")))
    if not words:
        raise FileNotFoundError(f"no dataset descriptions found under {descr_dir}")
    return tuple(sorted(words))


@lru_cache(maxsize=1)
def calibration_vocabulary() -> tuple[str, ...]:
    """Sorted unique words of the docstrings of :data:`CALIB_MODULES` and their public members."""
    words: set[str] = set()
    for module_name in CALIB_MODULES:
        module = importlib.import_module(module_name)
        docs = [inspect.getdoc(module) or ""]
        for attr in sorted(name for name in dir(module) if not name.startswith("_")):
            docs.append(inspect.getdoc(getattr(module, attr)) or "")
        for doc in docs:
            words.update(_WORD_RE.findall(doc))
    return tuple(sorted(words))


@lru_cache(maxsize=1)
def font_paths() -> tuple[Path, ...]:
    """Installed DejaVu text fonts (ExtraLight and the maths font excluded), sorted."""
    paths = [
        path
        for path in sorted(FONT_DIR.rglob("DejaVu*.ttf"))
        if "ExtraLight" not in path.name and "Math" not in path.name
    ]
    if not paths:
        LOGGER.warning("no DejaVu fonts under %s: falling back to Pillow's default font", FONT_DIR)
    return tuple(paths)


def _load_font(rng: np.random.Generator, size: int) -> ImageFont.FreeTypeFont:
    paths = font_paths()
    if not paths:
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(str(paths[int(rng.integers(len(paths)))]), size=size)


def _styled_word(rng: np.random.Generator, vocabulary: tuple[str, ...]) -> str:
    word = vocabulary[int(rng.integers(len(vocabulary)))]
    case = rng.random()
    if case < 0.5:
        return word.lower()
    if case < 0.8:
        return word.capitalize()
    return word.upper()


def _number_token(rng: np.random.Generator) -> str:
    kind = int(rng.integers(6))
    if kind == 0:
        return str(int(rng.integers(0, 100000)))
    if kind == 1:
        return (
            f"{int(rng.integers(1990, 2031))}-{int(rng.integers(1, 13)):02d}-{int(rng.integers(1, 29)):02d}"
        )
    if kind == 2:
        return f"${rng.integers(0, 1000)}.{int(rng.integers(0, 100)):02d}"
    if kind == 3:
        return f"{rng.random() * 100:.1f}%"
    if kind == 4:
        letters = "".join(chr(ord("A") + int(c)) for c in rng.integers(0, 26, size=2))
        return f"{letters}-{int(rng.integers(0, 10000)):04d}"
    return f"{int(rng.integers(100, 1000))} {int(rng.integers(1000, 10000))}"


def make_text(rng: np.random.Generator, vocabulary: tuple[str, ...]) -> str:
    """One line: words, a number-like token, or a mix, at most :data:`MAX_CHARS` characters."""
    while True:
        kind = rng.random()
        if kind < 0.5:
            tokens = [_styled_word(rng, vocabulary) for _ in range(int(rng.integers(1, 5)))]
            if rng.random() < 0.3:
                tokens[-1] += ".,:;!?"[int(rng.integers(6))]
        elif kind < 0.8:
            tokens = [_styled_word(rng, vocabulary), _number_token(rng)]
            if rng.random() < 0.5:
                tokens.reverse()
        else:
            tokens = [_number_token(rng)]
        text = " ".join(tokens)
        if len(text) <= MAX_CHARS:
            return text


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def render_line(rng: np.random.Generator, text: str, style: RenderStyle) -> np.ndarray | None:
    """Render ``text`` as a uint8 HxWx3 crop, or ``None`` if it is wider than the batch width.

    The crop spans the font's ascent + descent plus small random margins, like a detector box.
    """
    font = _load_font(rng, int(rng.integers(style.font_size[0], style.font_size[1] + 1)))
    ascent, descent = font.getmetrics()
    left, _, right, _ = font.getbbox(text)
    margin_y = int(round(font.size * rng.uniform(0.1, 0.3)))
    margin_x = int(round(font.size * rng.uniform(0.2, 0.6)))
    height = ascent + descent + 2 * margin_y
    width = right - left + 2 * margin_x
    if width / height > REC_WIDTH / REC_HEIGHT:
        return None
    tint = rng.integers(-12, 13, size=3)
    background = np.clip(int(_uniform(rng, style.background_gray)) + tint, 0, 255)
    ink = np.clip(int(_uniform(rng, style.text_gray)) + tint, 0, 255)
    image = Image.new("RGB", (width, height), tuple(int(v) for v in background))
    ImageDraw.Draw(image).text((margin_x - left, margin_y), text, font=font, fill=tuple(int(v) for v in ink))
    blur = _uniform(rng, style.blur_radius)
    if blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    pixels = np.asarray(image, dtype=np.float64)
    sigma = _uniform(rng, style.noise_sigma)
    if sigma > 0:
        pixels = pixels + rng.normal(0.0, sigma, size=pixels.shape)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def make_lines(
    seed: int, n_lines: int, vocabulary: tuple[str, ...], styles: tuple[RenderStyle, ...]
) -> tuple[list[str], np.ndarray]:
    """``n_lines`` texts and their preprocessed ``[n, 3, 48, 320]`` inputs.

    Line ``i`` uses ``default_rng([seed, i])`` and style ``styles[i % len(styles)]``; texts too
    wide for the batch width are redrawn from the same generator.
    """
    texts: list[str] = []
    inputs = np.empty((n_lines, 3, REC_HEIGHT, REC_WIDTH), dtype=np.float32)
    for index in range(n_lines):
        rng = np.random.default_rng([seed, index])
        while True:
            text = make_text(rng, vocabulary)
            crop = render_line(rng, text, styles[index % len(styles)])
            if crop is not None:
                break
        texts.append(text)
        inputs[index] = resize_norm_img(crop)
    return texts, inputs


@dataclass
class OcrRecTask(Task):
    """PP-OCRv4 recognition; metrics ``char_acc`` (normal set) and ``char_acc_hard``."""

    name: str = "ppocr_rec"
    model_path: Path = field(default_factory=rec_model_path)
    n_eval_lines: int = N_EVAL_LINES
    _characters: list[str] | None = field(default=None, init=False, repr=False)
    _eval_sets: dict[str, tuple[list[str], np.ndarray]] | None = field(default=None, init=False, repr=False)
    _search_sets: dict[str, tuple[list[str], np.ndarray]] | None = field(default=None, init=False, repr=False)

    def prepare(self) -> None:
        """Load the character list and render both evaluation sets (kept in memory)."""
        if self._characters is None:
            self._characters = load_characters(self.model_path)
        if self._eval_sets is None:
            vocabulary = evaluation_vocabulary()
            self._eval_sets = {
                "char_acc": make_lines(SEED_NORMAL, self.n_eval_lines, vocabulary, (NORMAL_STYLE,)),
                "char_acc_hard": make_lines(SEED_HARD, self.n_eval_lines, vocabulary, (HARD_STYLE,)),
            }

    def calibration_feeds(self, n_samples: int, batch_size: int) -> list[dict[str, np.ndarray]]:
        """Lines from the calibration vocabulary and seed, alternating normal and hard styles."""
        _, inputs = make_lines(SEED_CALIB, n_samples, calibration_vocabulary(), (NORMAL_STYLE, HARD_STYLE))
        return [{INPUT_NAME: inputs[part]} for part in batch_slices(n_samples, batch_size)]

    def recognize(self, session: ort.InferenceSession, inputs: np.ndarray) -> list[str]:
        """Decoded texts of preprocessed lines ``inputs`` (``[n, 3, 48, 320]``), one line per run."""
        self.prepare()
        assert self._characters is not None
        output = session.get_outputs()[0].name
        texts: list[str] = []
        for part in batch_slices(len(inputs), EVAL_BATCH):
            probs = session.run([output], {INPUT_NAME: inputs[part]})[0]
            texts.extend(ctc_greedy_decode(probs, self._characters))
        return texts

    def search_sets(self) -> dict[str, tuple[list[str], np.ndarray]]:
        """The ``search`` split: `N_SEARCH_LINES` normal and hard lines of their own seeds."""
        if self._search_sets is None:
            vocabulary = evaluation_vocabulary()
            self._search_sets = {
                "char_acc": make_lines(SEED_SEARCH_NORMAL, N_SEARCH_LINES, vocabulary, (NORMAL_STYLE,)),
                "char_acc_hard": make_lines(SEED_SEARCH_HARD, N_SEARCH_LINES, vocabulary, (HARD_STYLE,)),
            }
        return self._search_sets

    def evaluate(self, model_path: Path, split: str = "test") -> dict[str, float]:
        """Mean character accuracy on the normal and the hard set of ``split``."""
        check_split(split)
        self.prepare()
        assert self._eval_sets is not None
        sets = self.search_sets() if split == "search" else self._eval_sets
        session = make_session(model_path)
        metrics: dict[str, float] = {}
        for key, (truths, inputs) in sets.items():
            predictions = self.recognize(session, inputs)
            scores = [char_accuracy(p.strip(), t) for p, t in zip(predictions, truths, strict=True)]
            metrics[key] = float(np.mean(scores))
        return metrics

    def latency_feeds(self, batch: int) -> dict[str, np.ndarray]:
        """``batch`` lines of the normal evaluation set (cycled if more are asked for)."""
        self.prepare()
        assert self._eval_sets is not None
        inputs = self._eval_sets["char_acc"][1]
        return {INPUT_NAME: np.ascontiguousarray(inputs[np.arange(batch) % len(inputs)])}
