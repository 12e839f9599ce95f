"""Graph passes of the compression pipeline, one per module, each `<Verb><Object>Pass`; the
pipeline itself (which passes, in which order, per round) is `pipeline`, the searches over its
rounds `search`, the state they share `context`."""
from .allocate_budget import AllocateBudgetPass
from .base import Pass, PassManager, PassResult
from .check_residual_model import CheckResidualModelPass
from .cleanup_graph import CleanupGraphPass
from .collect_activations import CollectActivationsPass
from .context import PassContext, RoundOutput, RoundState, RunState
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

__all__ = [
    "Pass", "PassContext", "PassManager", "PassResult", "RunState", "RoundState", "RoundOutput",
    "NameNodesPass", "FindTargetsPass", "SelectRanksPass", "CollectActivationsPass", "AllocateBudgetPass",
    "GroupLayersPass", "FitJointGroupsPass", "FilterResidualSharesPass", "ReconstructFeatureMapsPass", "DecomposeWeightsPass",
    "CheckResidualModelPass", "RewriteLowRankPass", "MeasureLayerLatencyPass", "CleanupGraphPass", "FuseElementwisePass",
    "VerifyOutputsPass",
]
