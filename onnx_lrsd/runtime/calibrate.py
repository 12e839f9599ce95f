"""Calibration input: readers, and a stream of validated, re-batched feed dicts.

Any object with ``get_next() -> dict | None`` is a reader (onnxruntime's
``CalibrationDataReader`` protocol, so readers written for static quantization work as they
are); ``None`` ends the stream, and ``rewind()``, when present, restarts it. `iter_batches`
turns a reader into batches checked against the model's real graph inputs.

Batches are cut along axis 0 of every input. Consecutive source batches are merged only when
all their non-batch dims agree: batches of different trailing shapes (token models with
per-batch sequence lengths) are yielded separately, never padded, because padding values
would enter the statistics of any model without a mask input.
"""
from __future__ import annotations

import logging
import os
import zipfile
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, List, NamedTuple, Protocol, Union

import numpy as np
import onnx

from ..errors import LrsdError
from .feeds import _real_inputs, random_feeds, resolve_input_shapes

if TYPE_CHECKING:
    from ..config import CompressConfig

log = logging.getLogger(__name__)

__all__ = [
    "Calibration", "calibration_batches", "CalibrationSplit", "split_holdout", "is_held_out", "has_held_out",
    "CalibrationReader", "NpzReader", "ListReader", "RandomReader", "CalibrationSpec",
    "open_reader", "iter_batches", "RANDOM", "RANDOM_SAMPLES_DEFAULT",
]

RANDOM = "random"
"""The source word asking for seeded random inputs instead of data."""

RANDOM_SAMPLES_DEFAULT = 64
"""Samples drawn by ``--calib random`` when no sample count is given."""

Feeds = dict[str, np.ndarray]

_SAFE_CASTS = {
    (np.dtype(np.float64), np.dtype(np.float32)),
    (np.dtype(np.int32), np.dtype(np.int64)),
}


class CalibrationReader(Protocol):
    """onnxruntime's ``CalibrationDataReader`` protocol; an optional ``rewind()`` restarts it."""

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next batch of inputs by name, or ``None`` at the end."""


def _rows(feeds: Mapping[str, np.ndarray]) -> int:
    """Samples in a batch (axis 0 of its first input)."""
    return len(next(iter(feeds.values())))


def _trailing_key(feeds: Mapping[str, np.ndarray]) -> tuple:
    """Input names with their non-batch shapes: batches merge only when these agree."""
    return tuple(sorted((name, array.shape[1:]) for name, array in feeds.items()))


def _concat(pieces: list[Feeds]) -> Feeds:
    if len(pieces) == 1:
        return pieces[0]
    return {name: np.concatenate([piece[name] for piece in pieces]) for name in pieces[0]}


def _rebatch(batches: Iterable[Feeds], size: int | None, exact: bool = False) -> Iterator[Feeds]:
    """Re-cut `batches` into batches of `size` samples along axis 0, in order.

    Small batches are merged and big ones split (as views); a change of trailing shapes, and
    the end of the stream, flush a short batch, or drop it when `exact` (a model with a fixed
    batch dim cannot take a short one). `size` None yields the batches as they come.
    """
    pending: deque[Feeds] = deque()
    count = 0
    key = None

    def split_off(n: int) -> Feeds:
        nonlocal count
        count -= n
        pieces = []
        while n:
            first = pending.popleft()
            rows = _rows(first)
            if rows > n:
                pending.appendleft({name: a[n:] for name, a in first.items()})
                first, rows = {name: a[:n] for name, a in first.items()}, n
            pieces.append(first)
            n -= rows
        return _concat(pieces)

    def flush() -> Iterator[Feeds]:
        if not count:
            return
        if exact:
            log.warning("%d calibration samples dropped: the model's fixed batch size is %d", count, size)
            pending.clear()
        else:
            yield split_off(count)

    for batch in batches:
        if size is None:
            yield batch
            continue
        batch_key = _trailing_key(batch)
        if batch_key != key:
            yield from flush()
            key = batch_key
        pending.append(batch)
        count += _rows(batch)
        while count >= size:
            yield split_off(size)
    yield from flush()


class ListReader:
    """A reader over a list of feed dicts."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        if isinstance(feeds, Mapping):
            raise LrsdError("ListReader takes a list of feed dicts, got a single dict")
        self._feeds = list(feeds)
        self._index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._index >= len(self._feeds):
            return None
        self._index += 1
        return self._feeds[self._index - 1]

    def rewind(self) -> None:
        self._index = 0


