"""The compression pipeline: which passes run, in which order.

    prepare (once per run)          NameNodes → FindTargets → SelectRanks → CollectActivations
    round   (once per allocation)   GroupLayers → AllocateBudget → FitJointGroups → FilterResidualShares
                                    → ReconstructFeatureMaps → DecomposeWeights → CheckResidualModel
                                    → RewriteLowRank → MeasureLayerLatency → CleanupGraph → FuseElementwise
                                    [→ VerifyOutputs]

A run prepares the graph once; a target search (`passes.search`) runs rounds on copies of
the prepared graph, each with a fresh round state (`PassContext.next_round`)."""
from __future__ import annotations

from typing import List, Tuple

import onnx
import onnx_graphsurgeon as gs

from ..model.graph import export_model, import_graph
from .allocate_budget import AllocateBudgetPass
from .base import Pass, PassManager
from .check_residual_model import CheckResidualModelPass
from .cleanup_graph import CleanupGraphPass
from .collect_activations import CollectActivationsPass
from .context import PassContext
from .decompose_weights import DecomposeWeightsPass
from .filter_residual_shares import FilterResidualSharesPass
from .find_targets import FindTargetsPass
from .fit_joint_groups import FitJointGroupsPass
from .fuse_elementwise import FuseElementwisePass
from .group_layers import GroupLayersPass
from .measure_layer_latency import MeasureLayerLatencyPass
from .name_nodes import NameNodesPass
from .reconstruct_feature_maps import ReconstructFeatureMapsPass
from .rewrite_low_rank import RewriteLowRankPass
from .select_ranks import SelectRanksPass
from .verify_outputs import VerifyOutputsPass


def inspect_passes() -> List[Pass]:
    """What `inspect_model` runs: the targets and the skipped layers, no rank selection."""
    return [NameNodesPass(), FindTargetsPass()]


def prepare_passes() -> List[Pass]:
    """Once per run: names, targets, each layer's rank options, calibration statistics."""
    return [NameNodesPass(), FindTargetsPass(), SelectRanksPass(), CollectActivationsPass()]


PREPARED = tuple(p.name for p in prepare_passes())
"""The passes a prepared graph has been through."""


def round_passes(ctx: PassContext, correction: float = 1.0) -> List[Pass]:
    """Once per allocation: allocate (with a target, its prediction scaled by `correction`),
    fit, rewrite, clean up, fuse elementwise ops and verify."""
    passes = [GroupLayersPass(), AllocateBudgetPass(correction), FitJointGroupsPass(), FilterResidualSharesPass(),
              ReconstructFeatureMapsPass(), DecomposeWeightsPass(), CheckResidualModelPass(), RewriteLowRankPass(),
              MeasureLayerLatencyPass(), CleanupGraphPass(), FuseElementwisePass()]
    if ctx.config.verify:
        passes.append(VerifyOutputsPass())
    return passes


def inspect(source: onnx.ModelProto, ctx: PassContext) -> None:
    """Fill `ctx.targets` and `ctx.skipped` for `source`."""
    PassManager(inspect_passes()).run(import_graph(source), ctx)


def prepare(ctx: PassContext) -> gs.Graph:
    """The run's source graph through the preparation passes (filling `ctx`'s run state)."""
    return PassManager(prepare_passes()).run(import_graph(ctx.source), ctx)


def run_round(prepared: gs.Graph, ctx: PassContext, correction: float = 1.0,
              **changes) -> Tuple[PassContext, onnx.ModelProto]:
    """One round on a copy of the prepared graph and a fresh round state (`changes`: config
    fields of this round): returns (the round's context, the compressed model)."""
    ctx = ctx.next_round(**changes)
    graph = PassManager(round_passes(ctx, correction), done=PREPARED).run(prepared.copy(), ctx)
    return ctx, export_model(graph, ctx.template, ctx.sparse_initializers)
