"""Low rank + sparse (LRSD / CMD): W ≈ L + S with rank(L) ≤ r and S within a parameter budget.

Objective, from the Gram matrix G = XᵀX alone (the same relative ridge as ``whitened_svd``):

    f(L, S) = ‖X(W − L − S)‖²_F + μ‖W − L − S‖²_F,   μ = ridge · tr(G)/in,
            = scale · ‖Lᵀ(W − L − S)‖²_F,            Σ/scale = (G + μI)/scale = L Lᵀ.

Everything works in the whitened space: B = LᵀW, low rank Lw = Lᵀ·L_ (held as Uw Vw with Uw
orthonormal), sparse part Lᵀ·S. Two structures for S:

``"rows"`` (structured — the one that runs fast in onnxruntime)
    S is non-zero only on k whole input rows P: ``x[:, P] @ S_P`` in the graph (Gather → small
    MatMul → Add, or concatenated into the chain's second MatMul), k·out dense parameters.
    Fixed support, joint optimum (variable projection): with atoms A_P = Lᵀ[:, P] (A_PᵀA_P =
    Σ_PP) and Π the projector onto the complement of span(A_P),
        min_{S_P} ‖B − Lw − A_P S_P‖² = ‖Π(B − Lw)‖²
        ⇒  Lw = T_r(ΠB),  S_P = (A_PᵀA_P)⁻¹ A_Pᵀ(B − Lw).
    This "L-step" is never worse than whitened_svd(W − S) for the previous S and equals it at
    a fixed point, so the alternation runs over supports. "S-step": greedy forward selection
    on R = W − L (group OMP in the Σ metric): freeing row j after rows P lowers f by exactly
    ‖(ΣR′)_j‖² / (Σ_jj − Σ_jP Σ_PP⁻¹ Σ_Pj), R′ the least-squares residual on P, kept up to date
    by Schur-complement updates, O(in·out) per refresh (≤ 32 refreshes, blocks for large k).
    Alternation alone gets stuck when L spends a rank on an outlier row (its residual is then
    small), so each round also tries the selection weighted by the leave-one-out factor
    1/(1 − h_j)² (h_j: share of atom j inside col(Lw)), and, when neither helps,
    forward-backward swaps (add the best next row, drop the row whose removal costs least with
    L re-adapting: the smallest root of a secular equation, no SVD). A support is accepted only
    if its joint solve lowers f. Two starts, L first (P = ∅, GoDec's order) and S first (P
    greedy on W, the pruning choice); the better one continues with swaps. Finally the part of
    S_P lying in L's row space moves into L (same L + S, smallest S).
    With ``group`` g > 1, rows come in blocks of g consecutive rows (a k×k conv's input
    channel: its k² taps in the im2col matrix), so the graph keeps whole input channels. The
    selection is block greedy: freeing group c after P lowers f by tr(C′_cᵀ S_c⁻¹ C′_c),
    S_c = Σ_cc − Σ_cP Σ_PP⁻¹ Σ_Pc, refreshed in at most 8 blocks; the alternation with the
    joint solve is the same, accepted only when f falls (no swaps).

``"unstructured"`` (a file-size saving only: onnxruntime densifies sparse initializers)
    ``indices`` [nnz, 2] and ``values``; the budget counts nnz. GoDec-style alternation: L-step
    given S; S-step keeps the ``sparse_budget`` entries of R = W − L with the largest Σ_ii R_ij²
    (the exact gain of freeing one entry when Σ is diagonal) and refits the values in the Σ
    metric — the problem splits by column, S[s_j, j] = Σ_{s_j s_j}⁻¹(ΣR)[s_j, j], solved exactly
    (batched) unless conjugate gradients (``refit_steps``) are cheaper. The previous support,
    refitted, is always a candidate, so f never increases. Two starts: S = 0, and a support grown
    with the rank (⌈r/4⌉, ⌈r/2⌉, … ; AltProj-like: large directions before small ones).

L-step solvers (``l_step``):
    ``"exact"``  truncated SVD in the whitened space: the data-aware optimum.
    ``"brp"``    bilateral random projections (GoDec, Zhou & Tao 2011), SVD-free: Y1 = M Ω,
                 Y2 = MᵀY1, L = Y1 (Y2ᵀ…)⁻¹ Y2ᵀ with GoDec's A2 = Y1 is the projection
                 Y1 (Y1ᵀY1)⁻¹ Y1ᵀ M = Q Qᵀ M, done with QR and ``power_iter`` power iterations
                 (Y1 ← M MᵀY1, re-orthonormalised). Ω is seeded at first and then the previous
                 row space, so outer rounds continue a subspace iteration. A BRP result that
                 would raise f is refused, so f never increases.
    ``"auto"``   "exact" when min(in, out) ≤ AUTO_EXACT_MAX_DIM = 2048, else "brp". Measured
                 (one thread): an SVD of a 2048×1280 matrix costs ~4 s, a BRP pass of rank 236
                 ~0.5 s, and a rows fit needs ~10 exact solves but ~40 BRP passes, so BRP only
                 pays on the very wide layers (VGG's 25088×4096, 4096²).

``history``: f (unscaled, as above) after each round of the returned start (non-increasing).
A run stops when the relative decrease is below ``tol`` (below 1e-3 after a swap round) or no
better support exists; the best iterate is returned. Deterministic for a given ``seed``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

import numpy as np
import scipy.linalg

from .factors import LowRankFactors, as_matrix, as_square, check_rank
from .svd import _svd
from .whitened import Whitening, _balance, data_error, whitened_svd, whitening

__all__ = [
    "SparseResidual",
    "LowRankSparse",
    "SplitChoice",
    "lrsd_fit",
    "split_budget",
    "best_split",
    "AUTO_EXACT_MAX_DIM",
]

STRUCTURES = ("rows", "unstructured")
L_STEPS = ("auto", "exact", "brp")
AUTO_EXACT_MAX_DIM = 2048


# --------------------------------------------------------------------------- typed results
def _check_structure(structure: str) -> str:
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
    return structure


def _check_count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def _check_group(group, n_in: int, structure: str) -> int:
    """Rows come in blocks of ``group`` consecutive rows (1: single rows)."""
    g = _check_count(group, "group")
    if g < 1 or n_in % g or (g > 1 and structure != "rows"):
        raise ValueError(f"group must be >= 1, divide in={n_in} and only apply to 'rows', got {group!r}")
    return g


@dataclass(frozen=True, eq=False)
class SparseResidual:
    """The sparse part S [in, out] of W ≈ L + S.

    ``structure="rows"``: non-zero only on the input rows ``rows`` (sorted, unique, int64 [k]);
    ``values`` is [k, out]; ``indices`` is None. Costs k·out dense parameters in onnxruntime.
    ``structure="unstructured"``: ``indices`` [nnz, 2] of (row, col), sorted row-major and
    unique; ``values`` [nnz]; ``rows`` is None. Costs nnz (file size only).
    Use :meth:`from_rows`, :meth:`from_entries` or :meth:`empty` to build one.
    """

    structure: str
    values: np.ndarray
    rows: np.ndarray | None = None
    indices: np.ndarray | None = None

    def __post_init__(self) -> None:
        _check_structure(self.structure)
        values = np.asarray(self.values, dtype=np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError("values contain NaN or Inf")
        if self.structure == "rows":
            if self.rows is None or self.indices is not None:
                raise ValueError("a 'rows' residual needs rows (and no indices)")
            rows = np.asarray(self.rows)
            if rows.ndim != 1 or (rows.size and not np.issubdtype(rows.dtype, np.integer)):
                raise ValueError(f"rows must be a 1-D integer array, got {rows.dtype} {rows.shape}")
            rows = rows.astype(np.int64)
            if values.ndim != 2 or values.shape[0] != rows.size:
                raise ValueError(f"values must have shape ({rows.size}, out), got {values.shape}")
            if np.any(rows < 0):
                raise ValueError("rows must be >= 0")
            order = np.argsort(rows, kind="stable")
            rows, values = rows[order], values[order]
            if np.any(np.diff(rows) == 0):
                raise ValueError("rows must be unique")
            object.__setattr__(self, "rows", rows)
        else:
            if self.indices is None or self.rows is not None:
                raise ValueError("an 'unstructured' residual needs indices (and no rows)")
            idx = np.asarray(self.indices)
            if idx.size == 0:
                idx = idx.reshape(0, 2)
            if idx.ndim != 2 or idx.shape[1] != 2 or (
                idx.size and not np.issubdtype(idx.dtype, np.integer)
            ):
                raise ValueError(f"indices must be an integer array [nnz, 2], got {idx.shape}")
            idx = idx.astype(np.int64)
            if values.shape != (idx.shape[0],):
                raise ValueError(f"values must have shape ({idx.shape[0]},), got {values.shape}")
            if np.any(idx < 0):
                raise ValueError("indices must be >= 0")
            order = np.lexsort((idx[:, 1], idx[:, 0]))
            idx, values = idx[order], values[order]
            if idx.shape[0] > 1 and np.any(np.all(np.diff(idx, axis=0) == 0, axis=1)):
                raise ValueError("indices must be unique")
            object.__setattr__(self, "indices", idx)
        object.__setattr__(self, "values", values)

    @classmethod
    def from_rows(cls, rows: np.ndarray, values: np.ndarray) -> "SparseResidual":
        """Row-structured residual: S[rows] = values [k, out]."""
        return cls("rows", values, rows=rows)

    @classmethod
    def from_entries(cls, indices: np.ndarray, values: np.ndarray) -> "SparseResidual":
        """Unstructured residual: S[indices[:, 0], indices[:, 1]] = values."""
        return cls("unstructured", values, indices=indices)

    @classmethod
    def empty(cls, structure: str, out_dim: int) -> "SparseResidual":
        """S = 0 (rows residuals need ``out_dim`` for the [0, out] value block)."""
        _check_structure(structure)
        if structure == "rows":
            return cls.from_rows(np.zeros(0, np.int64), np.zeros((0, out_dim)))
        return cls.from_entries(np.zeros((0, 2), np.int64), np.zeros(0))

    @property
    def nnz(self) -> int:
        """Stored values: k·out for rows, nnz for unstructured."""
        return int(self.values.size)

    @property
    def n_params(self) -> int:
        """Budget cost: k·out for rows (dense parameters in onnxruntime), nnz for unstructured."""
        return int(self.values.size)

    def _check_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        if len(shape) != 2:
            raise ValueError(f"shape must be (in, out), got {shape}")
        n_in, n_out = int(shape[0]), int(shape[1])
        if self.structure == "rows":
            if self.values.shape[1] != n_out or (self.rows.size and self.rows[-1] >= n_in):
                top = self.rows[-1] if self.rows.size else None
                raise ValueError(f"rows residual {self.values.shape} (max row {top}) "
                                 f"does not fit {shape}")
        elif self.indices.size and (
            self.indices[:, 0].max() >= n_in or self.indices[:, 1].max() >= n_out
        ):
            raise ValueError(f"indices do not fit shape {shape}")
        return n_in, n_out

    def to_dense(self, shape: tuple[int, int]) -> np.ndarray:
        """S as a dense [in, out] array."""
        n_in, n_out = self._check_shape(shape)
        dense = np.zeros((n_in, n_out))
        if self.structure == "rows":
            dense[self.rows] = self.values
        else:
            dense[self.indices[:, 0], self.indices[:, 1]] = self.values
        return dense

    def apply(self, x: np.ndarray, out_dim: int | None = None) -> np.ndarray:
        """x @ S without densifying S (rows: x[:, rows] @ values), x [..., in]."""
        x = np.asarray(x, dtype=np.float64)
        if self.structure == "rows":
            return x[..., self.rows] @ self.values
        if out_dim is None:
            raise ValueError("out_dim is needed to apply an unstructured residual")
        y = np.zeros((*x.shape[:-1], out_dim))
        np.add.at(y.T, self.indices[:, 1], (x[..., self.indices[:, 0]] * self.values).T)
        return y


@dataclass(frozen=True, eq=False)
class LowRankSparse:
    """W ≈ L + S: ``low_rank`` U @ V (rank may be 0) plus ``sparse``.

    ``history``: the regularised objective ‖X(W − L − S)‖² + μ‖W − L − S‖² after each outer
    iteration of the returned fit (non-increasing); empty for hand-built instances.
    """

    low_rank: LowRankFactors
    sparse: SparseResidual
    history: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        self.sparse._check_shape(self.low_rank.shape)

    @property
    def shape(self) -> tuple[int, int]:
        """(in, out)."""
        return self.low_rank.shape

    @property
    def rank(self) -> int:
        """Rank of the low-rank part."""
        return self.low_rank.rank

    @property
    def structure(self) -> str:
        """The sparse part's structure."""
        return self.sparse.structure

    @property
    def n_params(self) -> int:
        """r·(in + out) + the sparse part's cost."""
        return self.low_rank.n_params + self.sparse.n_params

    def to_dense(self) -> np.ndarray:
        """U @ V + S, [in, out]."""
        return self.low_rank.to_dense() + self.sparse.to_dense(self.shape)


