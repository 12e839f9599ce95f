"""Give every node a unique name (targets, overrides and reports refer to nodes by name)."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from ..model.validate import unique_name

from .base import Pass, PassResult
from .context import PassContext


class NameNodesPass(Pass):
    """Names unnamed nodes `{op}_{index}` and suffixes duplicates; named nodes keep their name."""

    name = "name_nodes"

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        taken: set = set()
        renamed = _name_nodes(graph, taken, prefix="")
        return PassResult(graph, modified=renamed > 0, stats={"renamed": renamed})


def _name_nodes(graph: gs.Graph, taken: set, prefix: str) -> int:
    """Name the nodes of `graph` and, recursively, of its If / Loop / Scan bodies (prefixed
    with the owning node's name)."""
    renamed = 0
    for index, node in enumerate(graph.nodes):
        name = unique_name(node.name or f"{prefix}{node.op}_{index}", taken)
        if name != node.name:
            node.name = name
            renamed += 1
        for value in node.attrs.values():
            for subgraph in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(subgraph, gs.Graph):
                    renamed += _name_nodes(subgraph, taken, prefix=f"{node.name}/")
    return renamed