def _open_npz(path: Path) -> np.lib.npyio.NpzFile:
    """``np.load`` of an ``.npz`` file, or `LrsdError` saying why it is not one."""
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        reason = " ".join(str(exc).split()) if zipfile.is_zipfile(path) else "not a zip archive"
        raise LrsdError(f"calibration file {path}: not an .npz file ({reason})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise LrsdError(f"calibration file {path}: not an .npz file (one array; save inputs by name with np.savez)")
    members = data.zip.namelist()
    if not members or not all(member.endswith(".npy") for member in members):
        data.close()
        what = f"holds non-array members ({', '.join(members)})" if members else "holds no arrays"
        raise LrsdError(f"calibration file {path}: {what}")
    return data


def _load_npz(path: Path) -> Feeds:
    """All arrays of one ``.npz`` file, checked to share one sample count along axis 0."""
    with _open_npz(path) as data:
        try:
            arrays = {name: data[name] for name in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # pickled objects, damaged members
            raise LrsdError(f"calibration file {path}: unreadable array ({' '.join(str(exc).split())})") from None
    counts = {a.shape[0] if a.ndim else None for a in arrays.values()}
    if None in counts or len(counts) > 1:
        listed = ", ".join(f"{name}: {a.shape}" for name, a in arrays.items())
        raise LrsdError(f"calibration file {path}: arrays must share one sample count along axis 0 ({listed})")
    return arrays


class NpzReader:
    """Batches from ``.npz`` files keyed by input name, samples along axis 0.

    A directory stands for all its ``*.npz`` files, sorted by name. `batch_size` None yields
    each file as stored; otherwise batches of `batch_size` samples cut across files.
    """

    def __init__(self, paths: Sequence[Path | str], batch_size: int | None = None) -> None:
        if isinstance(paths, (str, Path)):
            paths = [paths]
        if batch_size is not None and batch_size < 1:
            raise LrsdError(f"batch size must be >= 1, got {batch_size}")
        files: list[Path] = []
        for path in map(Path, paths):
            if path.is_dir():
                found = sorted(path.glob("*.npz"))
                if not found:
                    raise LrsdError(f"calibration directory {path} holds no .npz files")
                files.extend(found)
            elif path.is_file():
                files.append(path)
            else:
                raise LrsdError(f"calibration data {path} does not exist")
        if not files:
            raise LrsdError("no calibration files given")
        for file in files:
            _open_npz(file).close()  # fail now, not mid-run; reads only the zip directory
        self.files: tuple[Path, ...] = tuple(files)
        self.batch_size = batch_size
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._stream, None)

    def rewind(self) -> None:
        self._stream: Iterator[Feeds] = _rebatch((_load_npz(file) for file in self.files), self.batch_size)


class RandomReader:
    """Seeded random inputs (`onnx_lrsd.runtime.feeds.random_feeds`): a last resort, not data.

    Floats are standard normal and integers 0/1, so data-aware fitting tunes the model to noise.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        n_samples: int,
        batch_size: int = 16,
        dims: Mapping[str, int] | None = None,
        seed: int = 0,
    ) -> None:
        if n_samples < 1 or batch_size < 1:
            raise LrsdError(f"random calibration needs n_samples and batch size >= 1, got {n_samples} and {batch_size}")
        self._model = model
        self._dims = dict(dims or {})
        self._batch = None if _fixed_batch(_input_specs(model)) else batch_size
        resolve_input_shapes(model, batch=self._batch, dims=self._dims)  # bad dims fail now
        self.n_samples = n_samples
        self.batch_size = batch_size
        self.seed = seed
        log.warning(
            "calibrating on random inputs: data-aware compression will fit noise, expect worse "
            "accuracy than with real calibration data"
        )
        self._rng = np.random.default_rng(seed)
        self._produced = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._produced >= self.n_samples:
            return None
        batch = None if self._batch is None else min(self._batch, self.n_samples - self._produced)
        seed = int(self._rng.integers(2**63))
        feeds = random_feeds(self._model, batch=batch, dims=self._dims, seed=seed)
        self._produced += _rows(feeds)
        return feeds

    def rewind(self) -> None:
        self._rng = np.random.default_rng(self.seed)
        self._produced = 0


@dataclass(frozen=True)
class CalibrationSpec:
    """Where calibration data comes from and how much of it to use.

    sources: ``.npz`` files or directories, or the single word ``"random"``.
    n_samples: use at most this many samples (None: all; ``"random"`` draws
        `RANDOM_SAMPLES_DEFAULT`).
    batch_size: samples per inference batch.
    dims, seed: symbolic dim sizes and seed for ``"random"`` inputs.
    """

    sources: tuple[str, ...]
    n_samples: int | None = None
    batch_size: int = 16
    dims: tuple[tuple[str, int], ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.sources, str):
            raise LrsdError("calibration sources must be a tuple of paths, got one string")
        object.__setattr__(self, "sources", tuple(map(str, self.sources)))
        dims = self.dims.items() if isinstance(self.dims, Mapping) else self.dims
        object.__setattr__(self, "dims", tuple(sorted((str(k), int(v)) for k, v in dims)))
        if not self.sources:
            raise LrsdError("no calibration data given")
        if RANDOM in self.sources and len(self.sources) > 1:
            raise LrsdError(f"calibration source '{RANDOM}' cannot be combined with files")
        if self.n_samples is not None and self.n_samples < 1:
            raise LrsdError(f"calibration sample count must be >= 1, got {self.n_samples}")
        if self.batch_size < 1:
            raise LrsdError(f"calibration batch size must be >= 1, got {self.batch_size}")


def open_reader(spec: CalibrationSpec, model: onnx.ModelProto) -> CalibrationReader:
    """The reader `spec` names: a `RandomReader` for ``"random"``, else an `NpzReader`."""
    if spec.sources == (RANDOM,):
        n_samples = spec.n_samples or RANDOM_SAMPLES_DEFAULT
        return RandomReader(model, n_samples, spec.batch_size, dict(spec.dims), spec.seed)
    return NpzReader([Path(source) for source in spec.sources])


@dataclass(frozen=True)
class _InputSpec:
    """A real graph input: dims are ints (fixed), strings (named) or None (unknown)."""

    name: str
    dtype: np.dtype | None
    dims: tuple[int | str | None, ...] | None


def _input_specs(model: onnx.ModelProto) -> list[_InputSpec]:
    specs = []
    for inp in _real_inputs(model):
        if not inp.type.HasField("tensor_type"):
            raise LrsdError(f"input '{inp.name}' is not a tensor; only tensor inputs are supported")
        tensor_type = inp.type.tensor_type
        elem = tensor_type.elem_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)) if elem else None
        dims = None
        if tensor_type.HasField("shape"):
            dims = tuple(
                d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
                for d in tensor_type.shape.dim
            )
            if not dims:
                raise LrsdError(f"input '{inp.name}' is a scalar; calibration needs a batch axis (axis 0)")
        specs.append(_InputSpec(inp.name, dtype, dims))
    if not specs:
        raise LrsdError("the model has no inputs to calibrate")
    return specs


def _fixed_batch(specs: list[_InputSpec]) -> int | None:
    """The batch size the model fixes in its inputs' first dim, if any."""
    fixed = {s.name: s.dims[0] for s in specs if s.dims and isinstance(s.dims[0], int)}
    if len(set(fixed.values())) > 1:
        listed = ", ".join(f"{name}: {size}" for name, size in fixed.items())
        raise LrsdError(f"model inputs fix different batch sizes ({listed}); calibration needs one batch axis")
    return next(iter(fixed.values()), None)


def _validate(feeds: object, specs: list[_InputSpec], index: int, cast_logged: set[str]) -> Feeds:
    """`feeds` (batch `index` of the reader, from 0) checked against `specs`, safely cast."""
    where = f"calibration batch {index}"
    if not isinstance(feeds, Mapping):
        raise LrsdError(f"{where}: the reader returned {type(feeds).__name__}, expected a dict of input name -> array")
    expected = ", ".join(s.name for s in specs)
    known = {s.name for s in specs}
    for name in feeds:
        if name not in known:
            raise LrsdError(f"{where}: unknown input '{name}' (model inputs: {expected})")
    checked: Feeds = {}
    named: dict[str, tuple[int, str]] = {}
    for spec in specs:
        if spec.name not in feeds:
            raise LrsdError(f"{where}: missing input '{spec.name}' (model inputs: {expected})")
        try:
            array = np.asarray(feeds[spec.name])
        except (TypeError, ValueError) as exc:
            raise LrsdError(f"{where}: input '{spec.name}' is not an array ({' '.join(str(exc).split())})") from None
        if spec.dtype is not None and array.dtype != spec.dtype:
            if (array.dtype, spec.dtype) not in _SAFE_CASTS:
                raise LrsdError(f"{where}: input '{spec.name}' has dtype {array.dtype}, the model expects {spec.dtype}")
            if spec.name not in cast_logged:
                log.debug("calibration input '%s': casting %s to %s", spec.name, array.dtype, spec.dtype)
                cast_logged.add(spec.name)
            with np.errstate(over="ignore"):  # float32 overflow becomes inf, reported below
                array = array.astype(spec.dtype)
        if spec.dims is not None:
            if array.ndim != len(spec.dims):
                model_shape = [d if d is not None else "?" for d in spec.dims]
                raise LrsdError(
                    f"{where}: input '{spec.name}' has rank {array.ndim} (shape {array.shape}), "
                    f"the model expects rank {len(spec.dims)} {model_shape}"
                )
            for axis, (dim, size) in enumerate(zip(spec.dims, array.shape)):
                if axis == 0:
                    continue  # the batch axis: re-batching decides it
                if isinstance(dim, int) and size != dim:
                    raise LrsdError(f"{where}: input '{spec.name}' dim {axis} is {size}, the model fixes it to {dim}")
                if isinstance(dim, str):
                    seen = named.setdefault(dim, (size, spec.name))
                    if seen[0] != size:
                        raise LrsdError(
                            f"{where}: input '{spec.name}' dim {axis} ('{dim}') is {size}, "
                            f"but input '{seen[1]}' has '{dim}' = {seen[0]}"
                        )
        elif array.ndim == 0:
            raise LrsdError(f"{where}: input '{spec.name}' is a scalar; calibration needs a batch axis (axis 0)")
        checked[spec.name] = array
    sizes = {name: len(array) for name, array in checked.items()}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name}: {size}" for name, size in sizes.items())
        raise LrsdError(f"{where}: inputs have different batch sizes ({listed})")
    if not next(iter(sizes.values())):
        raise LrsdError(f"{where} is empty (0 samples)")
    for name, array in checked.items():
        if array.dtype.kind in "fc":
            finite = np.isfinite(array)
            if not finite.all():
                sample = int(np.argwhere(~finite)[0][0])
                raise LrsdError(f"{where}: input '{name}' has NaN or inf values (sample {sample} of the batch)")
    return checked