class SplitChoice(NamedTuple):
    """Result of :func:`best_split`: the chosen share, its fit and its data error."""

    share: float
    fit: LowRankSparse
    error: float
    plain: LowRankSparse | None = None
    """The share-0 fit (L only at the same budget), the alternative a caller may fall back to."""


# --------------------------------------------------------------------------- shared state
class _Problem:
    """Whitened quantities shared by all iterations."""

    def __init__(self, W: np.ndarray, gram: np.ndarray, ridge: float) -> None:
        self.W = W
        self.n_in, self.n_out = W.shape
        self.wh: Whitening = whitening(gram, ridge)
        mean_eig = np.trace(gram) / self.n_in
        self.scale = mean_eig if mean_eig > 0 else 1.0
        self.Lt = self.wh.Lt
        if self.wh.eigvals is None:  # Cholesky: Σ/scale exactly as whitening built it
            sigma = (gram + gram.T) / (2.0 * self.scale)
            sigma[np.diag_indices(self.n_in)] += ridge
        else:  # floored eigenvalues: use the metric actually in force
            sigma = self.Lt.T @ self.Lt
        self.sigma = sigma
        self.diag = np.diag(sigma).copy()
        self.is_diagonal = not np.any(sigma - np.diag(self.diag))
        self.B = self.Lt @ W
        # f below this is rounding noise: (1e-13 relative error)² of the zero approximation
        self.negligible = 1e-26 * self.objective(self.B)

    @cached_property
    def LtB(self) -> np.ndarray:
        """Lt.T @ B = (Σ/scale) W, [in, out]."""
        return self.Lt.T @ self.B

    def objective(self, resid_w: np.ndarray) -> float:
        """Unscaled f from a whitened residual Lᵀ(W − L − S)."""
        return self.scale * float(np.sum(resid_w * resid_w))


