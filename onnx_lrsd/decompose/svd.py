"""Data-free low rank: exact, Gram and randomized truncated SVD, energy-based rank choice.

Singular values are split as √σ on both factors (U = P_r S_r^½, V = S_r^½ Q_rᵀ), so
column j of U and row j of V both have norm √σ_j: balanced scales survive a cast to fp16.

Solvers of the truncated SVD (`SVD_SOLVERS`):
  exact  LAPACK's thin SVD of the whole matrix (gesdd, gesvd fallback).
  gram   the leading eigenvectors Q_r of the small side's Gram AᵀA (A the matrix made tall,
         [big, small]) give A ≈ (A Q_r) Q_rᵀ; σ_j = ‖A q_j‖ (a Rayleigh quotient taken on A
         itself, not √λ_j, so the squared condition number of the Gram only perturbs the
         subspace at second order). Cost: one [big, small]² product and a small-side eigh
         instead of a full SVD of A.
  auto   exact below `GRAM_MIN_SIDE` or when the kept spectrum is beyond the Gram's
         resolution (λ_r < `GRAM_RESOLUTION`·λ_1, i.e. σ_r/σ_1 < 10⁻⁶); gram otherwise.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg

from .factors import LowRankFactors, as_matrix, check_rank

__all__ = ["SVD_SOLVERS", "truncated_svd", "randomized_svd", "singular_values", "rank_for_energy"]

SVD_SOLVERS = ("auto", "exact", "gram")

GRAM_MIN_SIDE = 256
"""Below this smaller side the exact SVD costs milliseconds; auto takes it."""

GRAM_RESOLUTION = 1e-12
"""Smallest λ_r/λ_1 of the Gram for which auto trusts the Gram solver: eigenvalues carry an
absolute error of about n·ε·λ_1, and measured singular values stay within 10⁻⁹ (relative)
of the exact SVD's down to σ_r/σ_1 = 10⁻⁶."""

SUBSET_SHARE = 0.25
"""The Gram solver asks LAPACK for only the r leading eigenpairs (evr subset driver) when r is
at most this share of the small side, else for all of them (evd, faster there)."""


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


def check_solver(solver: str) -> str:
    """`solver` if it names one of `SVD_SOLVERS`, else ValueError."""
    if solver not in SVD_SOLVERS:
        raise ValueError(f"svd solver must be one of {', '.join(SVD_SOLVERS)}, got {solver!r}")
    return solver


def _leading_gram(a: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(λ, Q): the `rank` largest eigenpairs of AᵀA, largest first (A tall, rank ≥ 1)."""
    n = a.shape[1]
    gram = a.T @ a
    if rank <= SUBSET_SHARE * n:
        lam, q = scipy.linalg.eigh(gram, subset_by_index=[n - rank, n - 1], driver="evr", overwrite_a=True)
    else:
        lam, q = scipy.linalg.eigh(gram, driver="evd", overwrite_a=True)
        lam, q = lam[n - rank:], q[:, n - rank:]
    return lam[::-1], q[:, ::-1]


def _gram_factors(m: np.ndarray, rank: int, solver: str) -> LowRankFactors | None:
    """Balanced rank-r factors from the small side's Gram (module docstring), or None when
    `solver` is auto and the Gram cannot resolve the kept spectrum."""
    transposed = m.shape[0] < m.shape[1]
    a = m.T if transposed else m
    lam, q = _leading_gram(a, rank)
    if solver == "auto" and not lam[-1] >= GRAM_RESOLUTION * max(lam[0], 0.0) > 0.0:
        return None
    b = a @ q  # column j = σ_j p_j
    s = np.linalg.norm(b, axis=0)
    root = np.sqrt(s)
    left = b * np.divide(1.0, root, out=np.zeros_like(root), where=root > 0)
    right = root[:, None] * q.T
    return LowRankFactors(U=right.T, V=left.T) if transposed else LowRankFactors(U=left, V=right)


def truncated_svd(W: np.ndarray, rank: int, solver: str = "auto") -> LowRankFactors:
    """Best rank-r approximation in Frobenius norm (Eckart–Young), W [in, out], by `solver`
    (module docstring)."""
    m = as_matrix(W)
    rank = check_rank(rank, min(m.shape))
    check_solver(solver)
    if rank and (solver == "gram" or (solver == "auto" and min(m.shape) >= GRAM_MIN_SIDE)):
        factors = _gram_factors(m, rank, solver)
        if factors is not None:
            return factors
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


def singular_values(W: np.ndarray, solver: str = "auto") -> np.ndarray:
    """σ_1 ≥ σ_2 ≥ … ≥ 0 of W. The gram solver (auto from `GRAM_MIN_SIDE` on) takes
    √λ of the small side's Gram: absolute error about √(n·ε)·σ_1, ample for energy shares and
    tail errors, not for relative accuracy of tiny values."""
    m = as_matrix(W)
    check_solver(solver)
    if solver == "gram" or (solver == "auto" and min(m.shape) >= GRAM_MIN_SIDE):
        a = m.T if m.shape[0] < m.shape[1] else m
        lam = scipy.linalg.eigh(a.T @ a, eigvals_only=True, driver="evd", overwrite_a=True)
        return np.sqrt(np.maximum(lam[::-1], 0.0))
    return scipy.linalg.svdvals(m)


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
