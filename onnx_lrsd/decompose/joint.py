"""Joint matrix decomposition (JMD, Chen et al.) of same-shaped layers sharing one subspace.

Members W_i [in, out] with calibration Grams G_i; each term is weighted by c_i = 1/‖LᵢᵀWᵢ‖²
(LᵢLᵢᵀ = Σᵢ, the regularised Gram of ``whitening``), so the fit minimises the sum of the
members' squared relative output errors Σ cᵢ‖Lᵢᵀ(Wᵢ − Ŵᵢ)‖²:

- RJMD, shared output-side factor V [r, out]: Ŵᵢ = UᵢV. Closed form: with V's rows
  orthonormal, the best Uᵢ = WᵢVᵀ leaves Σ cᵢ‖LᵢᵀWᵢ(I − VᵀV)‖², so V is the top-r right
  singular subspace of the stacked [√c₁ L₁ᵀW₁; √c₂ L₂ᵀW₂; …].
- LJMD, shared input-side factor U [in, r]: Ŵᵢ = UVᵢ. Alternating least squares: Vᵢ =
  (UᵀΣᵢU)⁻¹UᵀΣᵢWᵢ, then U from the normal equations Σ cᵢ ΣᵢU(VᵢVᵢᵀ) = Σ cᵢ ΣᵢWᵢVᵢᵀ (conjugate
  gradients on that operator), starting from the whitened SVD of [√c₁W₁ | √c₂W₂ | …] under the
  mean Σ. With one shared Gram (Q, K, V of one attention layer) the start is already optimal.
- BJMD, both: Ŵᵢ = UVᵢ + UᵢV. For fixed shared U, V the own factors are solved exactly
  (`_own_both`); U and V are then refitted on the other part's residual, alternately, for as
  long as the objective falls.

Parameters count the shared factor once. Pure numpy/scipy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import scipy.linalg
import scipy.sparse.linalg

from .factors import LowRankFactors, as_matrix, as_square
from .whitened import whitening

SIDES = ("left", "right", "both")
ALS_ROUNDS = 12
WARM_ALS_ROUNDS = 3
BOTH_ROUNDS = 60
CG_STEPS = 20
TOLERANCE = 1e-6
"""Alternations stop when the objective falls by less than this share."""


@dataclass(frozen=True, eq=False)
class JointFactors:
    """Members Ŵᵢ = U·Vᵢ (left part, `U` shared) + Uᵢ·V (right part, `V` shared)."""

    side: str
    U: Optional[np.ndarray]                 # shared [in, r_left]
    V_own: Tuple[np.ndarray, ...]           # per member [r_left, out]
    U_own: Tuple[np.ndarray, ...]           # per member [in, r_right]
    V: Optional[np.ndarray]                 # shared [r_right, out]

    def terms(self, i: int) -> List[LowRankFactors]:
        """Member i as its chains (one, or two for "both")."""
        out = []
        if self.U is not None:
            out.append(LowRankFactors(self.U, self.V_own[i]))
        if self.V is not None:
            out.append(LowRankFactors(self.U_own[i], self.V))
        return out

    def to_dense(self, i: int) -> np.ndarray:
        return sum(t.U @ t.V for t in self.terms(i))

    def member(self, i: int):
        """Member i's factors: `LowRankFactors`, or `TwoTerms` for "both"."""
        terms = self.terms(i)
        return terms[0] if len(terms) == 1 else TwoTerms(*terms)

    @property
    def shared_roles(self) -> Tuple[str, ...]:
        """Which factors are shared, in the rewrite's role names ("U": the input side of the
        first chain, "V2": the output side of the second)."""
        return {"left": ("U",), "right": ("V",), "both": ("U", "V2")}[self.side]

    @property
    def n_params(self) -> int:
        shared = (self.U.size if self.U is not None else 0) + (self.V.size if self.V is not None else 0)
        return int(shared + sum(v.size for v in self.V_own) + sum(u.size for u in self.U_own))