def _solve_psd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a⁻¹ b for symmetric PSD a (minimum-norm least squares if a is singular)."""
    try:
        return scipy.linalg.cho_solve(scipy.linalg.cho_factor(a), b)
    except np.linalg.LinAlgError:
        return scipy.linalg.lstsq(a, b)[0]


class _LowRankStep:
    """Rank-r approximation Uw @ Vw of a whitened matrix M, with Uw orthonormal [in, r].

    "exact": Uw = P_r, Vw = S_r Q_rᵀ from the SVD of M. "brp": bilateral random projection
    with power iterations, Uw = orth((M Mᵀ)^q M Ω), Vw = Uwᵀ M; Ω is ``warm``ᵀ (the previous
    Vw, so consecutive calls continue a subspace iteration) or seeded Gaussian.
    """

    def __init__(self, rank: int, method: str, power_iter: int, rng: np.random.Generator) -> None:
        self.rank, self.method, self.power_iter, self.rng = rank, method, power_iter, rng

    def __call__(self, M: np.ndarray, warm: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        r = self.rank
        if r == 0:
            return np.zeros((M.shape[0], 0)), np.zeros((0, M.shape[1]))
        if self.method == "exact":
            p, s, qt = _svd(M)
            return p[:, :r], s[:r, None] * qt[:r]
        if warm is not None and warm.shape == (r, M.shape[1]) and np.any(warm):
            omega = warm.T
        else:
            omega = self.rng.standard_normal((M.shape[1], r))
        q = np.linalg.qr(M @ omega)[0]
        for _ in range(self.power_iter):
            q = np.linalg.qr(M @ np.linalg.qr(M.T @ q)[0])[0]
        return q, q.T @ M


# --------------------------------------------------------------------------- rows
_GREEDY_ROUNDS = 32  # at most this many Schur-complement refreshes per selection
_SWAP_MIN_GAIN = 1e-3  # a swap round gaining less (relative) ends the local search
_N_SWAP = 2  # addition candidates tried per swap round


def _greedy_rows(prob: _Problem, C: np.ndarray, total: float, k: int,
                 weight: np.ndarray | None = None) -> np.ndarray:
    """Greedy forward selection of k rows (group OMP in the Σ metric), sorted.

    ``C`` = Lt.T @ E = (Σ/scale)·R for the whitened residual E = Lt @ R, ``total`` = ‖E‖². Score of
    row j given the chosen set P: ‖C′_j‖² / schur_j with C′ for the least-squares residual on P
    and schur_j = Σ_jj − Σ_jP Σ_PP⁻¹ Σ_Pj: the exact decrease of the objective when j is freed
    (times ``weight``_j if given). Blocks of ⌈k/32⌉ rows are picked per refresh.
    """
    n_in = prob.n_in
    C = C.copy()
    schur = prob.diag.copy()
    floor = 1e-12 * np.maximum(prob.diag, np.finfo(float).tiny)
    Z = np.zeros((n_in, min(k, n_in)))
    avail = np.ones(n_in, dtype=bool)
    chosen: list[int] = []
    block = max(1, math.ceil(k / _GREEDY_ROUNDS))
    while len(chosen) < k:
        ok = avail & (schur > floor)
        score = np.where(ok, np.sum(C * C, axis=1) / np.where(ok, schur, 1.0), -1.0)
        if weight is not None:
            score = np.where(ok, score * weight, -1.0)
        order = np.argsort(-score, kind="stable")[: min(block, k - len(chosen))]
        order = order[score[order] > 1e-16 * total]
        if order.size == 0:
            break
        t = len(chosen)
        while True:
            Gb = prob.sigma[:, order] - Z[:, :t] @ Z[order, :t].T
            try:
                Lb = np.linalg.cholesky(Gb[order])
                break
            except np.linalg.LinAlgError:
                if order.size == 1:  # numerically dependent: retire the row
                    Lb = None
                    break
                order = order[:1]
        avail[order] = False
        if Lb is None:
            continue
        Znew = scipy.linalg.solve_triangular(Lb, Gb.T, lower=True).T
        C -= Znew @ scipy.linalg.solve_triangular(Lb, C[order], lower=True)
        schur -= np.sum(Znew * Znew, axis=1)
        Z[:, t : t + order.size] = Znew
        chosen.extend(int(i) for i in order)
    return np.array(sorted(chosen), dtype=np.int64)


def _rows_values(prob: _Problem, rows: np.ndarray, E: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares S_P for whitened residual E: (values [k, out], new whitened residual)."""
    if rows.size == 0:
        return np.zeros((0, prob.n_out)), E
    A = prob.Lt[:, rows]
    values = _solve_psd(A.T @ A, A.T @ E)
    return values, E - A @ values


