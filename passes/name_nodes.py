"""Give every node a unique name (targets, overrides and reports refer to nodes by name)."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from .base import Pass, PassContext, PassResult


class NameNodesPass(Pass):
    """Names unnamed nodes `{op}_{index}` and suffixes duplicates; named nodes keep their name."""

    name = "name_nodes"

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        taken = set()
        renamed = 0
        for index, node in enumerate(graph.nodes):
            name = node.name or f"{node.op}_{index}"
            base, suffix = name, 1
            while name in taken:
                name, suffix = f"{base}_{suffix}", suffix + 1
            taken.add(name)
            if name != node.name:
                node.name = name
                renamed += 1
        return PassResult(graph, modified=renamed > 0, stats={"renamed": renamed})