def iter_batches(
    reader: CalibrationReader,
    model: onnx.ModelProto,
    n_samples: int | None,
    batch_size: int | None,
) -> Iterator[dict[str, np.ndarray]]:
    """Validated batches of `batch_size` samples from `reader`, at most `n_samples` in all.

    Lazy: the reader is rewound (when it can be) on the first ``next()`` and read no further
    than needed. Small batches are merged and large ones split (`batch_size` None: as the
    reader yields them); a model that fixes its batch dim gets batches of exactly that size.
    float64 is cast to float32 and int32 to int64 where the model wants those; any other
    mismatch, a missing or unknown input, a wrong rank or fixed dim, unequal batch sizes, an
    empty batch or NaN/inf raise `LrsdError`, as does a stream without any sample.
    """
    if not callable(getattr(reader, "get_next", None)):
        raise LrsdError(f"calibration reader {type(reader).__name__} has no get_next() method")
    if n_samples is not None and n_samples < 1:
        raise LrsdError(f"calibration sample count must be >= 1, got {n_samples}")
    if batch_size is not None and batch_size < 1:
        raise LrsdError(f"calibration batch size must be >= 1, got {batch_size}")
    specs = _input_specs(model)
    fixed = _fixed_batch(specs)
    if fixed is not None and batch_size not in (None, fixed):
        log.info("the model fixes the batch size to %d; calibrating in batches of %d", fixed, fixed)
    return _stream(reader, specs, n_samples, fixed or batch_size, exact=fixed is not None)