class _RowsState(NamedTuple):
    f: float
    rows: np.ndarray
    values: np.ndarray
    Uw: np.ndarray  # orthonormal [in, r]
    Vw: np.ndarray


def _rows_joint(prob: _Problem, lstep: _LowRankStep, rows: np.ndarray,
                warm: np.ndarray | None) -> _RowsState:
    """Joint optimum (or its BRP approximation) of (L, S_P) for a fixed support P."""
    _, proj = _rows_values(prob, rows, prob.B)  # ΠB
    Uw, Vw = lstep(proj, warm)
    values, resid = _rows_values(prob, rows, prob.B - Uw @ Vw)
    return _RowsState(prob.objective(resid), rows, values, Uw, Vw)


def _leverage_weight(prob: _Problem, Uw: np.ndarray) -> np.ndarray:
    """1/(1 − h_j)², h_j = ‖Uwᵀa_j‖²/‖a_j‖²: how much of atom j (column j of Lᵀ) L spans.

    Leave-one-out correction: a row that L reproduces with a whole direction of its own has a
    small residual but h_j ≈ 1; freeing it returns that rank to the other rows.
    """
    if Uw.shape[1] == 0:
        return np.ones(prob.n_in)
    h = np.sum((Uw.T @ prob.Lt) ** 2, axis=0) / np.maximum(prob.diag, np.finfo(float).tiny)
    return 1.0 / np.maximum(1.0 - np.clip(h, 0.0, 1.0), 1e-3) ** 2


def _drop_costs(prob: _Problem, state: _RowsState) -> np.ndarray:
    """Rise of f when row i leaves the support Q and L may re-adapt (an upper bound).

    With u_i the unit part of atom a_i orthogonal to the other atoms of Q, Π_{Q∖i}B =
    Π_Q B + u_i b_i with b_i = u_iᵀB = s_i / √(Σ_QQ⁻¹)_ii (s = the LS values of B on Q, which
    are ``values`` since L ⟂ A_Q). Keeping L inside span(Uw, u_i), the best rank-r fit loses
    the smallest eigenvalue of K = [[HHᵀ, Hb_iᵀ], [b_iHᵀ, ‖b_i‖²]], H = Vw: exact for the
    exact L-step up to interactions with the discarded spectrum. In the eigenbasis of HHᵀ, K
    is an arrowhead matrix; its smallest eigenvalue solves the secular equation
    c − μ − Σ_m z_m² / (λ_m − μ) = 0 on [0, min(λ_1, c)], found by bisection for all rows.
    """
    Q = state.rows
    AQ = prob.Lt[:, Q]
    inv_diag = np.diag(scipy.linalg.pinvh(AQ.T @ AQ))
    b = state.values / np.sqrt(np.maximum(inv_diag, np.finfo(float).tiny))[:, None]
    c = np.sum(b * b, axis=1)
    if state.Uw.shape[1] == 0:
        return c
    lam, vecs = scipy.linalg.eigh(state.Vw @ state.Vw.T)
    lam = np.maximum(lam, 0.0)
    z2 = (vecs.T @ (state.Vw @ b.T)) ** 2  # [r, k]
    lo, hi = np.zeros(Q.size), np.minimum(lam[0], c)
    if lam[0] <= 0.0:
        return lo  # L has a spare direction: any single row is absorbed for free
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        with np.errstate(divide="ignore", invalid="ignore"):  # mid may round up to λ_1
            f = c - mid - np.sum(z2 / (lam[:, None] - mid), axis=0)
        up = np.isfinite(f) & (f > 0)
        lo, hi = np.where(up, mid, lo), np.where(up, hi, mid)
    return lo


def _swap_candidates(prob: _Problem, lstep: _LowRankStep, state: _RowsState,
                     n_try: int) -> list[np.ndarray]:
    """Forward-backward swaps: add one of the ``n_try`` best rows, refit, drop the cheapest.

    Addition score given P: ‖(Σ R′)_j‖² / schur_j on the full residual R′ = W − L − S (the
    continued greedy step). After the joint refit on P ∪ {j}, the row whose removal raises f
    least (:func:`_drop_costs`) leaves. Catches a row that L absorbed instead of S, which a
    fresh selection on W − L cannot see.
    """
    P = state.rows
    if P.size == 0 or P.size >= prob.n_in:
        return []
    A = prob.Lt[:, P]
    resid = prob.B - state.Uw @ state.Vw - A @ state.values
    C = prob.Lt.T @ resid
    try:
        chol = np.linalg.cholesky(A.T @ A)
        Z = scipy.linalg.solve_triangular(chol, prob.sigma[P], lower=True)  # [k, in]
        schur = prob.diag - np.sum(Z * Z, axis=0)
    except np.linalg.LinAlgError:
        schur = prob.diag.copy()
    ok = schur > 1e-12 * np.maximum(prob.diag, np.finfo(float).tiny)
    ok[P] = False
    score = np.where(ok, np.sum(C * C, axis=1) / np.where(ok, schur, 1.0), -1.0)
    out = []
    for j in np.argsort(-score, kind="stable")[:n_try]:
        if score[j] <= 0:
            break
        Q = np.sort(np.append(P, j))
        ext = _rows_joint(prob, lstep, Q, state.Vw)
        drop = Q[int(np.argmin(_drop_costs(prob, ext)))]
        if drop != j:
            out.append(Q[Q != drop])
    return out


