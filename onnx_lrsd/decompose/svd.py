"""Data-free low rank: exact and randomized truncated SVD, energy-based rank choice.

Singular values are split as √σ on both factors (U = P_r S_r^½, V = S_r^½ Q_rᵀ), so
column j of U and row j of V both have norm √σ_j: balanced scales survive a cast to fp16.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg

from .factors import LowRankFactors, as_matrix, check_rank

__all__ = ["truncated_svd", "randomized_svd", "singular_values", "rank_for_energy"]


def _svd(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD a = P diag(s) Qᵀ; falls back to the slower, sturdier gesvd driver."""
    try:
        return scipy.linalg.svd(a, full_matrices=False, lapack_driver="gesdd")
    except np.linalg.LinAlgError:
        return scipy.linalg.svd(a, full_matrices=False, lapack_driver="gesvd")


def _balanced_factors(p: np.ndarray, s: np.ndarray, qt: np.ndarray, rank: int) -> LowRankFactors:
    """U = P_r S_r^½, V = S_r^½ Q_rᵀ from a thin SVD (P, s, Qᵀ)."""
    root = np.sqrt(s[:rank])
    return LowRankFactors(U=p[:, :rank] * root, V=root[:, None] * qt[:rank])


def truncated_svd(W: np.ndarray, rank: int) -> LowRankFactors:
    """Best rank-r approximation in Frobenius norm (Eckart–Young), W [in, out]."""
    m = as_matrix(W)
    rank = check_rank(rank, min(m.shape))
    return _balanced_factors(*_svd(m), rank)


def randomized_svd(
    W: np.ndarray, rank: int, oversample: int = 10, n_iter: int = 4, seed: int = 0
) -> LowRankFactors:
    """Randomized range finder with power iterations (Halko, Martinsson, Tropp 2011).

    Q spans (W Wᵀ)^q W Ω with Ω a seeded Gaussian [out, r + oversample]; re-orthonormalised
    after every product. The SVD of the small QᵀW then gives the factors.
    """
    m = as_matrix(W)
    rank = check_rank(rank, min(m.shape))
    if oversample < 0 or n_iter < 0:
        raise ValueError(f"oversample and n_iter must be >= 0, got {oversample}, {n_iter}")
    width = min(rank + oversample, min(m.shape))
    omega = np.random.default_rng(seed).standard_normal((m.shape[1], width))
    q = np.linalg.qr(m @ omega)[0]
    for _ in range(n_iter):
        q = np.linalg.qr(m.T @ q)[0]
        q = np.linalg.qr(m @ q)[0]
    p_small, s, qt = _svd(q.T @ m)
    return _balanced_factors(q @ p_small, s, qt, rank)


def singular_values(W: np.ndarray) -> np.ndarray:
    """σ_1 ≥ σ_2 ≥ … ≥ 0 of W."""
    return scipy.linalg.svdvals(as_matrix(W))


def rank_for_energy(singular_values: np.ndarray, energy: float) -> int:
    """Smallest r with Σ_{i<r} σ_i² ≥ energy · Σ_i σ_i² (σ taken in decreasing order)."""
    s = np.asarray(singular_values, dtype=np.float64)
    if s.ndim != 1 or np.any(~np.isfinite(s)) or np.any(s < 0):
        raise ValueError("singular_values must be a 1-D array of finite values >= 0")
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    cumulative = np.cumsum(np.sort(s)[::-1] ** 2)
    if cumulative.size == 0 or cumulative[-1] == 0.0:
        return 0
    r = int(np.searchsorted(cumulative, energy * cumulative[-1], side="left")) + 1
    return min(r, s.size)