def _stream(
    reader: CalibrationReader, specs: list[_InputSpec], n_samples: int | None, size: int | None, exact: bool
) -> Iterator[Feeds]:
    rewind = getattr(reader, "rewind", None)
    if callable(rewind):
        rewind()
    total = 0
    for batch in _rebatch(_validated(reader, specs, n_samples), size, exact):
        total += _rows(batch)
        yield batch
    if not total:
        hint = "" if callable(rewind) else " (a reader without rewind() can be read only once)"
        raise LrsdError(f"calibration data is empty{hint}")
    log.debug("calibration: %d samples", total)


def _validated(reader: CalibrationReader, specs: list[_InputSpec], n_samples: int | None) -> Iterator[Feeds]:
    """The reader's batches, validated, cut to `n_samples` and not read beyond it."""
    cast_logged: set[str] = set()
    taken = 0
    index = 0
    while n_samples is None or taken < n_samples:
        feeds = reader.get_next()
        if feeds is None:
            return
        batch = _validate(feeds, specs, index, cast_logged)
        index += 1
        rows = _rows(batch)
        if n_samples is not None and taken + rows > n_samples:
            rows = n_samples - taken
            batch = {name: array[:rows] for name, array in batch.items()}
        taken += rows
        yield batch


Calibration = Union[None, str, os.PathLike, Sequence[Union[str, os.PathLike]], Sequence[Mapping], object]
"""What a user hands as calibration data (see `calibration_batches`)."""


