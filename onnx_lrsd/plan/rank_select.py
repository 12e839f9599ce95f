"""Per-layer choice of factorization kind and ranks from a keep ratio, an energy threshold or
an explicit rank."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import numpy as np

from ..config import AUTO_SHARES, FULL_RANK, CompressConfig
from .cost import Cost, applicable_methods, dense_cost, factorized_cost, full_ranks, pays, residual_cost
from ..decompose import evbmf_rank, rank_for_energy, singular_values, spatial_matrix, weakened_rank
from ..model.layers import LayerTarget

DENSE = "dense"


@dataclass(frozen=True)
class SparseRequest:
    """A sparse residual wanted for a layer: `share` of its budget (a float, or "auto": the
    best of `auto_shares`, which a latency check may narrow)."""

    share: Union[float, str]
    structure: str
    auto_shares: Tuple[float, ...] = AUTO_SHARES


@dataclass(frozen=True)
class Residual:
    """The sparse residual a layer got: `size` is k input rows ("rows") or nnz entries."""

    structure: str
    size: int


@dataclass(frozen=True)
class LayerPlan:
    """What happens to one layer: `method` is a factorization kind or "dense" (with `reason`).

    `sparse`: the residual requested (its budget is `cost.params` of the L-only plan);
    `residual`: the one fitted, with `ranks` and `cost` updated to the L + S chain.
    """

    name: str
    op: str
    method: str
    ranks: Tuple[int, ...]
    cost: Cost
    dense: Cost
    reason: str = ""
    sparse: Optional[SparseRequest] = None
    residual: Optional[Residual] = None

    @property
    def factorized(self) -> bool:
        return self.method != DENSE

    def with_residual(self, target: LayerTarget, rank: int, residual: Optional[Residual]) -> "LayerPlan":
        """This plan after an L + S fit: rank `rank` plus `residual` (None: the fit kept none)."""
        if residual is None:
            cost = factorized_cost(target, self.method, (rank,))
        else:
            cost = residual_cost(target, rank, residual.structure, residual.size)
        return dataclasses.replace(self, ranks=(rank,), cost=cost, residual=residual)


def sparse_applies(target: LayerTarget, method: str) -> bool:
    """Residuals fit Gemm and MatMul with the weight on the right (svd), and convs factorized
    by channel: a 1×1 conv with stride 1 and no padding is a matmul over channels (x[:, P] a
    channel Gather concatenated into the chain); any other conv keeps whole input channels,
    a Gather and a conv of the layer's geometry on them (`residual_group` rows each)."""
    if method == "svd":
        return target.conv is None and target.weight_side == "right" and not target.lookup
    return method == "channel" and target.conv is not None


def residual_group(target: LayerTarget) -> int:
    """Rows per unit of a rows residual: a conv's kernel taps (its input channel is a block of
    prod(kernel) consecutive im2col rows), else 1."""
    return int(np.prod(target.conv.kernel_shape)) if target.conv is not None else 1


def dense_plan(target: LayerTarget, reason: str) -> LayerPlan:
    cost = dense_cost(target)
    return LayerPlan(target.name, target.op, DENSE, (), cost, cost, reason)


ROUNDING_LOSS = 0.25
"""Largest share of a conv rank given up to round it down to a block multiple."""