def _fit_rows(prob: _Problem, lstep: _LowRankStep, k: int, state: _RowsState,
              n_iter: int, tol: float, swaps: bool, fresh_first: bool = True
              ) -> tuple[_RowsState, list[float]]:
    """Alternate support selection and the joint (L, S_P) solve, from ``state``.

    Each round tries fresh greedy supports for W − L (plain and leverage-weighted); if neither
    lowers f and ``swaps``, forward-backward swaps. A support is accepted only if its joint
    solve lowers f, so f never increases. ``history`` excludes the starting state.
    ``fresh_first=False`` skips the fresh supports in the first round (already refused).
    With BRP, once no better support is found, the remaining rounds only refine L.
    """
    history: list[float] = []
    search_fresh, search_swaps = fresh_first, swaps
    for _ in range(n_iter):
        if state.f <= prob.negligible:
            break
        tried = [state.rows]
        new, swapped = None, False

        def consider(rows: np.ndarray) -> None:
            nonlocal new
            if any(np.array_equal(rows, t) for t in tried):
                return
            tried.append(rows)
            joint = _rows_joint(prob, lstep, rows, state.Vw)
            if joint.f < state.f and (new is None or joint.f < new.f):
                new = joint

        if search_fresh:
            C = prob.LtB - (prob.Lt.T @ state.Uw) @ state.Vw  # (Σ/scale)(W − L)
            total = float(np.sum((prob.B - state.Uw @ state.Vw) ** 2))
            consider(_greedy_rows(prob, C, total, k))
            consider(_greedy_rows(prob, C, total, k, _leverage_weight(prob, state.Uw)))
        if new is None and search_swaps:
            swapped = True
            for rows in _swap_candidates(prob, lstep, state, _N_SWAP):
                consider(rows)
        if new is None:
            if lstep.method == "exact":
                break  # no better support: the joint solve is already optimal
            search_fresh = search_swaps = False
            new = _rows_joint(prob, lstep, state.rows, state.Vw)  # BRP: refine L
            if new.f > state.f:
                break
        else:
            search_fresh = True
        history.append(new.f)
        gain = state.f - new.f
        state = new
        if gain <= (max(tol, _SWAP_MIN_GAIN) if swapped else tol) * (state.f + gain):
            break
    return state, history


def _fit_rows_multistart(prob: _Problem, lstep: _LowRankStep, k: int, n_iter: int,
                         tol: float) -> tuple[_RowsState, list[float]]:
    """Starts L first (P = ∅, GoDec's order) and S first (P greedy on W, the pruning choice),
    alternated without swaps; the better one continues with swaps. Returns state, history."""
    starts = []
    if lstep.rank > 0 or k == 0:
        starts.append(np.zeros(0, np.int64))
    if k > 0:
        starts.append(_greedy_rows(prob, prob.LtB, float(np.sum(prob.B**2)), k))
    best = None
    for rows in starts:
        first = _rows_joint(prob, lstep, rows, None)
        state, hist = _fit_rows(prob, lstep, k, first, n_iter - 1, tol, swaps=False)
        if best is None or state.f < best[0].f:
            best = (state, [first.f, *hist])
    state, history = best
    if k > 0 and len(history) < n_iter:
        state, more = _fit_rows(prob, lstep, k, state, n_iter - len(history), tol, swaps=True,
                                fresh_first=False)
        history += more
    return state, history


def _group_rows(groups, g: int) -> np.ndarray:
    """The rows of whole groups of g consecutive rows, sorted."""
    groups = np.sort(np.asarray(groups, dtype=np.int64))
    return (groups[:, None] * g + np.arange(g)).ravel()


_GROUP_ROUNDS = 8  # block refreshes per grouped selection


def _greedy_groups(prob: _Problem, E: np.ndarray, k: int, g: int) -> np.ndarray:
    """Block greedy selection of k groups of g rows for the whitened residual E = Lᵀ R
    (sorted rows). Score of group c given the chosen rows P: tr(C′_cᵀ S_c⁻¹ C′_c), the exact
    decrease of f when c is freed, with C′ = (Σ/scale)·R′ on the least-squares residual on P
    and S_c the Schur complement of Σ_PP in Σ restricted to c."""
    n_groups = prob.n_in // g
    diag_blocks = prob.sigma.reshape(n_groups, g, n_groups, g)[np.arange(n_groups), :, np.arange(n_groups), :]
    total = float(np.sum(E * E))
    chosen: list[int] = []
    block = max(1, math.ceil(k / _GROUP_ROUNDS))
    while len(chosen) < k:
        rows = _group_rows(chosen, g)
        _, resid = _rows_values(prob, rows, E)
        C = (prob.Lt.T @ resid).reshape(n_groups, g, -1)
        schur = diag_blocks.copy()
        if rows.size:
            A = prob.Lt[:, rows]
            Z = _solve_psd(A.T @ A, prob.sigma[rows])  # Σ_PP⁻¹ Σ_P,  [|P|, in]
            left = prob.sigma[:, rows].reshape(n_groups, g, rows.size)
            schur -= np.einsum("cip,cjp->cij", left, Z.T.reshape(n_groups, g, rows.size))
        floor = 1e-12 * np.maximum(np.trace(diag_blocks, axis1=1, axis2=2), np.finfo(float).tiny)
        schur += (floor / g)[:, None, None] * np.eye(g)
        score = np.einsum("cio,cio->c", C, np.linalg.solve(schur, C))
        score[chosen] = -1.0
        order = np.argsort(-score, kind="stable")[: min(block, k - len(chosen))]
        order = order[score[order] > 1e-16 * total]
        if order.size == 0:
            break
        chosen.extend(int(c) for c in order)
    return _group_rows(chosen, g)