@dataclass(frozen=True, eq=False)
class TwoTerms:
    """A member of a "both" group: W′ = first.U·first.V + second.U·second.V."""

    first: LowRankFactors
    second: LowRankFactors

    @property
    def shape(self) -> Tuple[int, int]:
        return self.first.shape

    def to_dense(self) -> np.ndarray:
        return self.first.U @ self.first.V + self.second.U @ self.second.V


def joint_ranks(side: str, shapes: Sequence[Tuple[int, int]], budget: int) -> Tuple[int, int]:
    """(r_left, r_right) whose parameters fit `budget` (shared factors counted once); "both"
    gives each part half the budget."""
    n, m = shapes[0]
    left_per_rank = n + sum(s[1] for s in shapes)
    right_per_rank = sum(s[0] for s in shapes) + m
    if side == "left":
        return budget // left_per_rank, 0
    if side == "right":
        return 0, budget // right_per_rank
    if side == "both":
        return (budget // 2) // left_per_rank, (budget // 2) // right_per_rank
    raise ValueError(f"side must be one of {SIDES}, got {side!r}")


def _metric(w: np.ndarray, gram: Optional[np.ndarray], ridge: float):
    """(Σ, √c) of one member: Σ = LLᵀ the regularised, scaled Gram; c = 1/‖LᵀW‖²."""
    g = np.eye(w.shape[0]) if gram is None else as_square(gram, w.shape[0], "gram")
    wh = whitening(g, ridge)
    sigma = wh.Lt.T @ wh.Lt
    norm = float(np.linalg.norm(wh.Lt @ w))
    return sigma, wh, (1.0 / norm if norm > 0 else 1.0)


def _objective(ws, sigmas, weights, approx) -> float:
    return float(sum(c * c * np.sum((w - a) * (s @ (w - a))) for w, s, c, a in zip(ws, sigmas, weights, approx)))


def _right(ws, whs, weights, rank: int):
    """RJMD closed form: (V [r, out], [Uᵢ])."""
    stacked = np.vstack([c * wh.Lt @ w for w, wh, c in zip(ws, whs, weights)])
    _, _, vt = np.linalg.svd(stacked, full_matrices=False)
    v = vt[:rank]
    return v, [w @ v.T for w in ws]


def _preconditioner(sigmas, weights, grams, n: int, rank: int):
    """X ↦ Σ̄⁻¹ X Ḡ⁻¹ for the operator X ↦ Σ cᵢ² ΣᵢXGᵢ: exact when every Σᵢ is the same
    (Σ̄ their mean weighted by cᵢ² tr Gᵢ, Ḡ = Σ cᵢ²Gᵢ), so CG needs few steps."""
    shares = [c * c * np.trace(g) for c, g in zip(weights, grams)]
    sigma_bar = sum(a * s for a, s in zip(shares, sigmas)) / max(sum(shares), 1e-300)
    g_bar = sum(c * c * g for c, g in zip(weights, grams))
    g_bar = g_bar + 1e-12 * max(np.trace(g_bar) / rank, 1e-300) * np.eye(rank)
    left, right = scipy.linalg.cho_factor(sigma_bar), scipy.linalg.cho_factor(g_bar)

    def apply(flat):
        return scipy.linalg.cho_solve(right, scipy.linalg.cho_solve(left, flat.reshape(n, rank)).T).T.ravel()

    return scipy.sparse.linalg.LinearOperator((n * rank, n * rank), matvec=apply, dtype=np.float64)


def _left(ws, sigmas, weights, rank: int, start: Optional[np.ndarray] = None, ridge: float = 1e-3):
    """LJMD by alternating least squares: (U [in, r], [Vᵢ])."""
    n = ws[0].shape[0]
    if start is None:
        mean = whitening(sum(sigmas) / len(sigmas), 0.0)
        stacked = np.hstack([c * w for w, c in zip(ws, weights)])
        p, _, _ = np.linalg.svd(mean.Lt @ stacked, full_matrices=False)
        u = mean.unwhiten(p[:, :rank])
    else:
        u = start
    best = None
    for _ in range(ALS_ROUNDS if start is None else WARM_ALS_ROUNDS):
        vs = [np.linalg.lstsq(u.T @ s @ u, u.T @ s @ w, rcond=None)[0] for w, s in zip(ws, sigmas)]
        value = _objective(ws, sigmas, weights, [u @ v for v in vs])
        if best is not None and value > best[0] * (1 - TOLERANCE):
            if value < best[0]:
                best = (value, u, vs)
            break
        best = (value, u, vs)
        grams = [v @ v.T for v in vs]
        rhs = sum(c * c * s @ w @ v.T for w, s, c, v in zip(ws, sigmas, weights, vs))

        def apply(flat, grams=grams):
            x = flat.reshape(n, rank)
            return sum(c * c * s @ x @ g for s, c, g in zip(sigmas, weights, grams)).ravel()

        op = scipy.sparse.linalg.LinearOperator((n * rank, n * rank), matvec=apply, dtype=np.float64)
        solved, _ = scipy.sparse.linalg.cg(op, rhs.ravel(), x0=u.ravel(), maxiter=CG_STEPS,
                                           M=_preconditioner(sigmas, weights, grams, n, rank))
        u = solved.reshape(n, rank)
    return best[1], best[2]


def _own_both(ws, sigmas, u, v):
    """Each member's own factors for fixed shared U and V (orthonormal rows), exactly:
    Vᵢ = (UᵀΣᵢU)⁻¹UᵀΣᵢWᵢ(I − VᵀV) (its part in V's row space is Uᵢ's job), Uᵢ = (Wᵢ − UVᵢ)Vᵀ."""
    outside = np.eye(v.shape[1]) - v.T @ v
    vs = [np.linalg.lstsq(u.T @ s @ u, u.T @ s @ w @ outside, rcond=None)[0] for w, s in zip(ws, sigmas)]
    return vs, [(w - u @ vi) @ v.T for w, vi in zip(ws, vs)]


def joint_fit(weights: Sequence[np.ndarray], grams: Optional[Sequence[Optional[np.ndarray]]], side: str,
              ranks: Tuple[int, int], ridge: float = 1e-3) -> JointFactors:
    """Fit the members jointly with `side` sharing at (r_left, r_right) (see the module)."""
    ws = [as_matrix(w) for w in weights]
    if len(ws) < 2:
        raise ValueError("a joint decomposition needs at least two members")
    if len({w.shape[0] for w in ws}) != 1 and side != "right" or len({w.shape[1] for w in ws}) != 1 and side != "left":
        raise ValueError(f"members must share the {'input' if side == 'left' else 'output'} size: "
                         f"{[w.shape for w in ws]}")
    r_left, r_right = ranks
    if side not in SIDES or (side != "right" and r_left < 1) or (side != "left" and r_right < 1):
        raise ValueError(f"side {side!r} needs positive ranks, got {ranks}")
    grams = list(grams) if grams is not None else [None] * len(ws)
    metrics = [_metric(w, g, ridge) for w, g in zip(ws, grams)]
    sigmas, whs, cs = [m[0] for m in metrics], [m[1] for m in metrics], [m[2] for m in metrics]
    if side == "right":
        v, us = _right(ws, whs, cs, r_right)
        return JointFactors("right", None, (), tuple(us), v)
    if side == "left":
        u, vs = _left(ws, sigmas, cs, r_left, ridge=ridge)
        return JointFactors("left", u, tuple(vs), (), None)
    v, _ = _right(ws, whs, cs, r_right)
    u, vs = _left([w - w @ v.T @ v for w in ws], sigmas, cs, r_left, ridge=ridge)
    best = None
    for _ in range(BOTH_ROUNDS):
        vs, us = _own_both(ws, sigmas, u, v)
        value = _objective(ws, sigmas, cs, [u @ vi + ui @ v for vi, ui in zip(vs, us)])
        if best is not None and value > best[0] * (1 - TOLERANCE):
            if value < best[0]:
                best = (value, u, vs, us, v)
            break
        best = (value, u, vs, us, v)
        u, _ = _left([w - ui @ v for w, ui in zip(ws, us)], sigmas, cs, r_left, start=u, ridge=ridge)
        v, _ = _right([w - u @ vi for w, vi in zip(ws, vs)], whs, cs, r_right)
        v = np.linalg.qr(v.T)[0].T  # orthonormal rows, as `_own_both` assumes
    _, u, vs, us, v = best
    return JointFactors("both", u, tuple(vs), tuple(us), v)


def joint_error_curves(weights: Sequence[np.ndarray], grams: Optional[Sequence[Optional[np.ndarray]]], side: str,
                       max_rank: int, ridge: float = 1e-3) -> np.ndarray:
    """[members, max_rank + 1]: member i's relative data-aware error ‖Lᵢᵀ(Wᵢ − Ŵᵢ)‖ / ‖LᵢᵀWᵢ‖
    at every shared rank 0..`max_rank`, for the allocation.

    - right: exact. With Bᵢ = cᵢLᵢᵀWᵢ and the stacked B = PSQᵀ, the shared V = Q_rᵀ leaves
      ‖Bᵢ(I − Q_rQ_rᵀ)‖² = Σ_{j>r} s_j²‖Pᵢ[:, j]‖².
    - left: the ALS start (whitened SVD of the weighted concatenation under the mean Σ, exact
      when the members share one Gram); the fit can only do better. With U_r its first r
      columns and Qᵢ the nested orthonormal basis of LᵢᵀU_r (QR), the best Vᵢ leaves
      ‖LᵢᵀWᵢ‖² − Σ_{j≤r}‖Qᵢ[:, j]ᵀLᵢᵀWᵢ‖².
    """
    ws = [as_matrix(w) for w in weights]
    grams = list(grams) if grams is not None else [None] * len(ws)
    metrics = [_metric(w, g, ridge) for w, g in zip(ws, grams)]
    out = np.zeros((len(ws), max_rank + 1))
    if side == "right":
        blocks = [c * wh.Lt @ w for w, (_, wh, c) in zip(ws, metrics)]
        p, s, _ = np.linalg.svd(np.vstack(blocks), full_matrices=False)
        start = 0
        for i, block in enumerate(blocks):
            energy = (s * np.linalg.norm(p[start:start + block.shape[0]], axis=0)) ** 2
            start += block.shape[0]
            out[i] = _tail_curve(energy, max_rank)
        return out
    if side != "left":
        raise ValueError(f"error curves are for the left and right sides, got {side!r}")
    sigmas = [m[0] for m in metrics]
    mean = whitening(sum(sigmas) / len(sigmas), 0.0)
    p, _, _ = np.linalg.svd(mean.Lt @ np.hstack([m[2] * w for w, m in zip(ws, metrics)]), full_matrices=False)
    u = mean.unwhiten(p[:, :max_rank])
    for i, (w, (_, wh, _)) in enumerate(zip(ws, metrics)):
        q, _ = np.linalg.qr(wh.Lt @ u)
        whitened = wh.Lt @ w
        captured = np.cumsum(np.sum((q.T @ whitened) ** 2, axis=1))
        total = max(float(np.sum(whitened ** 2)), 1e-300)
        out[i, 1:captured.size + 1] = np.sqrt(np.clip(1 - captured / total, 0, None))
        out[i, 0] = 1.0
        out[i, captured.size + 1:] = out[i, captured.size]
    return out


def _tail_curve(energy: np.ndarray, max_rank: int) -> np.ndarray:
    """sqrt(Σ_{j>r} energy_j / Σ energy) for r = 0..max_rank."""
    total = max(float(energy.sum()), 1e-300)
    tail = np.concatenate([total - np.concatenate([[0.0], np.cumsum(energy)]), np.zeros(max(0, max_rank))])
    return np.sqrt(np.clip(tail[:max_rank + 1] / total, 0, None))
