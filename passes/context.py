"""The state the passes share during one compression run, in three parts: what is fixed or
found once per run (`RunState`), the working state of one round (`RoundState`: an
allocation, fit and rewrite of the prepared graph), and what a round reports
(`RoundOutput`). A target search runs several rounds on one prepared graph:
`PassContext.next_round` starts each from the run's state with fresh round parts."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import onnx

from ..config import CompressConfig
from ..model.graph import model_template
from ..model.layers import LayerTarget, SkippedLayer
from ..parallel.executor import Executor, InProcessExecutor
from ..plan.allocate import Sensitivity
from ..plan.candidates import LayerCandidate
from ..plan.factorize import LayerFactorization
from ..plan.rank_select import LayerPlan, Residual
from ..report.types import AllocationSummary, JointGroupReport, LayerLatency, ResidualCheck
from ..runtime.activations import Feeds, LayerStatistics

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total): called as long work advances (the CLI draws bars)."""


@dataclass
class RunState:
    """Fixed for the run or found once and reused by every round: the config (a round may
    change fields of its copy), the source model and its metadata, the calibration batches
    and their statistics, the targets, and for a global allocation the layers it may choose
    for with their error curves and sensitivities. `executor` runs the independent work
    (calibration shards, per-layer fits, curves, probes, microbenchmarks)."""

    config: CompressConfig
    source: onnx.ModelProto
    template: onnx.ModelProto
    progress: Optional[Progress] = None
    executor: Executor = field(default_factory=InProcessExecutor)
    calibration: List[Feeds] = field(default_factory=list)
    reference_outputs: Optional[List[np.ndarray]] = None
    targets: Dict[str, LayerTarget] = field(default_factory=dict)
    skipped: List[SkippedLayer] = field(default_factory=list)
    statistics: Dict[str, LayerStatistics] = field(default_factory=dict)
    allocatable: List[str] = field(default_factory=list)
    curves: Dict[str, List[LayerCandidate]] = field(default_factory=dict)
    sensitivities: Dict[str, Sensitivity] = field(default_factory=dict)


@dataclass
class RoundState:
    """One round's working state. `plans` / `plan_options` start as the prepared ones (rank
    selection) and the round's allocation changes them; `groups` and `joint_ranks` are the
    joint groups and their shared ranks; `sparse_initializers` names the constants the
    rewrite wants saved as sparse initializers (unstructured residuals)."""

    plans: Dict[str, LayerPlan] = field(default_factory=dict)
    plan_options: Dict[str, List[LayerPlan]] = field(default_factory=dict)
    groups: Dict[str, List[str]] = field(default_factory=dict)
    joint_ranks: Dict[str, Tuple[str, Tuple[int, int]]] = field(default_factory=dict)
    factorizations: Dict[str, LayerFactorization] = field(default_factory=dict)
    sparse_initializers: List[str] = field(default_factory=list)


@dataclass
class RoundOutput:
    """What a round reports: its allocation, output errors (and on what they were measured),
    per-layer latencies, joint groups, the written-model residual check, and each pass's
    seconds (a round keeps the preparation's)."""

    allocation: Optional[AllocationSummary] = None
    output_errors: Dict[str, float] = field(default_factory=dict)
    verified_on: str = ""
    layer_latency: Dict[str, LayerLatency] = field(default_factory=dict)
    joint_reports: List[JointGroupReport] = field(default_factory=list)
    residual_check: Optional[ResidualCheck] = None
    timings: Dict[str, float] = field(default_factory=dict)


CARRIED = ("plans", "plan_options", "timings")
"""Round fields a new round starts from (copied) instead of empty."""


@dataclass
class PassContext(RoundOutput, RoundState, RunState):
    """What the passes share: the run's state, the current round's and its output."""

    def next_round(self, **changes) -> "PassContext":
        """A context for a new round on the same run: fresh `RoundState` / `RoundOutput`
        (copies of the `CARRIED` fields), the config with `changes` applied."""
        fresh = {f.name: self._fresh(f) for f in dataclasses.fields(RoundState) + dataclasses.fields(RoundOutput)}
        return dataclasses.replace(self, config=self.config.replace(**changes) if changes else self.config, **fresh)

    def _fresh(self, f: dataclasses.Field):
        if f.name in CARRIED:
            return copy_of(getattr(self, f.name))
        return f.default if f.default_factory is dataclasses.MISSING else f.default_factory()

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


def copy_of(value):
    """A shallow copy of a dict or list (the round changes its own)."""
    return type(value)(value)


def new_context(source: onnx.ModelProto, config: CompressConfig, progress: Optional[Progress] = None) -> PassContext:
    """The context of a run on `source`."""
    return PassContext(config=config, source=source, template=model_template(source), progress=progress)
