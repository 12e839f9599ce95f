"""Per-layer error curves: the relative reconstruction error of every candidate (kind × rank)
from the calibration statistics alone, without writing a model.

- svd / channel: the whitened spectrum s of LᵀW (LLᵀ = XᵀX + ridge) gives the error of the
  rank-r optimum at every r at once, e(r)² = Σ_{i>r} s_i² / Σ s_i².
- spatial: the same on the spatial matrix [Cin·kh, Cout·kw] with the vertical-patch Gram (the
  objective the spatial fit minimises).
- tucker2: a whitened Tucker-2 fit per grid point, scored with the full im2col Gram.
Without statistics (data-free), XᵀX = I: the plain singular values (a lookup table's I given as
its diagonal). A lookup's statistics are its token counts, a diagonal Gram (`stats.TokenCounts`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from ..config import CompressConfig
from .cost import Cost, applicable_methods, dense_cost, factorized_cost, full_ranks, pays
from ..decompose import (conv_to_matrix, data_error, relative_tail_errors, spatial_matrix, tucker2, tucker2_whitened,
                        whitened_spectrum)
from .factorize import TUCKER_ITERATIONS, channel_block_gram, layer_ridge, vertical_gram
from .rank_select import round_conv_rank
from ..model.layers import LayerTarget

GRID_POINTS = 24
"""Ranks per kind on a layer's curve: this many evenly spaced and as many geometrically spaced
(denser at low ranks, where a layer's true rank often lies) up to where factorizing stops paying."""

TUCKER_GRID = (0.08, 0.12, 0.18, 0.25, 0.35, 0.5)
"""Tucker-2 rank fractions ρ (r_in = ρ·Cin, r_out = ρ·Cout) tried per layer."""


@dataclass(frozen=True)
class LayerCandidate:
    """One way of factorizing a layer and what it is predicted to cost and lose."""

    method: str
    ranks: Tuple[int, ...]
    cost: Cost
    error: float


def rank_grid(largest: int, smallest: int, multiple: int, points: int = GRID_POINTS) -> List[int]:
    """Up to 2·`points` ranks from `smallest` to `largest` (linear and geometric), multiples of `multiple` where that
    loses little (conv blocks), ascending and distinct."""
    if largest < smallest:
        return []
    count = min(points, largest - smallest + 1)
    raw = np.unique(np.concatenate([np.linspace(smallest, largest, num=count),
                                    np.geomspace(smallest, largest, num=count)]).astype(int))
    ranks = {round_conv_rank(int(r), multiple, largest) if multiple > 1 else int(r) for r in raw}
    return sorted(r for r in ranks if r >= smallest)


def _largest_saving_rank(target: LayerTarget, method: str) -> int:
    """The largest single rank at which the factorization still pays (`pays`)."""
    dense = dense_cost(target)
    (limit,) = full_ranks(target, method)
    per_rank = factorized_cost(target, method, (1,))
    bound = min(limit, (dense.params - 1) // max(per_rank.params, 1))
    if not target.lookup:
        bound = min(bound, (dense.macs - 1) // max(per_rank.macs, 1))
    while bound > 0 and not pays(target, factorized_cost(target, method, (bound,))):
        bound -= 1
    return int(bound)


def layer_candidates(target: LayerTarget, gram: Optional[np.ndarray], config: CompressConfig) -> List[LayerCandidate]:
    """Every candidate of the layer that saves params and MACs, with its predicted error."""
    method = config.method
    kinds = applicable_methods(target) if method == "auto" else tuple(k for k in (method,) if k in applicable_methods(target))
    multiple = config.conv_rank_multiple if target.conv is not None else 1
    candidates: List[LayerCandidate] = []
    for kind in kinds:
        if kind == "tucker2":
            candidates.extend(_tucker2_candidates(target, gram, config))
            continue
        ranks = rank_grid(_largest_saving_rank(target, kind), config.min_rank, multiple)
        if not ranks:
            continue
        errors = relative_tail_errors(_spectrum(target, kind, gram, layer_ridge(target, config), config.svd_solver))
        candidates.extend(LayerCandidate(kind, (r,), factorized_cost(target, kind, (r,)), float(errors[r]))
                          for r in ranks)
    return candidates


def _spectrum(target: LayerTarget, kind: str, gram: Optional[np.ndarray], ridge: float, solver: str) -> np.ndarray:
    if kind == "spatial":
        w = np.asarray(target.weight, dtype=np.float64)
        cout, cin, kh, kw = w.shape
        matrix = spatial_matrix(w)
        g = np.eye(cin * kh) if gram is None else vertical_gram(gram, cin, kh, kw)
    else:
        matrix = target.matrix()
        g = gram if gram is not None else np.ones(matrix.shape[0]) if target.lookup else np.eye(matrix.shape[0])
    return whitened_spectrum(matrix, g, ridge, solver)


def _tucker2_candidates(target: LayerTarget, gram: Optional[np.ndarray], config: CompressConfig) -> List[LayerCandidate]:
    w = np.asarray(target.weight, dtype=np.float64)
    cout, cin = w.shape[:2]
    taps = int(np.prod(target.conv.kernel_shape))
    dense = dense_cost(target)
    metric = np.eye(cin * taps) if gram is None else gram
    seen, out = set(), []
    for rho in TUCKER_GRID:
        ranks = (round_conv_rank(max(1, int(rho * cin)), config.conv_rank_multiple, cin),
                 round_conv_rank(max(1, int(rho * cout)), config.conv_rank_multiple, cout))
        cost = factorized_cost(target, "tucker2", ranks)
        if ranks in seen or min(ranks) < config.min_rank or not pays(target, cost):
            continue
        seen.add(ranks)
        if gram is None:
            factors = tucker2(w, *ranks, n_iter=TUCKER_ITERATIONS)
        else:
            factors = tucker2_whitened(w, channel_block_gram(gram, cin, taps), *ranks, ridge=config.ridge,
                                       n_iter=TUCKER_ITERATIONS)
        error = data_error(target.matrix(), conv_to_matrix(factors.to_dense()), metric)
        out.append(LayerCandidate("tucker2", ranks, cost, float(error)))
    return out
