"""Loading and saving ONNX models: any source, external data, atomic writes, an IR version
onnxruntime accepts."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Iterator, Optional, Tuple, Union

import onnx
from google.protobuf.message import DecodeError

from ..errors import LrsdError
from .mapped import external_bytes, external_info, has_external_references, write_with_external_data
from .naming import make_node_names_unique
from .validate import check_model

log = logging.getLogger(__name__)

ModelSource = Union[str, os.PathLike, bytes, onnx.ModelProto]

PLACEHOLDER_DIM_NAMES = ("?",)
"""dim_param values some exporters write for "unknown" (Paddle2ONNX): where one names several
input dims it is taken as unnamed, not as one dim shared by all of them (which is what a
repeated dim_param means in ONNX); where it names one dim it stays that dim's name."""

PROTOBUF_LIMIT = 2**31 - 1
"""A serialized ModelProto cannot exceed 2 GB; larger models go to external data."""


def load_model(source: ModelSource) -> onnx.ModelProto:
    """Load a model from a path, serialized bytes or a ModelProto (copied, never modified).

    External data next to a file is loaded. Errors become one-line `LrsdError`s.
    """
    return load_source(source)[0]


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the default (ai.onnx) domain `model` imports (0 if none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def load_source(source: ModelSource, map_above: Optional[int] = None) -> Tuple[onnx.ModelProto, Optional[Path]]:
    """`load_model`, except that a file whose external data exceeds `map_above` bytes is
    checked but not loaded: returns the model and the directory its weights stay in (None
    when everything was loaded; see `onnx_lrsd.model.mapped`)."""
    if isinstance(source, (onnx.ModelProto, bytes, bytearray)):
        model = _copy(source) if isinstance(source, onnx.ModelProto) else _parse(bytes(source), "the given bytes")
        _refuse_unloaded_external_data(model)
        name_unknown_dims(model)
        check_model(model)
        make_node_names_unique(model)
        return model, None
    path = Path(source)
    if not path.exists():
        raise LrsdError(f"model file not found: {path}")
    if not path.is_file():
        raise LrsdError(f"not a file: {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LrsdError(f"cannot read {path}: {exc.strerror or exc}") from None
    model = _parse(data, str(path))
    name_unknown_dims(model)
    check_model(model, str(path))
    make_node_names_unique(model)
    _check_external_locations(model, path.parent, path)
    if map_above is not None and external_bytes(model) > map_above:
        return model, path.parent.resolve()
    try:
        onnx.load_external_data_for_model(model, str(path.parent.resolve()))
    except (OSError, ValueError) as exc:
        raise LrsdError(f"{path}: cannot load external data: {exc}") from None
    return model, None


def name_unknown_dims(model: onnx.ModelProto) -> None:
    """Name every graph-input dim that is dynamic but has no usable name — `dim_value` −1 (a
    common exporters' convention, outside the ONNX spec), neither value nor name, or a
    placeholder of `PLACEHOLDER_DIM_NAMES` that names several dims — as ``{input}_dim{axis}``,
    so that calibration data or ``--dim`` can give it a value; a −1 of a graph output or
    value_info becomes an unknown dim. Other negative dims are left for `check_model` to refuse."""
    params = [d.dim_param for v in model.graph.input if v.type.HasField("tensor_type")
              for d in v.type.tensor_type.shape.dim]
    taken = set(params)
    placeholders = {p for p in PLACEHOLDER_DIM_NAMES if params.count(p) > 1}
    for value in model.graph.input:
        if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
            continue
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            unnamed = not dim.HasField("dim_value") and dim.dim_param in ("", *placeholders)
            if unnamed or (dim.HasField("dim_value") and dim.dim_value == -1):
                name = f"{value.name}_dim{axis}"
                while name in taken:
                    name += "_"
                dim.dim_param = name
                taken.add(name)
    for value in (*model.graph.output, *model.graph.value_info):
        if value.type.HasField("tensor_type"):
            for dim in value.type.tensor_type.shape.dim:
                if dim.HasField("dim_value") and dim.dim_value == -1:
                    dim.ClearField("dim_value")


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    clone = onnx.ModelProto()
    clone.CopyFrom(model)
    return clone


def _parse(data: bytes, what: str) -> onnx.ModelProto:
    if not data:
        raise LrsdError(f"{what} is empty, not an ONNX model")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError):
        raise LrsdError(f"{what} is not an ONNX model (protobuf parse failed; truncated or another file type?)") from None
    if not model.HasField("graph") or (len(model.graph.node) == 0 and len(model.graph.output) == 0):
        raise LrsdError(f"{what} is not an ONNX model (no graph)")
    return model


def _refuse_unloaded_external_data(model: onnx.ModelProto) -> None:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    unloaded = next((t.name for t in _get_all_tensors(model) if uses_external_data(t)), None)
    if unloaded is not None:
        raise LrsdError(f"tensor '{unloaded}' refers to external data that is not loaded: pass the model's path, "
                        f"or load it with onnx.load(path) (load_external_data=True)")


def _check_external_locations(model: onnx.ModelProto, base_dir: Path, path: Path) -> None:
    """Every external tensor's file exists inside the model's directory (no path traversal)
    and holds the declared range."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    base = base_dir.resolve()
    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (base / location).resolve()
        if base != target and base not in target.parents:
            raise LrsdError(f"{path}: external data '{location}' of tensor '{tensor.name}' points outside the model's directory")
        if not target.is_file():
            raise LrsdError(f"{path}: external data file '{location}' of tensor '{tensor.name}' is missing")
        _, offset, length = external_info(tensor)
        if length is not None and offset + length > target.stat().st_size:
            raise LrsdError(f"{path}: cannot load external data: tensor '{tensor.name}' needs bytes {offset}.."
                            f"{offset + length} of '{location}', which has {target.stat().st_size}")


@functools.lru_cache(maxsize=None)
def max_runtime_ir_version() -> int:
    """The highest IR version the installed onnxruntime loads (probed once with a tiny model)."""
    import onnxruntime as ort
    from onnx import helper

    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    for ir_version in range(onnx.IR_VERSION, 3, -1):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = ir_version
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            return ir_version
        except Exception:  # onnxruntime raises its own Fail type for unsupported IR
            continue
    return 3


def runtime_ir_version(source_ir_version: int) -> int:
    """Keep the source model's IR version, capped at what onnxruntime accepts."""
    return min(source_ir_version or onnx.IR_VERSION, max_runtime_ir_version())


def serialize_for_runtime(model: onnx.ModelProto) -> bytes:
    """The serialized model with its IR version capped at what onnxruntime loads (the
    ModelProto itself is left as it was)."""
    original = model.ir_version
    model.ir_version = runtime_ir_version(original)
    try:
        return model.SerializeToString()
    finally:
        model.ir_version = original


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Size estimate that works above 2 GB (ByteSize() does not)."""
    from onnx.external_data_helper import _get_all_tensors

    total = 0
    for tensor in _get_all_tensors(model):
        if tensor.HasField("raw_data"):
            total += len(tensor.raw_data)
        else:
            total += 4 * (len(tensor.float_data) + len(tensor.int32_data)) + 8 * (
                len(tensor.int64_data) + len(tensor.double_data) + len(tensor.uint64_data))
    return total


def needs_external_data(model: onnx.ModelProto) -> bool:
    return initializer_bytes(model) > PROTOBUF_LIMIT - 64 * 2**20


def check_output_directory(path: Path) -> Path:
    """The directory `path` will be written in; an error if it is missing or read-only."""
    directory = path.parent
    if not directory.is_dir():
        raise LrsdError(f"output directory does not exist: {directory}")
    if not os.access(directory, os.W_OK):
        raise LrsdError(f"output directory is not writable: {directory}")
    return directory


_COMMIT = threading.RLock()
"""Held while finished files are renamed into place (`signals_deferred`), and by
`discard_pending` for good: a process leaving on a signal never stops between two renames."""

_PENDING: set = set()
"""Temporary files and directories being written right now (`pending`)."""


@contextlib.contextmanager
def pending(path: Path) -> Iterator[Path]:
    """Record `path` (a temporary file or directory) as in progress for the block, so that
    `discard_pending` can remove it if the process must leave before the block ends."""
    _PENDING.add(Path(path))
    try:
        yield Path(path)
    finally:
        _PENDING.discard(Path(path))


@contextlib.contextmanager
def temporary_directory(prefix: str) -> Iterator[str]:
    """`tempfile.TemporaryDirectory` recorded as `pending`."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp, pending(Path(tmp)):
        yield tmp


def discard_pending() -> None:
    """Remove every pending temporary file and directory, after any renames in progress
    finish; keeps the commit lock, so none starts afterwards (call it only on the way out)."""
    _COMMIT.acquire()
    for path in list(_PENDING):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM are held back during the block and delivered after it (on the main
    thread; the commit lock keeps a process leaving from another thread out of the block)."""
    with _COMMIT:
        if not hasattr(signal, "pthread_sigmask"):
            yield
            return
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _umask() -> int:
    """The process's file-creation mask (read by setting it, then restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Union[str, os.PathLike], data: Union[bytes, str]) -> Path:
    """Write `data` (text as UTF-8) to `path` through a temporary file in the same directory
    renamed over it: a reader never sees a half-written file, a failure leaves none."""
    path = Path(path)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with pending(Path(temp)):
            os.fchmod(handle, 0o666 & ~_umask())  # mkstemp's 0600, not what an open() would give
            with os.fdopen(handle, "wb") as stream:
                stream.write(data.encode() if isinstance(data, str) else data)
            with _COMMIT:
                os.replace(temp, path)
    except BaseException as exc:
        Path(temp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise LrsdError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise
    return path


def save_model(model: onnx.ModelProto, path: Union[str, os.PathLike], external_data: bool = False,
               source_dir: Optional[Path] = None) -> Path:
    """Write `model` atomically: into a temporary file in the target directory, then renamed.

    With `external_data` (forced above 2 GB) the weights go to ``<name>.data`` beside it;
    a stale data file of that name is replaced, never appended to. A model whose tensors
    still refer to external files in `source_dir` (a mapped run, `onnx_lrsd.model.mapped`) is
    streamed into the data file and left referring to it.
    Returns the written path.
    """
    path = Path(path)
    directory = check_output_directory(path)
    streamed = has_external_references(model)
    external_data = external_data or streamed or needs_external_data(model)
    data_name = path.name + ".data"
    try:
        staging = Path(tempfile.mkdtemp(prefix=".onnx_lrsd-", dir=directory))
    except OSError as exc:
        raise LrsdError(f"cannot write to {directory}: {exc.strerror or exc}") from None
    try:
        _PENDING.add(staging)
        staged = staging / path.name
        if streamed:
            write_with_external_data(model, staged, data_name, source_dir)
        elif external_data:
            model = _copy(model)  # onnx moves the weights out of the proto it saves
            onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            staged.write_bytes(model.SerializeToString())
        with signals_deferred():  # the model and its data file arrive together
            if external_data:
                os.replace(staging / data_name, directory / data_name)
            os.replace(staged, path)
    except OSError as exc:
        raise LrsdError(f"cannot write {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise LrsdError(f"cannot serialize the model: {exc}") from None
    finally:
        for leftover in staging.iterdir():
            leftover.unlink()
        staging.rmdir()
        _PENDING.discard(staging)
    log.info("wrote %s%s", path, " (+ external data)" if external_data else "")
    return path
