"""Node and tensor names, in one place: targets, overrides, reports and per-layer profiles
refer to layers by node name, so the compressor, the loader and the profiler must name alike.

- Unnamed nodes are named ``{prefix}{op}_{index}`` (index in their graph; the prefix of an
  If / Loop / Scan body is ``{owner}/``), duplicates get ``_1``, ``_2``… (`unique_name`), in
  depth-first order over the graph and its bodies (`name_nodes`, for onnx and
  onnx-graphsurgeon graphs alike).
- New tensors and nodes of a factorized layer are ``{layer}/lrsd/{role}`` (`TensorNamer`),
  so a chain node belongs to layer ``layer_of(name)``.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Set, Tuple, Union

import onnx
import onnx_graphsurgeon as gs

CHAIN_MARK = "/lrsd/"
"""Separates a layer's name from the role of a node or tensor of its chain."""


def chain_name(layer: str, role: str) -> str:
    """``{layer}/lrsd/{role}``: a new tensor or node of `layer`'s chain."""
    return f"{layer}{CHAIN_MARK}{role}"


def layer_of(node_name: str) -> str:
    """The layer a node belongs to: ``{layer}/lrsd/{role}`` → ``{layer}``, else the node itself."""
    return node_name.split(CHAIN_MARK)[0]


def unique_name(name: str, taken: Set[str]) -> str:
    """`name`, or the first of ``name_1``, ``name_2``… not in `taken`; added to `taken`."""
    candidate, suffix = name, 1
    while candidate in taken:
        candidate, suffix = f"{name}_{suffix}", suffix + 1
    taken.add(candidate)
    return candidate


class TensorNamer:
    """Makes the names of new tensors and nodes (`chain_name`), unique among the graph's
    tensor and node names (a second compression of a compressed model meets the first
    one's names)."""

    def __init__(self, graph: gs.Graph):
        self._taken = set(graph.tensors().keys()) | {node.name for node in graph.nodes}

    def __call__(self, node_name: str, role: str) -> str:
        return unique_name(chain_name(node_name, role), self._taken)


Graph = Union[onnx.GraphProto, gs.Graph]


def name_nodes(graph: Union[Graph, onnx.ModelProto]) -> int:
    """Name unnamed nodes and suffix duplicates, in place, bodies included (see the module
    docstring); named unique nodes keep their names. Returns how many nodes were renamed."""
    graph = graph.graph if isinstance(graph, onnx.ModelProto) else graph
    return _name(graph, set(), "", unnamed_too=True)


def make_node_names_unique(model: onnx.ModelProto) -> int:
    """Suffix repeated node names in place, in the order `name_nodes` uses; unnamed nodes stay
    unnamed (the loader's repair; `name_nodes` names them later). Returns how many were renamed."""
    return _name(model.graph, set(), "", unnamed_too=False)


def _name(graph: Graph, taken: Set[str], prefix: str, unnamed_too: bool) -> int:
    renamed = 0
    for index, node in enumerate(_nodes(graph)):
        op, bodies = _op_and_bodies(node)
        if node.name or unnamed_too:
            name = unique_name(node.name or f"{prefix}{op}_{index}", taken)
            if name != node.name:
                node.name = name
                renamed += 1
        for body in bodies:
            renamed += _name(body, taken, f"{node.name}/", unnamed_too)
    return renamed


def _nodes(graph: Graph) -> Iterable:
    return graph.nodes if isinstance(graph, gs.Graph) else graph.node


def _op_and_bodies(node) -> Tuple[str, Iterator[Graph]]:
    """A node's op type and its subgraphs (If / Loop / Scan bodies) in attribute order."""
    if isinstance(node, gs.Node):
        values = (v for value in node.attrs.values() for v in (value if isinstance(value, (list, tuple)) else [value]))
        return node.op, (v for v in values if isinstance(v, gs.Graph))
    return node.op_type, (g for attr in node.attribute for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs))
