"""Find the layers to factorize, and list every other weight layer with the reason it stays."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from ..model.layers import LayerTarget, SkippedLayer, classify, is_weight_layer

from .base import Pass, PassResult
from .context import PassContext


class FindTargetsPass(Pass):
    """Fills `ctx.targets` (in topological order) and `ctx.skipped`. Weight layers inside
    If / Loop / Scan bodies are listed as skipped: subgraphs are not rewritten. The first node
    of a low-rank chain is listed as skipped: the chain is one target, named by its second."""

    name = "find_targets"
    requires = ("name_nodes",)

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        graph.toposort()
        for node in graph.nodes:
            found = classify(node, graph)
            if isinstance(found, LayerTarget):
                ctx.targets[found.name] = found
            elif isinstance(found, SkippedLayer):
                ctx.skipped.append(found)
            for subgraph in _subgraphs(node):
                ctx.skipped.extend(_subgraph_layers(subgraph, f"inside {'an' if node.op == 'If' else 'a'} {node.op} body (subgraphs are not rewritten)"))
        for chain in [t for t in ctx.targets.values() if t.chain_first is not None]:
            first = ctx.targets.pop(chain.chain_first, None)
            if first is not None:
                ctx.skipped.append(SkippedLayer(first.name, first.op, f"first factor of the low-rank chain {chain.name}"))
        return PassResult(graph, modified=False, stats={"targets": len(ctx.targets), "skipped": len(ctx.skipped)})


def _subgraphs(node: gs.Node):
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (v for v in value if isinstance(v, gs.Graph))


def _subgraph_layers(graph: gs.Graph, reason: str):
    for node in graph.nodes:
        if is_weight_layer(node):
            yield SkippedLayer(node.name, node.op, reason)
        for subgraph in _subgraphs(node):
            yield from _subgraph_layers(subgraph, reason)
