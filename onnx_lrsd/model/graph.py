"""Graph helpers: ModelProto <-> onnx-graphsurgeon graph with the model's metadata kept,
resolution of constant weights, and naming of new tensors."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Set, Tuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from ..errors import LrsdError
from .io import runtime_ir_version
from .mapped import map_external_constants, mapped_directory, mapped_values

log = logging.getLogger(__name__)


def copy_fields(source, target, but: str) -> None:
    """Copy every set field of the protobuf message `source` into `target` except field `but`."""
    for field, value in source.ListFields():
        if field.name == but:
            continue
        if field.is_repeated:
            getattr(target, field.name).extend(value)
        elif field.message_type is not None:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def model_template(model: onnx.ModelProto) -> onnx.ModelProto:
    """Everything of `model` but its graph (IR version, opsets, metadata, functions), plus
    the graph's overridable initializers, which the graph editor would drop."""
    template = onnx.ModelProto()
    copy_fields(model, template, but="graph")
    template.graph.initializer.extend(overridable_initializers(model))
    return template


def overridable_initializers(model: onnx.ModelProto) -> list:
    """Initializers also listed as graph inputs from IR 4 on: defaults a caller may override,
    so not constants (before IR 4 every initializer was listed so)."""
    if model.ir_version < 4:
        return []
    inputs = {i.name for i in model.graph.input}
    return [t for t in model.graph.initializer if t.name in inputs]


def strip_initializer_inputs(model: onnx.ModelProto) -> None:
    """Old models (IR < 4) list every initializer among the graph inputs; drop those entries
    in place, so that inputs are only what a user feeds (they come back at export). From IR 4
    on, an initializer listed as an input is an overridable default: it stays an input."""
    if model.ir_version >= 4:
        return
    names = {t.name for t in model.graph.initializer}
    kept = [i for i in model.graph.input if i.name not in names]
    if len(kept) < len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(kept)


def _copied(model: onnx.ModelProto) -> onnx.ModelProto:
    clone = onnx.ModelProto()
    clone.CopyFrom(model)
    return clone


SKELETON_BYTES = 1024
"""Initializers from this size on are left out of the copy shape inference works on."""


def weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose top-level initializers of `SKELETON_BYTES` or more keep their
    name, type and dims but no values (marked external): what shape inference needs, without
    copying the weights (inference serializes its input and parses its output: four copies)."""
    skeleton = onnx.ModelProto()
    copy_fields(model, skeleton, but="graph")
    graph = model.graph
    copy_fields(graph, skeleton.graph, but="initializer")
    for tensor in graph.initializer:
        if tensor.HasField("raw_data") and len(tensor.raw_data) >= SKELETON_BYTES or tensor.external_data:
            stub = skeleton.graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims,
                                                  data_location=onnx.TensorProto.EXTERNAL)
            stub.external_data.add(key="location", value="weights-left-out")
        else:
            skeleton.graph.initializer.append(tensor)
    return skeleton


def fix_input_dims(model: onnx.ModelProto, dims: Mapping[str, int]) -> None:
    """Give the graph inputs' symbolic dims named in `dims` their values, and an unknown first
    dim the value 1 (batch 1), in place; stale inferred shapes are dropped."""
    for inp in model.graph.input:
        for index, dim in enumerate(inp.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                continue
            if dim.dim_param in dims:
                dim.dim_value = int(dims[dim.dim_param])
            elif index == 0:
                dim.dim_value = 1
    del model.graph.value_info[:]
    for out in model.graph.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")


def infer_shapes(model: onnx.ModelProto, dims: Optional[Mapping[str, int]] = None) -> onnx.ModelProto:
    """The shapes shape inference finds (in `value_info` and the outputs) on a weightless
    copy of `model` (with `dims`: its inputs fixed by `fix_input_dims` first); the weightless
    copy unchanged where inference fails."""
    skeleton = weightless(model)
    if dims is not None:
        fix_input_dims(skeleton, dims)
    try:
        return onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True)
    except Exception as exc:  # inference is best effort: unknown ops
        log.warning("shape inference failed (%s); MACs of some layers will be unknown", str(exc).splitlines()[0])
        return skeleton


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    shapes = infer_shapes(model).graph  # before stripping: IR < 4 inference reads initializers as inputs
    inferred = _copied(model)
    del inferred.graph.value_info[:]
    inferred.graph.value_info.extend(shapes.value_info)
    del inferred.graph.output[:]
    inferred.graph.output.extend(shapes.output)
    strip_initializer_inputs(inferred)
    overridable = {t.name for t in overridable_initializers(inferred)}
    if overridable:  # imported as plain graph inputs; `export_model` puts the defaults back
        kept = [t for t in inferred.graph.initializer if t.name not in overridable]
        del inferred.graph.initializer[:]
        inferred.graph.initializer.extend(kept)
    try:
        graph = gs.import_onnx(inferred)
    except Exception as exc:  # graphsurgeon rejects malformed graphs with assorted exceptions
        raise LrsdError(f"cannot read the graph: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    directory = mapped_directory()
    if directory is not None:
        map_external_constants(graph, directory)
    return graph


def export_model(graph: gs.Graph, template: onnx.ModelProto, sparse: Iterable[str] = ()) -> onnx.ModelProto:
    """Turn a graph back into a model with the template's IR version (capped at what
    onnxruntime accepts), opsets, metadata_props and functions. The initializers named in
    `sparse` are saved as sparse initializers (`to_sparse_initializer`)."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    exported = gs.export_onnx(graph, do_type_check=False)
    model = onnx.ModelProto()
    model.CopyFrom(template)
    model.graph.CopyFrom(exported.graph)
    _sparsify_initializers(model.graph, set(sparse))
    model.graph.initializer.extend(template.graph.initializer)
    model.ir_version = runtime_ir_version(template.ir_version)
    if model.ir_version < 4:
        listed = {i.name for i in model.graph.input}
        model.graph.input.extend(
            onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
            for t in model.graph.initializer if t.name not in listed)
    return model


