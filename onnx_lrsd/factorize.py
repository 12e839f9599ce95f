"""Turn a layer's plan into factors: the bridge from `LayerTarget` to the numeric kernels."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from .decompose import (
    LowRankFactors,
    Tucker2Factors,
    randomized_svd,
    spatial_matrix,
    truncated_svd,
    tucker2,
)
from .rank_select import LayerPlan
from .targets import LayerTarget

Factors = Union[LowRankFactors, Tucker2Factors]

EXACT_SVD_LIMIT = 2048
"""Above this smaller dimension, low ranks use the randomized SVD (exact SVD of VGG's
25088×4096 layer takes minutes)."""

TUCKER_ITERATIONS = 3
"""HOOI sweeps after the HOSVD start: the error barely moves after a few, and each sweep on a
512-channel conv costs two eigendecompositions."""


@dataclass(frozen=True)
class LayerFactorization:
    """The factors replacing one layer's weight.

    For svd/channel the factors approximate `target.matrix()` ([in, out]); for spatial they
    approximate `spatial_matrix(W)`; tucker2 holds `Tucker2Factors` of the conv weight.
    `bias_shift` ([out]) is added to the layer's output (bias correction); `data_error` is the
    relative reconstruction error of the layer's output on calibration data, when known.
    """

    name: str
    method: str
    factors: Factors
    bias_shift: Optional[np.ndarray] = None
    data_error: Optional[float] = None


def low_rank(matrix: np.ndarray, rank: int, seed: int = 0) -> LowRankFactors:
    """Best rank-`rank` factors of `matrix` (randomized for large, thin-rank problems)."""
    if min(matrix.shape) > EXACT_SVD_LIMIT and rank <= min(matrix.shape) // 4:
        return randomized_svd(matrix, rank, n_iter=6, seed=seed)
    return truncated_svd(matrix, rank)


def factorize_data_free(target: LayerTarget, plan: LayerPlan, seed: int = 0) -> LayerFactorization:
    """Factors that minimise the weight error ‖W − W′‖_F (no calibration data)."""
    if plan.method in ("svd", "channel"):
        factors: Factors = low_rank(target.matrix(), plan.ranks[0], seed)
    elif plan.method == "spatial":
        factors = low_rank(spatial_matrix(np.asarray(target.weight, dtype=np.float64)), plan.ranks[0], seed)
    elif plan.method == "tucker2":
        factors = tucker2(np.asarray(target.weight, dtype=np.float64), *plan.ranks, n_iter=TUCKER_ITERATIONS)
    else:
        raise ValueError(f"cannot factorize with method {plan.method!r}")
    return LayerFactorization(name=target.name, method=plan.method, factors=factors)