def calibration_batches(calibration: Calibration, model: onnx.ModelProto, config: "CompressConfig") -> list[Feeds]:
    """Validated calibration batches of `config.calib_batch` samples from any source: a
    reader with `get_next()` (onnxruntime's CalibrationDataReader protocol), a list of feed
    dicts, .npz paths or directories, or "random" (seeded random inputs; a warning)."""
    if calibration is None:
        return []
    if isinstance(calibration, (str, os.PathLike)):
        calibration = [calibration]
    if hasattr(calibration, "get_next"):
        reader = calibration
    elif isinstance(calibration, Sequence) and calibration and all(isinstance(c, Mapping) for c in calibration):
        reader = ListReader(calibration)
    elif isinstance(calibration, Sequence) and calibration and all(isinstance(c, (str, os.PathLike)) for c in calibration):
        reader = open_reader(CalibrationSpec(sources=tuple(str(c) for c in calibration), n_samples=config.calib_samples,
                                             batch_size=config.calib_batch, dims=config.dims, seed=config.seed), model)
    else:
        raise LrsdError("calibration must be a reader with get_next(), a list of feed dicts, .npz paths or 'random'")
    return list(iter_batches(reader, model, config.calib_samples, config.calib_batch))


def is_held_out(index: int, n_batches: int, holdout_every: int) -> bool:
    """Batch `index` of `n_batches` is held out from the fits (kept to judge them) when it is
    a `holdout_every`-th batch; with fewer batches than that (but two or more) the last one
    is, so results are never judged on the fitting data alone. `holdout_every` 0 holds none
    out, and a single batch cannot be split."""
    if holdout_every <= 0 or n_batches < 2:
        return False
    if n_batches < holdout_every:
        return index == n_batches - 1
    return index % holdout_every == holdout_every - 1


def has_held_out(n_batches: int, holdout_every: int) -> bool:
    """Whether any of `n_batches` batches is held out."""
    return holdout_every > 0 and n_batches >= 2


class CalibrationSplit(NamedTuple):
    """The calibration batches the fits see and those held out to judge them (`is_held_out`);
    with none held out, `fit` is every batch."""

    fit: List[Feeds]
    held_out: List[Feeds]

    def judging(self, first: int) -> List[Feeds]:
        """The batches a result is judged on: the held-out ones, else the first `first`
        batches (seen by the fits)."""
        return self.held_out or self.fit[:first]


def split_holdout(batches: Sequence[Feeds], holdout_every: int) -> CalibrationSplit:
    """`batches` split into fit and held-out batches."""
    held = [is_held_out(i, len(batches), holdout_every) for i in range(len(batches))]
    return CalibrationSplit([b for b, h in zip(batches, held) if not h], [b for b, h in zip(batches, held) if h])
