"""Pass infrastructure: a pass rewrites the graph (or fills the context, `passes.context`) and
reports whether it changed anything; the manager runs passes in order and checks their
contracts."""
from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Sequence, Tuple

import onnx_graphsurgeon as gs

from .context import PassContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PassResult:
    graph: gs.Graph
    modified: bool
    stats: Dict[str, int] = field(default_factory=dict)


class Pass(ABC):
    """One job on the graph. `requires` names the passes that must run before it."""

    name: ClassVar[str]
    requires: ClassVar[Tuple[str, ...]] = ()

    @abstractmethod
    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        """Run the pass."""


class PassManager:
    """Runs passes in order and times them; the order is checked against each pass's
    `requires` when the manager is built."""

    def __init__(self, passes: Sequence[Pass], done: Sequence[str] = ()):
        """`done`: names of the passes an earlier manager already ran on the graph."""
        seen: List[str] = list(done)
        for p in passes:
            missing = [r for r in p.requires if r not in seen]
            if missing:
                raise ValueError(f"pass {p.name} requires {', '.join(missing)} to run before it")
            seen.append(p.name)
        self.passes = list(passes)

    def run(self, graph: gs.Graph, ctx: PassContext) -> gs.Graph:
        for p in self.passes:
            start = time.perf_counter()
            result = p.call(graph, ctx)
            ctx.timings[p.name] = time.perf_counter() - start
            log.debug("pass %s: modified=%s %s (%.2fs)", p.name, result.modified, result.stats, ctx.timings[p.name])
            graph = result.graph
        return graph