def _fit_groups(prob: _Problem, lstep: _LowRankStep, k: int, g: int, n_iter: int,
                tol: float) -> tuple[_RowsState, list[float]]:
    """Grouped rows: starts L first and S first, each alternating block-greedy supports on
    W − L and the joint solve while f falls; the better start. Returns state, history."""
    starts = []
    if lstep.rank > 0:
        starts.append(np.zeros(0, np.int64))
    starts.append(_greedy_groups(prob, prob.B, k, g))
    best = None
    for rows in starts:
        state = _rows_joint(prob, lstep, rows, None)
        history = [state.f]
        for _ in range(n_iter - 1):
            if state.f <= prob.negligible:
                break
            new = _rows_joint(prob, lstep, _greedy_groups(prob, prob.B - state.Uw @ state.Vw, k, g), state.Vw)
            if new.f >= state.f:
                break
            gain, state = state.f - new.f, new
            history.append(state.f)
            if gain <= tol * (state.f + gain):
                break
        if best is None or state.f < best[0].f:
            best = (state, history)
    return best


# --------------------------------------------------------------------------- unstructured
def _refit_entries(prob: _Problem, mask: np.ndarray, C: np.ndarray, S0: np.ndarray,
                   steps: int) -> np.ndarray:
    """Minimise ½⟨S, ΣS⟩ − ⟨S, C⟩ over S supported on ``mask`` (Σ scaled), C = ΣR.

    The problem splits by column: S[s_j, j] = Σ_{s_j s_j}⁻¹ C[s_j, j]. Solved exactly per
    column (at once if Σ is diagonal) when Σ_j |s_j|³/3 ≤ steps·in²·out, the price of
    ``steps`` conjugate-gradient steps on the whole matrix; otherwise ``steps`` CG steps from
    S0. ``steps`` = 0 keeps S0 on the mask.
    """
    S = np.where(mask, S0, 0.0)
    if steps == 0 or not mask.any():
        return S
    if prob.is_diagonal:
        return np.where(mask, C / prob.diag[:, None], 0.0)
    per_col = np.count_nonzero(mask, axis=0)
    if float(np.sum(per_col.astype(float) ** 3)) / 3 <= steps * prob.n_in**2 * prob.n_out:
        return _solve_columns(prob.sigma, mask, C, per_col)
    return _masked_cg(prob, mask, C, S, steps)


