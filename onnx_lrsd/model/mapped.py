"""Large models, layer by layer: weights stay in their external data files and are read
through read-only memory maps, one layer at a time.

A model whose external data exceeds `CompressConfig.map_weights_above_mb` is loaded without
its weights (`load_source`); while `weights_in(directory)` is active, the graph editor sees
those tensors as `MappedValues` (a map of the file, never a copy), onnxruntime sessions made
from the model's bytes find the files in that directory (and skip weight prepacking, which
would copy every weight), and unchanged weights are exported as references to the source
files, which `write_with_external_data` copies into the output's data file in chunks.
After a layer's weight has been read, `release_pages` drops its pages from the process
(they stay in the page cache), so the resident set holds about one layer at a time.
"""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
import mmap
from pathlib import Path
from typing import Iterator, Optional, Tuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx.external_data_helper import _get_all_tensors, uses_external_data
from onnx_graphsurgeon.ir.tensor import LazyValues

from ..errors import LrsdError

_DIRECTORY: contextvars.ContextVar[Optional[Path]] = contextvars.ContextVar("onnx_lrsd_mapped_dir", default=None)

COPY_CHUNK = 64 * 2**20
"""Bytes copied at a time from a source data file to the output's."""

ALIGNMENT = 4096
"""Tensors in a written data file start at page boundaries (onnxruntime maps those)."""

MIN_EXTERNAL_BYTES = 1024
"""Smaller tensors stay inside the written .onnx file."""


def mapped_directory() -> Optional[Path]:
    """The directory of the mapped model's external data in this context, if any."""
    return _DIRECTORY.get()


@contextlib.contextmanager
def weights_in(directory: Optional[Path]) -> Iterator[None]:
    """Within the block, external tensors are read from (and sessions find them in) `directory`
    (None: nothing is mapped)."""
    token = _DIRECTORY.set(directory)
    if directory is not None:
        map_large_allocations()
    try:
        yield
    finally:
        _DIRECTORY.reset(token)


def runtime_options(options) -> None:
    """Let an onnxruntime session built from the bytes of a mapped model find its external
    data, without prepacked copies of the weights."""
    directory = mapped_directory()
    if directory is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(directory))
        options.add_session_config_entry("session.disable_prepacking", "1")


def external_info(tensor: onnx.TensorProto) -> Tuple[str, int, Optional[int]]:
    """(location, offset, length or None) of an external tensor."""
    entries = {e.key: e.value for e in tensor.external_data}
    length = entries.get("length")
    return entries.get("location", ""), int(entries.get("offset") or 0), int(length) if length else None


def external_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the model's tensors stored in external files (from their declared lengths)."""
    total = 0
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            length = external_info(tensor)[2]
            total += length if length is not None else 0
    return total


class MappedValues(LazyValues):
    """The values of an external tensor as a read-only memory map of its file (dtypes numpy
    lacks, such as bfloat16, are read and converted)."""

    def __init__(self, tensor: onnx.TensorProto, directory: Path):
        super().__init__(tensor)
        self.directory = directory

    def load(self) -> np.ndarray:
        location, offset, _ = external_info(self.tensor)
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.tensor.data_type))
        except (KeyError, TypeError, ValueError):
            dtype = None
        shape = tuple(int(d) for d in self.tensor.dims)
        if dtype is None or dtype.kind not in "fiub" or int(np.prod(shape, dtype=np.int64)) == 0:
            return numpy_helper.to_array(self.tensor, base_dir=str(self.directory))
        return np.memmap(self.directory / location, dtype=dtype, mode="r", offset=offset, shape=shape)


def map_external_constants(graph: gs.Graph, directory: Path) -> int:
    """Replace the lazy values of every external constant (subgraphs included) by
    `MappedValues`; returns how many."""
    count = 0
    for g in [graph, *graph.subgraphs(recursive=True)]:
        for tensor in g.tensors().values():
            values = getattr(tensor, "_values", None)
            if isinstance(values, LazyValues) and not isinstance(values, MappedValues) \
                    and isinstance(values.tensor, onnx.TensorProto) and uses_external_data(values.tensor):
                tensor._values = MappedValues(values.tensor, directory)
                count += 1
    return count


def mapped_values(tensor: gs.Constant) -> Optional[np.ndarray]:
    """A fresh map of a mapped constant's values (the constant stays lazy, so that it is
    exported as a reference to its file), or None for other constants."""
    values = getattr(tensor, "_values", None)
    return values.load() if isinstance(values, MappedValues) else None


def release_pages(array: np.ndarray) -> None:
    """Drop the resident pages of the memory map behind `array` (no-op for other arrays);
    they are read again from the page cache if touched later."""
    obj = array
    while obj is not None:
        handle = getattr(obj, "_mmap", None)
        if isinstance(handle, mmap.mmap):
            handle.madvise(mmap.MADV_DONTNEED)
            return
        obj = getattr(obj, "base", None)


M_MMAP_THRESHOLD = -3
"""glibc's mallopt parameter: allocations from this size on get their own mapping."""


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def map_large_allocations(threshold: int = 2**20) -> None:
    """Give every allocation of at least `threshold` bytes its own mapping, returned to the
    system when freed. glibc otherwise raises its threshold to the largest block freed so far
    (up to 32 MB): a large model's many float64 blocks then stay resident in its arenas."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, threshold)


def trim_heap() -> None:
    """Return freed heap memory to the system (glibc)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def has_external_references(model: onnx.ModelProto) -> bool:
    return any(uses_external_data(t) for t in _get_all_tensors(model))


def write_with_external_data(model: onnx.ModelProto, path: Path, data_name: str, source_dir: Optional[Path]) -> None:
    """Write `model` to `path` with every tensor of at least `MIN_EXTERNAL_BYTES` in
    ``path.parent / data_name``: in-memory tensors are written out and cleared from the proto,
    tensors still referring to files in `source_dir` are copied in chunks. The proto is left
    referring to the written data file (it never holds every weight at once)."""
    data_path = path.parent / data_name
    with open(data_path, "wb") as data:
        for tensor in _get_all_tensors(model):
            if uses_external_data(tensor):
                if source_dir is None:
                    raise LrsdError(f"tensor '{tensor.name}' refers to external data, but its directory is unknown")
                location, offset, length = external_info(tensor)
                start = _pad(data)
                length = _copy_range(source_dir / location, offset, length, data)
            elif tensor.HasField("raw_data") and len(tensor.raw_data) >= MIN_EXTERNAL_BYTES:
                start = _pad(data)
                length = data.write(tensor.raw_data)
                tensor.ClearField("raw_data")
            else:
                continue
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(start)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
    path.write_bytes(model.SerializeToString())


def _pad(stream) -> int:
    position = stream.tell()
    padding = -position % ALIGNMENT
    if padding:
        stream.write(b"\0" * padding)
    return position + padding


def _copy_range(source: Path, offset: int, length: Optional[int], out) -> int:
    """Copy `length` bytes (to the end when None) of `source` from `offset` into `out`."""
    copied = 0
    with open(source, "rb") as stream:
        stream.seek(offset)
        while length is None or copied < length:
            chunk = stream.read(COPY_CHUNK if length is None else min(COPY_CHUNK, length - copied))
            if not chunk:
                break
            out.write(chunk)
            copied += len(chunk)
    if length is not None and copied != length:
        raise LrsdError(f"{source}: external data ends after {copied} of {length} bytes")
    return copied

