"""Data-aware low rank: minimise the layer-output error on calibration data, from XᵀX alone.

With G = XᵀX and Σ = G + λ·(tr G / in)·I = L Lᵀ,
    ‖X(W − A)‖²_F + λ·(tr G / in)·‖W − A‖²_F = ‖Lᵀ(W − A)‖²_F,
and A ↦ LᵀA is a bijection on rank-r matrices, so the optimum is the truncated SVD of
LᵀW = P S Qᵀ mapped back: U = L^{-T} P_r S_r^½, V = S_r^½ Q_rᵀ. The ridge pulls the
approximation towards W (never towards zero), so directions the data never excites are kept.

A diagonal Gram, given as its diagonal g [in] (one-hot inputs: a lookup table's token counts,
`stats.TokenCounts`), is never made dense: with σ = g + λ·mean(g) the objective is the weighted
row fit Σ_v σ_v ‖W_v − U_v V‖², whose optimal V spans the top-r right singular vectors of
diag(√σ)·W; each row's U_v is then its own least-squares fit W_v Vᵀ(VVᵀ)⁻¹, whatever its weight
(`whitened_svd`). `whitened_spectrum` and `data_error` take the diagonal too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import scipy.linalg

from .factors import LowRankFactors, as_matrix, as_square, check_rank
from .svd import singular_values, truncated_svd

__all__ = [
    "Whitening",
    "SequentialTarget",
    "whitening",
    "whitened_svd",
    "is_diagonal",
    "sequential_target",
    "data_error",
    "bias_correction",
]


def _ridge_shift(gram: np.ndarray, ridge: float) -> float:
    """λ · tr(G)/in: the ridge relative to the mean eigenvalue (mean taken as 1 if G = 0);
    G dense [in, in] or its diagonal [in]."""
    if not (np.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"ridge must be finite and >= 0, got {ridge}")
    mean_eig = (np.trace(gram) if gram.ndim == 2 else np.sum(gram)) / gram.shape[0]
    return ridge * (mean_eig if mean_eig > 0 else 1.0)


def is_diagonal(gram) -> bool:
    """A Gram given as its diagonal [in] (`TokenCounts.gram`), not as [in, in]."""
    return np.ndim(gram) == 1


def diagonal_weights(gram: np.ndarray, dim: int, ridge: float) -> np.ndarray:
    """σ / scale for a diagonal Gram g [dim]: σ = g + λ·mean(g), scale = mean(g) (1 if g = 0),
    the row weights of the diagonal whitened objective."""
    g = np.asarray(gram, dtype=np.float64)
    if g.shape != (dim,) or not np.all(np.isfinite(g)) or np.any(g < 0):
        raise ValueError(f"a diagonal gram must be {dim} finite values >= 0, got shape {g.shape}")
    mean = g.mean()
    return (g + _ridge_shift(g, ridge)) / (mean if mean > 0 else 1.0)


@dataclass(frozen=True, eq=False)
class Whitening:
    """A square root Σ = L Lᵀ, held as ``Lt`` = Lᵀ.

    ``eigvals`` is None when Lᵀ is Cholesky's upper triangle; otherwise Lᵀ = diag(√w) Eᵀ from
    the eigendecomposition Σ = E diag(w) Eᵀ, with w floored to stay invertible.
    """

    Lt: np.ndarray
    eigvals: np.ndarray | None

    def unwhiten(self, p: np.ndarray) -> np.ndarray:
        """L^{-T} p."""
        if self.eigvals is None:
            return scipy.linalg.solve_triangular(self.Lt, p, lower=False)
        return self.Lt.T @ (p / self.eigvals[:, None])


def whitening(gram: np.ndarray, ridge: float = 1e-6) -> Whitening:
    """Square root of Σ = (G + λ·(tr G/in)·I) / scale, scale = tr G/in (1 if G = 0).

    The scale changes no optimum but keeps L near unit size. Cholesky first; if Σ is not
    numerically positive definite (dead inputs with λ = 0, rounding), a symmetric
    eigendecomposition with eigenvalues floored at in·ε·max(w, 1) is used instead.
    """
    g = as_matrix(gram, "gram")
    if g.shape[0] != g.shape[1]:
        raise ValueError(f"gram must be square, got {g.shape}")
    n = g.shape[0]
    mean_eig = np.trace(g) / n
    scale = mean_eig if mean_eig > 0 else 1.0
    sigma = (g + g.T) / (2.0 * scale)
    sigma[np.diag_indices(n)] += _ridge_shift(g, ridge) / scale
    try:
        return Whitening(Lt=scipy.linalg.cholesky(sigma, lower=False), eigvals=None)
    except np.linalg.LinAlgError:
        w, e = scipy.linalg.eigh(sigma)
        w = np.maximum(w, n * np.finfo(np.float64).eps * max(w[-1], 1.0))
        return Whitening(Lt=np.sqrt(w)[:, None] * e.T, eigvals=w)


def _balance(U: np.ndarray, V: np.ndarray) -> LowRankFactors:
    """Rescale each pair (U[:, j], V[j]) to equal norms; U @ V is unchanged."""
    nu = np.linalg.norm(U, axis=0)
    nv = np.linalg.norm(V, axis=1)
    ok = (nu > 0) & (nv > 0)
    d = np.ones_like(nu)
    d[ok] = np.sqrt(nv[ok] / nu[ok])
    return LowRankFactors(U=U * d, V=V / d[:, None])


def whitened_svd(
    W: np.ndarray, gram: np.ndarray, rank: int, ridge: float = 1e-6, solver: str = "auto"
) -> LowRankFactors:
    """argmin over rank-r U V of ‖X(W − UV)‖²_F + λ·(tr G/in)·‖W − UV‖²_F, G = XᵀX.

    Exact (U V = W) at full rank; factor pairs are rescaled to equal norms. `solver` is the
    truncated SVD's of LᵀW (`truncated_svd`). A 1-D `gram` is a diagonal Gram (module docstring).
    """
    m = as_matrix(W)
    rank = check_rank(rank, min(m.shape))
    if is_diagonal(gram):
        return _diagonal_whitened_svd(m, diagonal_weights(gram, m.shape[0], ridge), rank, solver)
    wh = whitening(as_square(gram, m.shape[0], "gram"), ridge)
    f = truncated_svd(wh.Lt @ m, rank, solver)
    return _balance(wh.unwhiten(f.U), f.V)


def _diagonal_whitened_svd(m: np.ndarray, weights: np.ndarray, rank: int, solver: str) -> LowRankFactors:
    """argmin Σ_v w_v ‖m_v − U_v V‖²: V from the truncated SVD of diag(√w)·m, U = m V⁺ (for a
    fixed V every row's least-squares fit, independent of its weight)."""
    if rank == 0:
        return LowRankFactors(U=np.zeros((m.shape[0], 0)), V=np.zeros((0, m.shape[1])))
    v = truncated_svd(np.sqrt(weights)[:, None] * m, rank, solver).V
    return _balance(np.linalg.lstsq(v.T, m.T, rcond=None)[0].T, v)


def whitened_spectrum(W: np.ndarray, gram: np.ndarray, ridge: float = 1e-6, solver: str = "auto") -> np.ndarray:
    """Singular values s of LᵀW (LLᵀ = G + ridge), descending: the rank-r whitened SVD leaves
    ‖X(W − W′)‖² = Σ_{i>r} s_i², so one spectrum gives a layer's error at every rank
    (`singular_values` with `solver`; a 1-D `gram` is diagonal: the singular values of diag(√σ)·W)."""
    m = as_matrix(W)
    if is_diagonal(gram):
        return singular_values(np.sqrt(diagonal_weights(gram, m.shape[0], ridge))[:, None] * m, solver)
    wh = whitening(as_square(gram, m.shape[0], "gram"), ridge)
    return singular_values(wh.Lt @ m, solver)


def relative_tail_errors(spectrum: np.ndarray) -> np.ndarray:
    """e[r] = sqrt(Σ_{i≥r} s_i² / Σ s_i²) for r = 0 … len(s): the relative error at rank r."""
    s2 = np.asarray(spectrum, dtype=np.float64) ** 2
    total = float(s2.sum())
    tails = np.concatenate([np.cumsum(s2[::-1])[::-1], [0.0]])
    return np.sqrt(np.maximum(tails, 0.0) / total) if total > 0 else np.zeros(len(s2) + 1)


class SequentialTarget(NamedTuple):
    """``W_star`` [in, out] and the regularised ``gram_hat_reg`` Σ̂ [in, in] it was solved with."""

    W_star: np.ndarray
    gram_hat_reg: np.ndarray


def _solve_psd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a⁻¹ b for symmetric PSD a (least-squares minimum-norm solution if a is singular)."""
    try:
        return scipy.linalg.cho_solve(scipy.linalg.cho_factor(a), b)
    except np.linalg.LinAlgError:
        return scipy.linalg.lstsq(a, b)[0]


def sequential_target(
    W: np.ndarray, gram_hat: np.ndarray, cross: np.ndarray, ridge: float = 1e-6
) -> SequentialTarget:
    """Reduce min ‖XW − X̂W′‖² (+ ridge) over rank-r W′ to a whitened SVD problem.

    With Σ̂ = X̂ᵀX̂ + μI, μ = λ·tr(X̂ᵀX̂)/in, and W* = Σ̂⁻¹ (X̂ᵀX + μI) W:
        ‖XW − X̂W′‖² + μ‖W − W′‖² = ‖X̂(W* − W′)‖² + μ‖W* − W′‖² + const,
    so the caller runs ``whitened_svd(W_star, gram_hat, r, ridge)`` (same Σ̂), or equivalently
    ``whitened_svd(W_star, gram_hat_reg, r, ridge=0.0)``. With X̂ = X, W* = W.
    """
    m = as_matrix(W)
    n = m.shape[0]
    g = as_square(gram_hat, n, "gram_hat")
    c = as_square(cross, n, "cross")
    shift = _ridge_shift(g, ridge)
    sigma = (g + g.T) / 2.0 + shift * np.eye(n)
    w_star = _solve_psd(sigma, c @ m + shift * m)
    return SequentialTarget(W_star=w_star, gram_hat_reg=sigma)


def _same_shape(a: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    """``a`` as float64 with exactly ``shape``, or ValueError."""
    arr = np.asarray(a, dtype=np.float64)
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    return arr


def data_error(W: np.ndarray, W_approx: np.ndarray, gram: np.ndarray) -> float:
    """‖X(W − W′)‖_F / ‖XW‖_F = sqrt(tr(DᵀGD) / tr(WᵀGW)), D = W − W′ (inf if XW = 0 ≠ XD);
    a 1-D `gram` is diag(G): sqrt(Σ_v g_v ‖D_v‖² / Σ_v g_v ‖W_v‖²)."""
    m = as_matrix(W)
    d = m - _same_shape(W_approx, m.shape, "W_approx")
    if is_diagonal(gram):
        g = diagonal_weights(gram, m.shape[0], 0.0)
        num, den = float(g @ np.sum(d * d, axis=1)), float(g @ np.sum(m * m, axis=1))
    else:
        g = as_square(gram, m.shape[0], "gram")
        num = max(float(np.sum(d * (g @ d))), 0.0)
        den = max(float(np.sum(m * (g @ m))), 0.0)
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return float(np.sqrt(num / den))


def bias_correction(W: np.ndarray, W_approx: np.ndarray, mean_x: np.ndarray) -> np.ndarray:
    """mean_x @ (W − W′) [out]: added to the bias, it restores the mean output."""
    m = as_matrix(W)
    d = m - _same_shape(W_approx, m.shape, "W_approx")
    mu = np.asarray(mean_x, dtype=np.float64)
    if mu.shape != (m.shape[0],):
        raise ValueError(f"mean_x must have shape ({m.shape[0]},), got {mu.shape}")
    return mu @ d