def _solve_columns(sigma: np.ndarray, mask: np.ndarray, C: np.ndarray,
                   per_col: np.ndarray) -> np.ndarray:
    """S[s_j, j] = Σ_{s_j s_j}⁻¹ C[s_j, j] for every column, batched by support size."""
    S = np.zeros(mask.shape)
    row_idx = np.nonzero(mask.T)[1]  # supports listed column by column
    starts = np.concatenate([[0], np.cumsum(per_col)])
    for n in np.unique(per_col[per_col > 0]):
        cols = np.flatnonzero(per_col == n)
        chunk = max(1, int(2e7 // (n * n)))
        for lo in range(0, cols.size, chunk):
            cs = cols[lo : lo + chunk]
            idx = row_idx[starts[cs][:, None] + np.arange(n)]  # [g, n] row indices
            a = sigma[idx[:, :, None], idx[:, None, :]]
            b = C[idx, cs[:, None]]
            try:
                x = np.linalg.solve(a, b[..., None])[..., 0]
            except np.linalg.LinAlgError:  # a singular block (no ridge): one by one
                x = np.stack([_solve_psd(ai, bi) for ai, bi in zip(a, b)])
            S[idx, cs[:, None]] = x
    return S


def _masked_cg(prob: _Problem, mask: np.ndarray, C: np.ndarray, S: np.ndarray,
               steps: int) -> np.ndarray:
    """``steps`` CG steps on M ⊙ (ΣS) = M ⊙ C from S (supported on the mask); monotone."""
    S = S.copy()
    res = np.where(mask, C - prob.sigma @ S, 0.0)
    rr = float(np.sum(res * res))
    stop = 1e-30 * max(float(np.sum(C * C)), np.finfo(float).tiny)
    p = res.copy()
    for _ in range(steps):
        if rr <= stop:
            break
        Ap = np.where(mask, prob.sigma @ p, 0.0)
        pAp = float(np.sum(p * Ap))
        if not pAp > 0.0:
            break
        alpha = rr / pAp
        S += alpha * p
        res -= alpha * Ap
        rr_new = float(np.sum(res * res))
        p = res + (rr_new / rr) * p
        rr = rr_new
    return S


def _top_mask(score: np.ndarray, nnz: int) -> np.ndarray:
    mask = np.zeros(score.shape, dtype=bool)
    if nnz > 0:
        flat = score.ravel()
        top = np.argpartition(-flat, nnz - 1)[:nnz] if nnz < flat.size else np.arange(flat.size)
        mask.ravel()[top] = True
    return mask


class _EntriesState(NamedTuple):
    f: float
    mask: np.ndarray
    S: np.ndarray
    Uw: np.ndarray
    Vw: np.ndarray


def _entries_step(prob: _Problem, Uw: np.ndarray, Vw: np.ndarray, nnz: int,
                  refit_steps: int, prev: tuple[np.ndarray, np.ndarray] | None
                  ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """S-step for fixed L: best of the fresh threshold of W − L and the previous support.

    Returns (f, mask, S, LᵀS). The previous support is refitted from its previous values, so
    with ``prev`` given the result is never worse than keeping S.
    """
    Ew = prob.B - Uw @ Vw  # Lᵀ(W − L)
    R = prob.W - prob.wh.unwhiten(Uw) @ Vw  # W − L
    C = prob.Lt.T @ Ew  # Σ R  (scaled)
    fresh = _top_mask(prob.diag[:, None] * R * R, nnz)
    candidates = [] if prev is None else [prev]
    if prev is None or not np.array_equal(fresh, prev[0]):
        candidates.append((fresh, R))
    outcome = None
    for cand_mask, start in candidates:
        cand_S = _refit_entries(prob, cand_mask, C, start, refit_steps)
        cand_Sw = prob.Lt @ cand_S
        f_c = prob.objective(Ew - cand_Sw)
        if outcome is None or f_c < outcome[0]:
            outcome = (f_c, cand_mask, cand_S, cand_Sw)
    return outcome


def _continuation_start(prob: _Problem, lstep: _LowRankStep, nnz: int, refit_steps: int,
                        stages: int = 4, iters: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Support grown with the rank (AltProj-like): ranks ⌈r·i/stages⌉, a few rounds each.

    Large singular directions are fitted before small ones, so S is not bent early by the tail
    of L. Only a starting point: the main alternation then runs at full rank.
    """
    Sw = np.zeros((prob.n_in, prob.n_out))
    prev = None
    for rank in sorted({math.ceil(lstep.rank * i / stages) for i in range(1, stages + 1)}):
        step = _LowRankStep(rank, lstep.method, lstep.power_iter, lstep.rng)
        Vw = None
        for _ in range(iters):
            Uw, Vw = step(prob.B - Sw, Vw)
            _, mask, S, Sw = _entries_step(prob, Uw, Vw, nnz, refit_steps, None)
            prev = (mask, S)
    return prev


def _fit_unstructured(prob: _Problem, lstep: _LowRankStep, nnz: int, n_iter: int, tol: float,
                      refit_steps: int, start: tuple[np.ndarray, np.ndarray] | None = None
                      ) -> tuple[_EntriesState, list[float]]:
    """GoDec-style alternation from S = 0 or from ``start`` = (mask, S)."""
    n_in, n_out = prob.n_in, prob.n_out
    if start is None:
        mask, S = np.zeros((n_in, n_out), dtype=bool), np.zeros((n_in, n_out))
    else:
        mask, S = start
    Sw = prob.Lt @ S  # Lᵀ S
    Uw, Vw = np.zeros((n_in, 0)), np.zeros((0, n_out))
    f_prev = prob.objective(prob.B - Sw)
    best = _EntriesState(f_prev, mask, S, Uw, Vw)
    history: list[float] = []
    for _ in range(n_iter):
        # L-step given S (BRP rejected if it would raise f)
        M = prob.B - Sw
        Uw_new, Vw_new = lstep(M, Vw if Vw.shape[0] else None)
        E = M - Uw_new @ Vw_new
        f_l = prob.objective(E)
        if f_l > f_prev:  # only BRP can get here: keep the previous L
            Uw_new, Vw_new = Uw, Vw
        Uw, Vw = Uw_new, Vw_new
        f_new, mask, S, Sw = _entries_step(prob, Uw, Vw, nnz, refit_steps, (mask, S))
        history.append(f_new)
        best = _EntriesState(f_new, mask, S, Uw, Vw)
        converged = f_new <= prob.negligible or f_prev - f_new <= tol * f_prev
        f_prev = f_new
        if converged:
            break
    return best, history


# --------------------------------------------------------------------------- public API
def _resolve_l_step(l_step: str, shape: tuple[int, int]) -> str:
    if l_step not in L_STEPS:
        raise ValueError(f"l_step must be one of {L_STEPS}, got {l_step!r}")
    if l_step == "auto":
        return "exact" if min(shape) <= AUTO_EXACT_MAX_DIM else "brp"
    return l_step


def _factors(prob: _Problem, Uw: np.ndarray, Vw: np.ndarray) -> LowRankFactors:
    if Uw.shape[1] == 0:
        return LowRankFactors(np.zeros((prob.n_in, 0)), np.zeros((0, prob.n_out)))
    return _balance(prob.wh.unwhiten(Uw), Vw)


def _move_into_low_rank(f: LowRankFactors, rows: np.ndarray, values: np.ndarray
                        ) -> tuple[LowRankFactors, np.ndarray]:
    """Shift the part of S_P lying in L's row space into L; L + S (hence f) is unchanged.

    On rows P, any U_P is matched by S_P, so the split is not unique. Take U_P += S_P V⁺:
    the rank stays r and S_P becomes S_P (I − V⁺V), its smallest-norm representative.
    """
    if rows.size == 0 or f.rank == 0:
        return f, values
    D = scipy.linalg.lstsq(f.V.T, values.T)[0].T  # S_P V⁺  [k, r]
    U = f.U.copy()
    U[rows] += D
    return _balance(U, f.V), values - D @ f.V


def lrsd_fit(
    W: np.ndarray,
    gram: np.ndarray | None,
    rank: int,
    sparse_budget: int,
    structure: str = "rows",
    ridge: float = 1e-3,
    n_iter: int = 20,
    tol: float = 1e-6,
    seed: int = 0,
    l_step: str = "auto",
    power_iter: int = 2,
    refit_steps: int = 10,
    group: int = 1,
) -> LowRankSparse:
    """argmin ‖X(W − L − S)‖²_F + μ‖W − L − S‖²_F s.t. rank L ≤ r, S within ``sparse_budget``.

    W [in, out]; ``gram`` G = XᵀX [in, in] (None: G = I, the data-free fit); μ = ridge·tr G/in.
    ``sparse_budget`` counts parameters: k = sparse_budget // out whole rows for ``"rows"``,
    that many entries for ``"unstructured"`` (capped at the matrix), so the result has
    n_params ≤ rank·(in + out) + sparse_budget. rank 0 is pure pruning (rows: the k input rows
    kept, with their least-squares values); sparse_budget 0 (or < out for rows) returns exactly
    ``whitened_svd(W, gram, rank, ridge)`` unless the L-step is BRP. ``l_step`` ("auto",
    "exact", "brp"), ``power_iter`` (BRP power iterations), ``refit_steps`` (unstructured
    value refit: exact per column when no dearer than that many CG steps; 0 = no refit),
    ``group`` (rows: whole blocks of that many consecutive rows, k = sparse_budget // (out·group)
    blocks; in must be a multiple), ``n_iter`` rounds per start, ``tol`` and the algorithm: see the module docstring. The
    result's ``history`` holds the objective per round (non-increasing).
    """
    m = as_matrix(W)
    n_in, n_out = m.shape
    g = np.eye(n_in) if gram is None else as_square(gram, n_in, "gram")
    rank = check_rank(rank, min(m.shape))
    budget = _check_count(sparse_budget, "sparse_budget")
    _check_structure(structure)
    if not (isinstance(ridge, (int, float, np.floating, np.integer)) and np.isfinite(ridge)
            and ridge >= 0):
        raise ValueError(f"ridge must be finite and >= 0, got {ridge!r}")
    if _check_count(n_iter, "n_iter") < 1:
        raise ValueError(f"n_iter must be >= 1, got {n_iter}")
    if not (np.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be finite and >= 0, got {tol!r}")
    _check_count(power_iter, "power_iter")
    _check_count(refit_steps, "refit_steps")
    method = _resolve_l_step(l_step, m.shape)
    grp = _check_group(group, n_in, structure)

    count = min(budget // (n_out * grp), n_in // grp) if structure == "rows" else min(budget, n_in * n_out)
    if count == 0 and method == "exact":
        f = whitened_svd(m, g, rank, ridge)
        d = m - f.to_dense()
        shift = ridge * (np.trace(g) / n_in if np.trace(g) > 0 else 1.0)
        hist = (float(np.sum(d * (g @ d)) + shift * np.sum(d * d)),)
        return LowRankSparse(f, SparseResidual.empty(structure, n_out), hist)

    prob = _Problem(m, g, float(ridge))
    lstep = _LowRankStep(rank, method, power_iter, np.random.default_rng(seed))
    if structure == "rows":
        if grp > 1:
            best, history = _fit_groups(prob, lstep, count, grp, n_iter, tol)
        else:
            best, history = _fit_rows_multistart(prob, lstep, count, n_iter, tol)
        low_rank, values = _move_into_low_rank(_factors(prob, best.Uw, best.Vw), best.rows,
                                               best.values)
        return LowRankSparse(low_rank, SparseResidual.from_rows(best.rows, values),
                             tuple(history))
    starts = [None]
    if rank >= 2 and count > 0:
        starts.append(_continuation_start(prob, lstep, count, refit_steps))
    best, history = None, None
    for start in starts:
        state, hist = _fit_unstructured(prob, lstep, count, n_iter, tol, refit_steps, start)
        if best is None or state.f < best.f:
            best, history = state, hist
    sparse = SparseResidual.from_entries(np.argwhere(best.mask), best.S[best.mask])
    return LowRankSparse(_factors(prob, best.Uw, best.Vw), sparse, tuple(history))


def split_budget(
    in_dim: int, out_dim: int, budget_params: int, sparse_share: float, structure: str = "rows",
    group: int = 1,
) -> tuple[int, int]:
    """CMD's sparse coefficient: (rank, sparse_budget) for a layer [in_dim, out_dim].

    ``sparse_share`` of the budget goes to S — rows: k = ⌊share·budget / (out·group)⌋ whole
    blocks of ``group`` rows, so sparse_budget = k·group·out; unstructured: sparse_budget = ⌊share·budget⌋ entries — and the rest
    to L: rank = ⌊(1 − share)·budget / (in + out)⌋. Both are capped at the matrix (rank ≤
    min(in, out), k ≤ in, nnz ≤ in·out); rank·(in+out) + sparse_budget ≤ budget always.
    """
    n_in = _check_count(in_dim, "in_dim")
    n_out = _check_count(out_dim, "out_dim")
    if n_in < 1 or n_out < 1:
        raise ValueError(f"in_dim and out_dim must be >= 1, got {in_dim}, {out_dim}")
    budget = _check_count(budget_params, "budget_params")
    if isinstance(sparse_share, bool) or not (
        isinstance(sparse_share, (int, float, np.floating, np.integer))
        and 0.0 <= sparse_share <= 1.0
    ):
        raise ValueError(f"sparse_share must be in [0, 1], got {sparse_share!r}")
    _check_structure(structure)
    grp = _check_group(group, n_in, structure)
    share = float(sparse_share)
    s_part = share * budget * (1 + 1e-12)  # guard 0.1·30 = 2.9999…
    rank = min(int(math.floor((budget - min(s_part, budget)) * (1 + 1e-12) / (n_in + n_out))),
               min(n_in, n_out))
    if structure == "rows":
        unit, cap = n_out * grp, n_in // grp
    else:
        unit, cap = 1, n_in * n_out
    count = min(int(math.floor(s_part / unit)), cap)
    count = max(0, min(count, (budget - rank * (n_in + n_out)) // unit))
    return rank, count * unit


def best_split(
    W: np.ndarray,
    gram: np.ndarray | None,
    budget_params: int,
    shares: tuple[float, ...] = (0.0, 0.1, 0.2, 0.35, 0.5),
    structure: str = "rows",
    ridge: float = 1e-3,
    eval_gram: np.ndarray | None = None,
    min_gain: float = 0.0,
    group: int = 1,
    **fit_kwargs,
) -> SplitChoice:
    """CMD's automatic mode: fit every share and keep the lowest data error.

    The error is ``data_error(W, fit.to_dense(), eval_gram)`` (``eval_gram`` defaults to
    ``gram``; pass a held-out Gram to choose on other data). Share 0 (L only) is always tried,
    added if missing, so the result is never worse than L-only at the same budget on that Gram.
    A share > 0 is taken only if its error is below (1 − ``min_gain``) × the error of share 0:
    a residual must earn its place by a real held-out improvement, not a rounding one. Ties go
    to the smaller share (a plain chain is the cheapest graph). Shares giving the same
    (rank, sparse_budget) are fitted once. ``group``: rows residuals in blocks of that many
    rows (:func:`lrsd_fit`); other ``fit_kwargs`` go to :func:`lrsd_fit`.
    """
    if not (isinstance(min_gain, (int, float)) and 0.0 <= min_gain < 1.0):
        raise ValueError(f"min_gain must be in [0, 1), got {min_gain!r}")
    m = as_matrix(W)
    g = np.eye(m.shape[0]) if gram is None else as_square(gram, m.shape[0], "gram")
    eg = g if eval_gram is None else as_square(eval_gram, m.shape[0], "eval_gram")
    cands = sorted({0.0, *(float(s) for s in shares)})
    fits: dict[tuple[int, int], tuple[LowRankSparse, float]] = {}
    choice: SplitChoice | None = None
    for share in cands:
        key = split_budget(m.shape[0], m.shape[1], budget_params, share, structure, group)
        if key not in fits:
            fit = lrsd_fit(m, g, key[0], key[1], structure=structure, ridge=ridge, group=group, **fit_kwargs)
            fits[key] = (fit, data_error(m, fit.to_dense(), eg))
        fit, err = fits[key]
        if choice is None:
            plain = SplitChoice(share, fit, err)
            choice = plain
        elif err < choice.error and err < (1.0 - min_gain) * plain.error:
            choice = SplitChoice(share, fit, err)
    return choice._replace(plain=plain.fit)