def to_sparse_initializer(tensor: onnx.TensorProto) -> onnx.SparseTensorProto:
    """COO sparse tensor of `tensor`'s non-zeros: values [nnz] and linear indices [nnz]
    (int64, row-major, ascending), dims the dense shape."""
    dense = numpy_helper.to_array(tensor)
    flat = np.flatnonzero(dense)
    values = numpy_helper.from_array(dense.reshape(-1)[flat], tensor.name)
    indices = numpy_helper.from_array(flat.astype(np.int64), f"{tensor.name}/indices")
    return onnx.helper.make_sparse_tensor(values, indices, list(tensor.dims))


def _sparsify_initializers(graph: onnx.GraphProto, names: Set[str]) -> None:
    """Move the initializers named in `names` to `graph.sparse_initializer`."""
    if not names:
        return
    kept = [t for t in graph.initializer if t.name not in names]
    moved = [t for t in graph.initializer if t.name in names]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.sparse_initializer.extend(to_sparse_initializer(t) for t in moved)


@dataclass(frozen=True)
class ResolvedConstant:
    """A tensor whose value is known before run time, and the tensors it was derived through
    (Identity, Cast, Transpose, Constant, ConstantOfShape)."""

    values: np.ndarray
    chain: Tuple[gs.Tensor, ...]


_PASS_THROUGH = ("Identity", "Cast", "Transpose")


def resolve_constant(tensor: gs.Tensor) -> Optional[ResolvedConstant]:
    """The value of `tensor` if it is a constant or derived from one by Identity / Cast /
    Transpose / Constant / ConstantOfShape nodes, else None."""
    chain = [tensor]
    transforms = []
    current = tensor
    while True:
        if isinstance(current, gs.Constant):
            mapped = mapped_values(current)
            values = mapped if mapped is not None else np.asarray(current.values)
            break
        if len(current.inputs) != 1:
            return None
        node = current.inputs[0]
        if node.op == "Constant":
            values = _constant_node_value(node)
            if values is None:
                return None
            break
        if node.op == "ConstantOfShape":
            shape = node.inputs[0] if node.inputs else None
            if not isinstance(shape, gs.Constant):
                return None
            fill = node.attrs.get("value")
            fill_value = np.asarray(fill.values).reshape(-1)[:1] if fill is not None else np.zeros(1, np.float32)
            values = np.full(tuple(int(d) for d in np.asarray(shape.values).reshape(-1)), fill_value[0],
                             dtype=fill_value.dtype)
            break
        if node.op not in _PASS_THROUGH or not node.inputs:
            return None
        transforms.append(node)
        current = node.inputs[0]
        chain.append(current)
    for node in reversed(transforms):
        try:
            if node.op == "Cast":
                values = values.astype(onnx.helper.tensor_dtype_to_np_dtype(node.attrs["to"]))
            elif node.op == "Transpose":
                values = np.transpose(values, node.attrs.get("perm"))
        except (KeyError, TypeError, ValueError):  # an invalid perm or target type: not a weight we can read
            return None
    return ResolvedConstant(values=values, chain=tuple(chain))


def _constant_node_value(node: gs.Node) -> Optional[np.ndarray]:
    attrs = node.attrs
    if "value" in attrs:
        value = attrs["value"]
        return np.asarray(value.values if isinstance(value, gs.Constant) else value)
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        if key in attrs:
            return np.asarray(attrs[key], dtype=dtype)
    return None


def sole_consumer(resolved: ResolvedConstant, node: gs.Node, graph: gs.Graph) -> bool:
    """True when every tensor on the constant's chain feeds only the next one (and `node`),
    and none is a graph output: rewriting the weight then changes nothing else."""
    outputs = set(id(t) for t in graph.outputs)
    for tensor in resolved.chain:
        if id(tensor) in outputs or len(tensor.outputs) != 1:
            return False
    return resolved.chain[0].outputs[0] is node


def tensor_to_array(tensor: onnx.TensorProto) -> np.ndarray:
    return numpy_helper.to_array(tensor)
