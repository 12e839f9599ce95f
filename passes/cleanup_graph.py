"""Remove what the rewrite left unused and restore topological order."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from .base import Pass, PassResult
from .context import PassContext


class CleanupGraphPass(Pass):
    """Drops dead nodes and tensors (replaced layers, their weights and Constant chains)."""

    name = "cleanup_graph"

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        before = len(graph.nodes)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        removed = before - len(graph.nodes)
        return PassResult(graph, modified=removed > 0, stats={"removed_nodes": removed})
