"""Automatic rank choice by empirical variational Bayesian matrix factorization (EVBMF).

Global analytic solution of Nakajima, Sugiyama, Babacan, Tomioka (JMLR 2013) for V = B Aᵀ + E,
E ~ N(0, σ²), V of size L×M with L ≤ M (a wider-than-tall matrix is read transposed),
α = L/M. With x_h = γ_h² / (M σ²) for the observed singular values γ_h:

- τ̄ is the zero of Ξ(τ) = Φ(τ) + Φ(τ/α), Φ(z) = log(1+z)/z − ½, and x̄ = (1+τ̄)(1+α/τ̄);
- a component survives iff γ_h > γ_EVB = σ √(M x̄), shrunk to
  γ̂_h = γ_h/2 · (1 − (L+M)σ²/γ_h² + √((1 − (L+M)σ²/γ_h²)² − 4LMσ⁴/γ_h⁴));
- σ² (when unknown) minimises the free energy over [σ̲², σ̄²] (bounds of the paper).

MUSCO (Gusak et al. 2019) softens the EVBMF rank with ``weakened_rank``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.optimize

from .factors import as_matrix, check_rank
from .svd import singular_values

__all__ = ["EVBMFResult", "evbmf", "evbmf_rank", "weakened_rank"]


@dataclass(frozen=True, eq=False)
class EVBMFResult:
    """EVBMF rank, noise variance σ², threshold γ_EVB and shrunk singular values (descending)."""

    rank: int
    sigma2: float
    threshold: float
    posterior_singular_values: np.ndarray


def _is_real(value: object) -> bool:
    """A real scalar (int or float, numpy's included), not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _tau_bar(alpha: float) -> float:
    """τ̄: the zero of Ξ(τ) = Φ(τ) + Φ(τ/α) with Φ(z) = log(1+z)/z − ½; √α ≤ τ̄ ≤ 2.513."""
    def xi(tau: float) -> float:
        return math.log1p(tau) / tau + alpha * math.log1p(tau / alpha) / tau - 1.0
    return scipy.optimize.brentq(xi, math.sqrt(alpha), 2.6, xtol=1e-14)


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    """τ(x) = ½(x − (1+α) + √((x − (1+α))² − 4α)), the larger root of τ + α/τ = x − 1 − α."""
    b = x - (1.0 + alpha)
    return 0.5 * (b + np.sqrt(np.maximum(b * b - 4.0 * alpha, 0.0)))


def _free_energy(sigma2: float, s2: np.ndarray, L: int, M: int, x_bar: float) -> float:
    """EVB free energy in σ², up to terms independent of σ² (s2: all L squared values)."""
    alpha = L / M
    x = s2 / (M * sigma2)
    large = x > x_bar
    t = _tau(x[large], alpha)
    kept = x[large] - t + np.log1p(t) + alpha * np.log1p(t / alpha)
    return float(x[~large].sum() + kept.sum() + L * math.log(sigma2))


def _estimate_sigma2(s2: np.ndarray, L: int, M: int, x_bar: float) -> float:
    """argmin of the free energy on [σ̲², σ̄²]: σ̄² = Σγ²/(LM),
    σ̲² = max(γ²_{η+1}/(M x̄), mean_{h>η} γ_h²/M), η = ⌈L/(1+α)⌉ − 1."""
    upper = s2.sum() / (L * M)
    eta = min(math.ceil(L / (1.0 + L / M)) - 1, L - 1)
    lower = max(s2[eta] / (M * x_bar), s2[eta:].mean() / M)
    lower = min(max(lower, 1e-12 * upper), upper)  # exact zeros / rounding: keep a valid interval
    unit = s2 / upper  # σ² in units of σ̄², so the solver's absolute tolerance is a relative one
    found = scipy.optimize.minimize_scalar(
        _free_energy, bounds=(lower / upper, 1.0), args=(unit, L, M, x_bar),
        method="bounded", options={"xatol": 1e-10},
    )
    return float(found.x) * upper


def evbmf(
    singular_values: np.ndarray, shape: tuple[int, int], sigma2: float | None = None
) -> EVBMFResult:
    """EVBMF rank of an L×M matrix from its singular values (any order; missing ones count as 0).

    σ² is estimated when not given. Posterior values are sorted descending, zero beyond the rank.
    """
    integers = all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in shape)
    if not isinstance(shape, (tuple, list)) or len(shape) != 2 or not integers:
        raise ValueError(f"shape must be two integers, got {shape!r}")
    L, M = sorted(int(n) for n in shape)
    if L < 2:
        raise ValueError(f"shape {tuple(shape)} is too small: EVBMF needs both sides >= 2")
    s = np.asarray(singular_values, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"singular_values must be a non-empty 1-D array, got shape {s.shape}")
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise ValueError("singular_values must be finite and >= 0")
    if s.size > L:
        raise ValueError(f"{s.size} singular values given for shape {tuple(shape)}: at most {L}")
    s = np.sort(s)[::-1]
    alpha = L / M
    tau_bar = _tau_bar(alpha)
    x_bar = (1.0 + tau_bar) * (1.0 + alpha / tau_bar)
    if sigma2 is None:
        if not np.any(s > 0):
            return EVBMFResult(0, 0.0, 0.0, np.zeros_like(s))
        sigma2 = _estimate_sigma2(np.pad(s, (0, L - s.size)) ** 2, L, M, x_bar)
    elif not (_is_real(sigma2) and math.isfinite(sigma2) and sigma2 > 0):
        raise ValueError(f"sigma2 must be a finite number > 0, got {sigma2!r}")
    threshold = math.sqrt(M * sigma2 * x_bar)
    rank = int(np.count_nonzero(s > threshold))
    kept = s[:rank]
    a = 1.0 - (L + M) * sigma2 / kept**2
    posterior = np.zeros_like(s)
    root = np.sqrt(np.maximum(a * a - 4.0 * L * M * sigma2**2 / kept**4, 0.0))
    posterior[:rank] = 0.5 * kept * (a + root)
    return EVBMFResult(rank, float(sigma2), threshold, posterior)


def evbmf_rank(matrix: np.ndarray) -> EVBMFResult:
    """``evbmf`` of a 2-D matrix's singular values, σ² estimated."""
    m = as_matrix(matrix, "matrix")
    return evbmf(singular_values(m), m.shape)


def weakened_rank(full_rank: int, extreme_rank: int, weakening: float) -> int:
    """MUSCO's weakened rank ⌊R − w·(R − r_EVB)⌋, clipped to [max(r_EVB, 1), R].

    w = 0 keeps the full rank R, w = 1 is the plain EVBMF rank r_EVB.
    """
    full_rank = check_rank(full_rank, np.iinfo(np.int64).max, "full_rank", minimum=1)
    extreme_rank = check_rank(extreme_rank, full_rank, "extreme_rank")
    if not _is_real(weakening) or not 0.0 <= weakening <= 1.0:  # also rejects NaN
        raise ValueError(f"weakening must be a number in [0, 1], got {weakening!r}")
    rank = math.floor(full_rank - weakening * (full_rank - extreme_rank))
    return int(min(max(rank, extreme_rank, 1), full_rank))