def round_conv_rank(rank: int, multiple: int, limit: int) -> int:
    """Round a conv rank down to a multiple of `multiple` (onnxruntime's NCHWc blocks) when
    that gives up at most `ROUNDING_LOSS` of it (a rank of 31 is not cut to 16); never above
    `limit`."""
    rounded = (rank // multiple) * multiple
    if rounded >= multiple and rounded >= (1 - ROUNDING_LOSS) * rank:
        rank = rounded
    return max(1, min(rank, limit))


def budget_ranks(target: LayerTarget, method: str, keep: float, multiple: int) -> Tuple[int, ...]:
    """The largest ranks whose parameters fit in ``keep`` × the dense layer's."""
    budget = keep * target.params
    is_conv = target.conv is not None
    if method == "tucker2":
        cin, cout = target.in_channels, target.out_channels
        k = int(np.prod(target.conv.kernel_shape))
        # params(ρ) = ρ (Cin² + Cout²) + ρ² Cin Cout k with r_in = ρ Cin, r_out = ρ Cout
        a, b = cin * cout * k, cin * cin + cout * cout
        rho = (-b + math.sqrt(b * b + 4 * a * budget)) / (2 * a)
        return (round_conv_rank(int(rho * cin), multiple, cin), round_conv_rank(int(rho * cout), multiple, cout))
    per_rank = factorized_cost(target, method, (1,)).params
    (limit,) = full_ranks(target, method)
    rank = int(budget // per_rank)
    return (round_conv_rank(rank, multiple, limit) if is_conv else max(1, min(rank, limit)),)


def _unfoldings(target: LayerTarget, method: str) -> List[np.ndarray]:
    """The matrices whose ranks `method` sets: the layer matrix (svd, channel), the spatial
    matrix, or the Cin and Cout unfoldings of the kernel (tucker2)."""
    if method in ("svd", "channel"):
        return [target.matrix()]
    w = np.asarray(target.weight, dtype=np.float64)
    if method == "spatial":
        return [spatial_matrix(w)]
    return [np.moveaxis(w, 1, 0).reshape(w.shape[1], -1), w.reshape(w.shape[0], -1)]


def energy_ranks(target: LayerTarget, method: str, energy: float) -> Tuple[int, ...]:
    """Smallest ranks that keep `energy` of the squared singular values of the matrices the
    method factorizes (tucker2: of each mode's unfolding)."""
    return tuple(rank_for_energy(singular_values(m), energy) for m in _unfoldings(target, method))


def evbmf_ranks(target: LayerTarget, method: str, weakening: float) -> Tuple[int, ...]:
    """MUSCO's weakened EVBMF ranks of the matrices `method` factorizes:
    R − weakening·(R − r_EVBMF), R the full rank of each (a matrix with a side of 1 keeps it)."""
    return tuple(min(m.shape) if min(m.shape) < 2 else weakened_rank(min(m.shape), evbmf_rank(m).rank, weakening)
                 for m in _unfoldings(target, method))


def plan_layer(target: LayerTarget, config: CompressConfig, total_params: int = 0) -> LayerPlan:
    """Choose kind and ranks for one layer (overrides first, then the global settings): of
    the candidate plans, the one with the fewest MACs."""
    return min(candidate_plans(target, config, total_params), key=lambda p: (p.cost.macs, p.cost.params))


def candidate_plans(target: LayerTarget, config: CompressConfig, total_params: int = 0) -> List[LayerPlan]:
    """Every plan the configuration allows for the layer: one per applicable kind that pays
    (`pays`: cuts params and MACs; a lookup's, params) at the layer's budget (a data-aware fit then keeps the one with the
    lowest error), a single forced plan, or a single dense plan with the reason. Plans ask for
    a sparse residual within the same budget when `config.sparse_share` is set."""
    return [with_sparse_request(plan, target, config) for plan in _low_rank_plans(target, config, total_params)]


def with_sparse_request(plan: LayerPlan, target: LayerTarget, config: CompressConfig) -> LayerPlan:
    """`plan` asking for the configured sparse residual within its budget, where one applies."""
    if plan.factorized and config.sparse_share != 0 and sparse_applies(target, plan.method):
        return dataclasses.replace(plan, sparse=SparseRequest(config.sparse_share, config.sparse_structure))
    return plan


def _low_rank_plans(target: LayerTarget, config: CompressConfig, total_params: int) -> List[LayerPlan]:
    """The L-only candidates. A layer under `config.min_layer_share` of `total_params` (all
    targets' parameters) stays dense unless an override gives it a keep ratio."""
    override = config.override_for(target.name)
    if override is not None and override.skip:
        return [dense_plan(target, "skipped by configuration")]
    method = (override.method if override and override.method else config.method)
    methods = applicable_methods(target)
    if method != "auto" and method not in methods:
        return [dense_plan(target, f"method {method} does not apply (possible: {', '.join(methods)})")]
    kinds = methods if method == "auto" else (method,)
    forced = override.rank if override is not None else None
    if forced is not None:
        return [_forced_plan(target, kinds[0], forced)]
    keep = override.keep if override and override.keep is not None else config.keep
    if target.params < config.min_layer_share * total_params and (override is None or override.keep is None):
        return [dense_plan(target, f"under {config.min_layer_share:.1%} of the factorizable parameters")]
    energy = override.energy if override and override.energy is not None else config.energy
    dense = dense_cost(target)
    plans = []
    for kind in kinds:
        ranks = budget_ranks(target, kind, keep, config.conv_rank_multiple)
        wanted = (energy_ranks(target, kind, energy) if energy is not None else
                  evbmf_ranks(target, kind, config.evbmf) if config.evbmf is not None else None)
        if wanted is not None:
            ranks = tuple(min(budget, max(rank, config.min_rank)) for budget, rank in zip(ranks, wanted))
        cost = factorized_cost(target, kind, ranks)
        if pays(target, cost) and min(ranks) >= config.min_rank:
            plans.append(LayerPlan(target.name, target.op, kind, ranks, cost, dense))
    return plans or [dense_plan(target, f"no factorization at keep={keep:g} cuts both params and MACs "
                                        f"with rank >= {config.min_rank}")]


def _forced_plan(target: LayerTarget, method: str, rank) -> LayerPlan:
    limits = full_ranks(target, method)
    if rank == FULL_RANK:
        ranks = limits
    else:
        ranks = tuple(min(int(rank), limit) for limit in limits)
    if any(r == 0 for r in ranks):
        return dense_plan(target, "rank 0 requested")
    return LayerPlan(target.name, target.op, method, ranks, factorized_cost(target, method, ranks), dense_cost(target))
