"""Give every node a unique name (targets, overrides and reports refer to nodes by name)."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from ..model.naming import name_nodes

from .base import Pass, PassResult
from .context import PassContext


class NameNodesPass(Pass):
    """Names unnamed nodes `{op}_{index}` and suffixes duplicates; named nodes keep their name
    (`onnx_lrsd.model.naming`, the names the profiler gives too)."""

    name = "name_nodes"

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        renamed = name_nodes(graph)
        return PassResult(graph, modified=renamed > 0, stats={"renamed": renamed})
