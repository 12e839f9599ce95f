"""Pass infrastructure: a pass rewrites the graph (or fills the context) and reports whether
it changed anything; the manager runs passes in order and checks their contracts."""
from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..runtime.activations import Feeds, LayerStatistics
from ..plan.allocate import Sensitivity
from ..config import CompressConfig
from ..plan.candidates import LayerCandidate
from ..parallel.executor import Executor, InProcessExecutor
from ..plan.factorize import LayerFactorization
from ..plan.rank_select import LayerPlan, Residual
from ..report.types import AllocationSummary, JointGroupReport, LayerLatency, ResidualCheck
from ..model.layers import LayerTarget, SkippedLayer

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total): called as long work advances (the CLI draws bars)."""


@dataclass
class PassContext:
    """What the passes share: the run's config, the source model and its metadata, the
    calibration batches, and what each pass has found so far (targets, plans, the layers a
    global allocation may choose for with their error curves and sensitivities, kept for
    later allocations of the same run; statistics, factorizations, verification).
    `sparse_initializers` names the constants the rewrite wants saved as sparse initializers
    (unstructured residuals). `executor` runs the independent work (calibration shards,
    per-layer fits, curves, probes, microbenchmarks)."""

    config: CompressConfig
    source: onnx.ModelProto
    template: onnx.ModelProto
    progress: Optional[Progress] = None
    targets: Dict[str, LayerTarget] = field(default_factory=dict)
    skipped: List[SkippedLayer] = field(default_factory=list)
    plans: Dict[str, LayerPlan] = field(default_factory=dict)
    plan_options: Dict[str, List[LayerPlan]] = field(default_factory=dict)
    allocatable: List[str] = field(default_factory=list)
    curves: Dict[str, List[LayerCandidate]] = field(default_factory=dict)
    sensitivities: Dict[str, Sensitivity] = field(default_factory=dict)
    allocation: Optional[AllocationSummary] = None
    factorizations: Dict[str, LayerFactorization] = field(default_factory=dict)
    calibration: List[Feeds] = field(default_factory=list)
    statistics: Dict[str, LayerStatistics] = field(default_factory=dict)
    output_errors: Dict[str, float] = field(default_factory=dict)
    verified_on: str = ""
    layer_latency: Dict[str, LayerLatency] = field(default_factory=dict)
    groups: Dict[str, List[str]] = field(default_factory=dict)
    joint_ranks: Dict[str, Tuple[str, Tuple[int, int]]] = field(default_factory=dict)
    joint_reports: List[JointGroupReport] = field(default_factory=list)
    timings: Dict[str, float] = field(default_factory=dict)
    sparse_initializers: List[str] = field(default_factory=list)
    residual_check: Optional[ResidualCheck] = None
    reference_outputs: Optional[List[np.ndarray]] = None
    executor: Executor = field(default_factory=InProcessExecutor)

    def add_factorization(self, fact: LayerFactorization) -> None:
        """Store a layer's factors; a plan that asked for a sparse residual is updated to the
        rank and residual the fit chose."""
        self.factorizations[fact.name] = fact
        plan = self.plans[fact.name]
        if plan.sparse is not None:
            sparse = fact.sparse
            residual = None if sparse is None else Residual(
                sparse.structure, sparse.rows.size if sparse.structure == "rows" else sparse.nnz)
            self.plans[fact.name] = plan.with_residual(self.targets[fact.name], fact.low_rank.rank, residual)

    def report_progress(self, stage: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(stage, done, total)


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
