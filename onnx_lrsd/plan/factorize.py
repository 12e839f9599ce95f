"""Turn a layer's plan into factors: the bridge from `LayerTarget` to the numeric kernels."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np

from ..config import AUTO_SHARE
from ..decompose import (
    LowRankFactors,
    LowRankSparse,
    SparseResidual,
    best_split,
    lrsd_fit,
    split_budget,
    Tucker2Factors,
    conv_to_matrix,
    data_error,
    matrix_to_conv,
    randomized_svd,
    sequential_target,
    spatial_matrix,
    spatial_matrix_to_conv,
    truncated_svd,
    tucker2,
    tucker2_whitened,
    whitened_svd,
)
from ..decompose.joint import TwoTerms
from ..decompose.stats import GramAccumulator
from .rank_select import LayerPlan, SparseRequest, residual_group
from ..model.layers import LayerTarget

Factors = Union[LowRankFactors, Tucker2Factors, LowRankSparse, TwoTerms]

EXACT_SVD_LIMIT = 2048
"""With the exact solver, above this smaller dimension low ranks use the randomized SVD (exact
SVD of VGG's 25088×4096 layer takes minutes)."""

TUCKER_ITERATIONS = 3
"""HOOI sweeps after the HOSVD start: the error barely moves after a few, and each sweep on a
512-channel conv costs two eigendecompositions."""


@dataclass(frozen=True)
class LayerFactorization:
    """The factors replacing one layer's weight.

    For svd/channel the factors approximate `target.matrix()` ([in, out]) — `LowRankFactors`,
    or `LowRankSparse` (W ≈ UV + S) when a non-empty sparse residual was fitted; for spatial
    they approximate `spatial_matrix(W)`; tucker2 holds `Tucker2Factors` of the conv weight.
    `bias_shift` ([out]) is added to the layer's output (bias correction); `data_error` is the
    relative reconstruction error of the layer's output on calibration data, when known.
    `shared` maps factor roles to keys: the rewrite writes one initializer per key, used by
    every layer of a joint group (`TwoTerms` factors: a "both" group member). `fallback`: for
    a layer given a residual, the plain chain of the same budget fitted the same way (what
    the model falls back to when its residuals do not pay).
    """

    name: str
    method: str
    factors: Optional[Factors]
    bias_shift: Optional[np.ndarray] = None
    data_error: Optional[float] = None
    shared: Tuple[Tuple[str, str], ...] = ()
    fallback: Optional["LayerFactorization"] = None

    def without_factors(self) -> LayerFactorization:
        """This record without its factor arrays (method, bias shift and data error kept),
        for when the rewrite has written them into the graph."""
        return dataclasses.replace(self, factors=None)

    @property
    def low_rank(self) -> Factors:
        """The factors without the sparse residual."""
        return self.factors.low_rank if isinstance(self.factors, LowRankSparse) else self.factors

    @property
    def sparse(self) -> Optional[SparseResidual]:
        """The sparse residual S, if any (never empty)."""
        return self.factors.sparse if isinstance(self.factors, LowRankSparse) else None


def layer_ridge(target: LayerTarget, config) -> float:
    """The relative ridge of the layer's whitened fit: `config.lookup_ridge` for a lookup table
    (its unseen tokens are directions calibration never excites, weighted λ·mean count),
    `config.ridge` for the rest."""
    return config.lookup_ridge if target.lookup else config.ridge


def low_rank(matrix: np.ndarray, rank: int, seed: int = 0, solver: str = "auto") -> LowRankFactors:
    """Best rank-`rank` factors of `matrix` by `solver` (`truncated_svd`); the exact solver
    goes randomized for large, thin-rank problems."""
    if solver == "exact" and min(matrix.shape) > EXACT_SVD_LIMIT and rank <= min(matrix.shape) // 4:
        return randomized_svd(matrix, rank, n_iter=6, seed=seed)
    return truncated_svd(matrix, rank, solver)


def fit_low_rank_sparse(w: np.ndarray, gram: Optional[np.ndarray], request: SparseRequest, budget: int,
                        ridge: float, eval_gram: Optional[np.ndarray] = None, seed: int = 0, group: int = 1,
                        min_gain: float = 0.0) -> Tuple[Union[LowRankFactors, LowRankSparse], LowRankFactors]:
    """(W ≈ L + S within `budget` parameters, the plain chain of that budget): min ‖X(W − L − S)‖²
    + μ‖W − L − S‖² (G = XᵀX; None: G = I, the weight error). A fixed share splits the budget
    (`split_budget`); "auto" fits every share of `request.auto_shares` and keeps the lowest
    error on `eval_gram` (held-out statistics; default `gram`) if it beats the plain chain's by
    `min_gain` (relative). Rows residuals come in blocks of `group` rows (a conv's input
    channel; unstructured entries ignore it). An empty residual comes back as plain
    `LowRankFactors`."""
    group = group if request.structure == "rows" else 1
    if request.share == AUTO_SHARE:
        choice = best_split(w, gram, budget, request.auto_shares, request.structure, ridge, eval_gram=eval_gram,
                            min_gain=min_gain, group=group, seed=seed)
        fit, plain = choice.fit, choice.plain.low_rank
    else:
        rank, sparse_budget = split_budget(*w.shape, budget, request.share, request.structure, group)
        fit = lrsd_fit(w, gram, rank, sparse_budget, request.structure, ridge, seed=seed, group=group)
        plain = None
    if plain is None and fit.sparse.nnz:
        plain = lrsd_fit(w, gram, split_budget(*w.shape, budget, 0.0)[0], 0, request.structure, ridge,
                         seed=seed).low_rank
    return (fit, plain) if fit.sparse.nnz else (fit.low_rank, fit.low_rank)


def factorize_data_free(target: LayerTarget, plan: LayerPlan, seed: int = 0, solver: str = "auto") -> LayerFactorization:
    """Factors that minimise the weight error ‖W − W′‖_F (no calibration data; a sparse
    residual is fitted with G = I); `solver` is the truncated SVD's."""
    if plan.sparse is not None:
        factors: Factors = fit_low_rank_sparse(target.matrix(), None, plan.sparse, plan.cost.params, 0.0, seed=seed,
                                               group=residual_group(target))[0]
    elif plan.method in ("svd", "channel"):
        factors = low_rank(target.matrix(), plan.ranks[0], seed, solver)
    elif plan.method == "spatial":
        factors = low_rank(spatial_matrix(np.asarray(target.weight, dtype=np.float64)), plan.ranks[0], seed, solver)
    elif plan.method == "tucker2":
        factors = tucker2(np.asarray(target.weight, dtype=np.float64), *plan.ranks, n_iter=TUCKER_ITERATIONS)
    else:
        raise ValueError(f"cannot factorize with method {plan.method!r}")
    return LayerFactorization(name=target.name, method=plan.method, factors=factors)


def vertical_gram(gram: np.ndarray, cin: int, kh: int, kw: int) -> np.ndarray:
    """Gram of the (Cin·kh) vertical patches: the im2col Gram's diagonal blocks over the kw
    horizontal taps, averaged (cross-tap correlations are dropped by the spatial objective)."""
    g = gram.reshape(cin, kh, kw, cin, kh, kw)
    return np.einsum("aibcjb->aicj", g).reshape(cin * kh, cin * kh) / kw


def channel_block_gram(gram: np.ndarray, cin: int, taps: int) -> np.ndarray:
    """Per-input-channel Gram: the im2col Gram's diagonal blocks over kernel taps, averaged."""
    return np.einsum("akbk->ab", gram.reshape(cin, taps, cin, taps)) / taps


def factorize_data_aware(target: LayerTarget, plan: LayerPlan, stats: GramAccumulator, ridge: float,
                         correct_bias: bool, holdout: Optional[GramAccumulator] = None,
                         residual_min_gain: float = 0.0, solver: str = "auto") -> LayerFactorization:
    """Factors minimising the layer's output error on calibration data.

    Independent (plain statistics of X): min ‖X W − X W′‖ over the plan's structure.
    Sequential (`stats` tracks X̂ᵀX): min ‖X W − X̂ W′‖, reduced to the independent problem on
    W* = Σ̂⁻¹ X̂ᵀX W with X̂'s Gram. A requested sparse residual is fitted in the same metric
    (`fit_low_rank_sparse`, "auto" judged on the held-out Gram and taken only if it beats the
    plain chain by `residual_min_gain`; the plain chain is kept as `fallback`). `solver` is the
    truncated SVD's (`truncated_svd`). Conv kinds use the im2col
    Gram (channel), its vertical-patch blocks (spatial) or its per-channel blocks (Tucker-2). The bias shift restores the mean
    output: E[x] W − E[x̂] W′.
    """
    w = target.matrix()
    gram = np.asarray(stats.gram)
    sequential = stats.track_cross
    w_fit = sequential_target(w, gram, stats.cross, ridge).W_star if sequential else w
    check = holdout if holdout is not None and holdout.count else stats
    plain = None
    if plan.sparse is not None:
        eval_gram = np.asarray(holdout.gram) if check is holdout else None
        factors, plain = fit_low_rank_sparse(w_fit, gram, plan.sparse, plan.cost.params, ridge, eval_gram,
                                             group=residual_group(target), min_gain=residual_min_gain)
        approx = factors.to_dense()
    elif plan.method in ("svd", "channel"):
        factors = whitened_svd(w_fit, gram, plan.ranks[0], ridge, solver)
        approx = factors.to_dense()
    elif plan.method == "spatial":
        cout, cin, kh, kw = target.weight.shape
        conv_fit = matrix_to_conv(w_fit, cin, (kh, kw))
        factors = whitened_svd(spatial_matrix(conv_fit), vertical_gram(gram, cin, kh, kw), plan.ranks[0], ridge,
                               solver)
        approx = conv_to_matrix(spatial_matrix_to_conv(factors.to_dense(), cout, cin, kh, kw))
    elif plan.method == "tucker2":
        cin, kernel = target.in_channels, target.conv.kernel_shape
        conv_fit = matrix_to_conv(w_fit, cin, kernel)
        cgram = channel_block_gram(gram, cin, int(np.prod(kernel)))
        factors = tucker2_whitened(conv_fit, cgram, *plan.ranks, ridge=ridge, n_iter=TUCKER_ITERATIONS)
        approx = conv_to_matrix(factors.to_dense())
    else:
        raise ValueError(f"cannot factorize with method {plan.method!r}")
    def finish(found: Factors, dense: np.ndarray, fallback: Optional[LayerFactorization] = None):
        shift = None
        if correct_bias:
            target_mean = stats.target_mean if sequential else stats.mean
            shift = target_mean @ w - stats.mean @ dense
        return LayerFactorization(name=target.name, method=plan.method, factors=found, bias_shift=shift,
                                  data_error=data_error(w, dense, np.asarray(check.gram)), fallback=fallback)

    fallback = finish(plain, plain.to_dense()) if isinstance(factors, LowRankSparse) else None
    return finish(factors, approx, fallback)
