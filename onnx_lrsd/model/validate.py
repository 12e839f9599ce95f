"""Structural checks of a loaded model, so that a malformed one fails at once with a one-line
`LrsdError` naming what is wrong, instead of deep in the pipeline (or in onnxruntime).

Checked: the IR version against the installed onnx; an opset import for the default domain
when default-domain ops are used; every tensor defined once per graph (graph inputs, node
outputs, initializers; from IR 4 an initializer may also be listed as an input) and defined
before use (outer-scope names are visible in If / Loop / Scan bodies); graph outputs produced;
no cycles; input dims not negative; every stored tensor holding exactly the bytes its dims
declare. Duplicate node names, which onnxruntime refuses but which mean nothing to the
model, are repaired instead (`onnx_lrsd.model.naming.make_node_names_unique`).
"""
from __future__ import annotations

from collections import deque
from typing import Dict, Iterable, Iterator, List, Set

import numpy as np
import onnx
from onnx import TensorProto

from ..errors import LrsdError

_FIXED_ITEMSIZE = {t: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t)).itemsize
                   for t in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16,
                             TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16,
                             TensorProto.INT32, TensorProto.UINT32, TensorProto.INT64, TensorProto.UINT64,
                             TensorProto.BOOL, TensorProto.COMPLEX64, TensorProto.COMPLEX128)}
_FIXED_ITEMSIZE[TensorProto.BFLOAT16] = 2
_TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")


def check_model(model: onnx.ModelProto, what: str = "the model") -> None:
    """Raise `LrsdError` on the first structural defect of `model` (see the module doc)."""
    if model.ir_version > onnx.IR_VERSION:
        raise LrsdError(f"{what} has IR version {model.ir_version}, newer than the installed onnx reads "
                        f"({onnx.IR_VERSION})")
    domains = {o.domain or "" for o in model.opset_import}
    if "" not in domains and "ai.onnx" not in domains and any(
            (n.domain or "") in ("", "ai.onnx") for n in _all_nodes(model.graph)):
        raise LrsdError(f"{what} imports no opset of the default ONNX domain (opset_import is missing)")
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim if value.type.HasField("tensor_type") else ()
        for index, dim in enumerate(dims):
            if dim.HasField("dim_value") and dim.dim_value < 0:
                raise LrsdError(f"{what}: input '{value.name}' dim {index} is negative ({dim.dim_value})")
    _check_graph(model.graph, set(), model.ir_version, what)
    for tensor in _stored_tensors(model.graph):
        _check_tensor(tensor, what)


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for sub in _subgraphs(node):
            yield from _all_nodes(sub)


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def _stored_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
        for sub in _subgraphs(node):
            yield from _stored_tensors(sub)


def _check_graph(graph: onnx.GraphProto, outer: Set[str], ir_version: int, what: str) -> None:
    where = f"{what}" if not outer else f"{what}, graph '{graph.name}'"
    defined: Dict[str, str] = {}

    def define(name: str, by: str) -> None:
        if not name:
            return
        if name in defined:
            raise LrsdError(f"{where}: tensor '{name}' is defined more than once ({defined[name]} and {by})")
        defined[name] = by

    initializers = [t.name for t in graph.initializer] + [s.values.name for s in graph.sparse_initializer]
    for name in initializers:
        define(name, "an initializer")
    listed = set(initializers)
    for value in graph.input:
        if value.name in listed:  # IR < 4: every initializer; IR >= 4: an overridable default
            listed.discard(value.name)
            continue
        define(value.name, "a graph input")
    for node in graph.node:
        for output in node.output:
            define(output, f"node '{node.name or node.op_type}'")
    visible = outer | set(defined)
    for node in graph.node:
        for name in node.input:
            if name and name not in visible:
                raise LrsdError(f"{where}: node '{node.name or node.op_type}' reads '{name}', which no node, "
                                f"input or initializer defines")
        for sub in _subgraphs(node):
            _check_graph(sub, visible, ir_version, what)
    for value in graph.output:
        if value.name not in visible:
            raise LrsdError(f"{where}: graph output '{value.name}' is not produced by any node")
    _check_acyclic(graph.node, where)


def _check_acyclic(nodes: Iterable[onnx.NodeProto], where: str) -> None:
    """Kahn's algorithm on the explicit inputs: the nodes left over lie on a cycle."""
    nodes = list(nodes)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    waiting: List[int] = [0] * len(nodes)
    consumers: Dict[int, List[int]] = {}
    for i, node in enumerate(nodes):
        for source in {producer[name] for name in node.input if name in producer}:
            waiting[i] += 1
            consumers.setdefault(source, []).append(i)
    ready = deque(i for i, count in enumerate(waiting) if count == 0)
    done = 0
    while ready:
        i = ready.popleft()
        done += 1
        for j in consumers.get(i, ()):
            waiting[j] -= 1
            if waiting[j] == 0:
                ready.append(j)
    if done < len(nodes):
        stuck = next(nodes[i] for i, count in enumerate(waiting) if count > 0)
        raise LrsdError(f"{where}: the graph has a cycle (through node '{stuck.name or stuck.op_type}')")


def _check_tensor(tensor: onnx.TensorProto, what: str) -> None:
    if any(d < 0 for d in tensor.dims):
        raise LrsdError(f"{what}: tensor '{tensor.name}' has negative dims {list(tensor.dims)}")
    count = 1
    for d in tensor.dims:
        count *= int(d)
    itemsize = _FIXED_ITEMSIZE.get(tensor.data_type)
    if itemsize is None:
        return  # strings, 4-bit and 8-bit float types: not checked
    expected = count * itemsize
    if tensor.data_location == TensorProto.EXTERNAL:
        length = next((e.value for e in tensor.external_data if e.key == "length"), None)
        if length is not None and length.isdigit() and int(length) != expected:
            raise LrsdError(f"{what}: tensor '{tensor.name}' declares {list(tensor.dims)} ({expected} bytes) but its "
                            f"external data length is {length}")
        return
    if tensor.HasField("raw_data"):
        held = len(tensor.raw_data)
    else:
        values = next((v for f, v in tensor.ListFields() if f.name in _TYPED_FIELDS), ())
        per_element = 2 if tensor.data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128) else 1
        held = len(values) // per_element * itemsize
    if held != expected:
        raise LrsdError(f"{what}: tensor '{tensor.name}' declares {list(tensor.dims)} ({expected} bytes) but holds "
                        f"{held} bytes")
