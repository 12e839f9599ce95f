"""Concrete input shapes and seeded random inputs for a model's graph inputs."""
from __future__ import annotations

import logging

import numpy as np
import onnx

from ..errors import LrsdError, UsageError

log = logging.getLogger(__name__)

MAX_RANDOM_INPUT_BYTES = 2**30
"""Largest random input made for verification or timing (declared dims can be absurd)."""

InputSpec = dict[str, tuple[tuple[int, ...], np.dtype]]


def _real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are not initializers (IR < 4 lists initializers as inputs too)."""
    initializers = {init.name for init in model.graph.initializer}
    return [inp for inp in model.graph.input if inp.name not in initializers]


def resolve_input_shapes(
    model: onnx.ModelProto,
    batch: int | None = None,
    dims: dict[str, int] | None = None,
) -> InputSpec:
    """Map each real graph input to a concrete (shape, dtype).

    A symbolic dim named in `dims` takes that value; otherwise an unknown first dim is the
    batch (`batch`, default 1). Any other unknown dim is an error.
    """
    dims = dict(dims or {})
    if batch is not None and batch < 1:
        raise LrsdError(f"batch must be >= 1, got {batch}")
    for name, value in dims.items():
        if value < 1:
            raise LrsdError(f"--dim {name}={value}: dims must be >= 1")
    inputs = _real_inputs(model)
    check_dim_names(model, dims)

    resolved: InputSpec = {}
    used_batch = False
    missing: list[tuple[str, int, str]] = []
    for inp in inputs:
        if not inp.type.HasField("tensor_type"):
            raise LrsdError(f"input '{inp.name}' is not a tensor; only tensor inputs are supported")
        tensor_type = inp.type.tensor_type
        if tensor_type.elem_type == onnx.TensorProto.UNDEFINED:
            raise LrsdError(f"input '{inp.name}' has no element type")
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        if not tensor_type.HasField("shape"):
            raise LrsdError(f"input '{inp.name}' has unknown rank; fix the model's input shape")
        shape = []
        for index, dim in enumerate(tensor_type.shape.dim):
            param = dim.dim_param if dim.HasField("dim_param") else ""
            if dim.HasField("dim_value") and dim.dim_value > 0:
                shape.append(dim.dim_value)
            elif param and param in dims:
                shape.append(dims[param])
            elif index == 0:
                shape.append(1 if batch is None else batch)
                used_batch = True
            else:
                missing.append((inp.name, index, param))
                shape.append(0)
        resolved[inp.name] = (tuple(shape), dtype)
    if missing:
        raise UsageError(unknown_dims_message(missing))
    if batch is not None and not used_batch:
        log.info("batch=%d ignored: no input has a symbolic first dim", batch)
    return resolved


def check_dim_names(model: onnx.ModelProto, dims: dict[str, int]) -> None:
    """LrsdError naming a dim of `dims` that no graph input has."""
    known_params = {
        d.dim_param
        for inp in _real_inputs(model)
        for d in inp.type.tensor_type.shape.dim
        if d.HasField("dim_param") and d.dim_param
    }
    unknown = sorted(set(dims) - known_params)
    if unknown:
        valid = ", ".join(sorted(known_params)) or "none"
        raise LrsdError(f"--dim {unknown[0]}: the model has no input dim named '{unknown[0]}' (named dims: {valid})")


def unknown_dims_message(missing: list[tuple[str, int, str]]) -> str:
    """One line naming every unknown input dim (input, axis, symbolic name or "") at once, with
    the options that would give them (unnamed dims cannot be given; a model read by
    `onnx_lrsd.model.io.load_model` has none: `name_unknown_dims`)."""
    named: dict[str, list[str]] = {}
    for inp, index, param in missing:
        if param:
            named.setdefault(param, []).append(f"{inp} dim {index}")
    unnamed = [(inp, index) for inp, index, param in missing if not param]
    parts = []
    if named:
        where = ", ".join(f"'{name}' ({'; '.join(places)})" for name, places in named.items())
        parts.append(f"input dims {where} are unknown: pass " + " ".join(f"--dim {n}=VALUE" for n in named)
                     + " (or give calibration data, --calib)")
    parts += [f"input '{inp}' dim {index} is unknown and unnamed: give it a fixed size or a name in the model"
              for inp, index in unnamed]
    return "; ".join(parts)


def dims_from_feeds(model: onnx.ModelProto, feeds: dict[str, np.ndarray] | None) -> dict[str, int]:
    """Values of the graph inputs' symbolic dims past the batch axis, read from `feeds`."""
    found: dict[str, int] = {}
    for inp in _real_inputs(model):
        if not feeds or inp.name not in feeds or not inp.type.HasField("tensor_type"):
            continue
        shape = np.shape(feeds[inp.name])
        for index, dim in enumerate(inp.type.tensor_type.shape.dim):
            if index > 0 and dim.dim_param and index < len(shape):
                found.setdefault(dim.dim_param, int(shape[index]))
    return found


def random_feeds(
    model: onnx.ModelProto,
    batch: int | None = None,
    dims: dict[str, int] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Seeded random inputs: floats standard normal, ints and bools 0/1 (valid token ids)."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for name, (shape, dtype) in resolve_input_shapes(model, batch=batch, dims=dims).items():
        size = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if size > MAX_RANDOM_INPUT_BYTES:
            raise LrsdError(f"input '{name}' of shape {list(shape)} is too large for random inputs "
                            f"({size / 2**30:.3g} GiB); give calibration data or --dim values")
        if dtype.kind == "f":
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            feeds[name] = rng.integers(0, 2, size=shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise LrsdError(f"input '{name}' has dtype {dtype}, which random inputs do not support")
    return feeds
