"""Conv weights [Cout, Cin, *k] as matrices, and factors written back as chains of convs.

- channel:  W ≈ conv k×k Cin→r, then 1×1 r→Cout       (factor ``conv_to_matrix(W)``)
- spatial:  W ≈ conv kh×1 Cin→r, then 1×kw r→Cout      (factor ``spatial_matrix(W)``, 2-D)
- Tucker-2: W ≈ 1×1 Cin→r_in, k×k r_in→r_out, 1×1 r_out→Cout
The first conv of a chain takes the original strides/pads/dilations (spatial: their
vertical part, the second conv the horizontal part); the others are unit, unpadded.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg

from .factors import LowRankFactors, Tucker2Factors, as_square, check_rank
from .whitened import whitening

__all__ = [
    "conv_to_matrix",
    "matrix_to_conv",
    "channel_factors_to_convs",
    "spatial_matrix",
    "spatial_matrix_to_conv",
    "spatial_factors_to_convs",
    "tucker2",
    "tucker2_whitened",
    "tucker2_to_convs",
]


def _conv_weight(W: np.ndarray) -> np.ndarray:
    """``W`` as a finite float64 [Cout, Cin, *k] array with 1 or more kernel dims."""
    w = np.asarray(W, dtype=np.float64)
    if w.ndim < 3:
        raise ValueError(f"conv weight must be [Cout, Cin, *k], got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("conv weight contains NaN or Inf")
    return w


def _pointwise(m: np.ndarray, n_spatial: int) -> np.ndarray:
    """A [Cout, Cin] matrix as a 1×…×1 conv weight [Cout, Cin, 1, …]."""
    return m.reshape(*m.shape, *([1] * n_spatial))


def conv_to_matrix(W: np.ndarray) -> np.ndarray:
    """[Cout, Cin, *k] → [Cin·prod(k), Cout]; row index = (c, kernel position) in C order."""
    w = _conv_weight(W)
    return w.reshape(w.shape[0], -1).T


def matrix_to_conv(M: np.ndarray, Cin: int, kernel_shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of ``conv_to_matrix``: [Cin·prod(k), Cout] → [Cout, Cin, *k]."""
    m = np.asarray(M)
    rows = Cin * int(np.prod(kernel_shape))
    if m.ndim != 2 or m.shape[0] != rows:
        raise ValueError(f"M must be [Cin·prod(k)={rows}, Cout], got shape {m.shape}")
    return m.T.reshape(m.shape[1], Cin, *kernel_shape)


def channel_factors_to_convs(
    f: LowRankFactors, Cin: int, kernel_shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Factors of ``conv_to_matrix(W)`` → (W1 [r, Cin, *k], W2 [Cout, r, 1, …])."""
    w1 = matrix_to_conv(f.U, Cin, kernel_shape)
    return w1, _pointwise(f.V.T, len(kernel_shape))


def spatial_matrix(W: np.ndarray) -> np.ndarray:
    """[Cout, Cin, kh, kw] → M [Cin·kh, Cout·kw], M[(c,i), (o,j)] = W[o,c,i,j]."""
    w = _conv_weight(W)
    if w.ndim != 4:
        raise ValueError(f"spatial decomposition needs a 2-D conv weight, got shape {w.shape}")
    cout, cin, kh, kw = w.shape
    return w.transpose(1, 2, 0, 3).reshape(cin * kh, cout * kw)


def spatial_matrix_to_conv(M: np.ndarray, Cout: int, Cin: int, kh: int, kw: int) -> np.ndarray:
    """Inverse of ``spatial_matrix``: [Cin·kh, Cout·kw] → [Cout, Cin, kh, kw]."""
    m = np.asarray(M)
    if m.shape != (Cin * kh, Cout * kw):
        raise ValueError(f"M must have shape ({Cin * kh}, {Cout * kw}), got {m.shape}")
    return m.reshape(Cin, kh, Cout, kw).transpose(2, 0, 1, 3)


def spatial_factors_to_convs(
    f: LowRankFactors, Cout: int, Cin: int, kh: int, kw: int
) -> tuple[np.ndarray, np.ndarray]:
    """Factors of ``spatial_matrix(W)`` → (W1 [r, Cin, kh, 1], W2 [Cout, r, 1, kw]).

    Σ_r W2[o,r,0,j] · W1[r,c,i,0] = (U V)[(c,i), (o,j)].
    """
    if f.shape != (Cin * kh, Cout * kw):
        raise ValueError(f"factors must be of shape ({Cin * kh}, {Cout * kw}), got {f.shape}")
    r = f.rank
    w1 = f.U.T.reshape(r, Cin, kh, 1)
    w2 = f.V.reshape(r, Cout, kw).transpose(1, 0, 2)[:, :, None, :]
    return w1, w2


def _leading_left_vectors(a: np.ndarray, r: int) -> np.ndarray:
    """The r leading left singular vectors of a: the top eigenvectors of a aᵀ (orthonormal)."""
    n = a.shape[0]
    return scipy.linalg.eigh(a @ a.T, subset_by_index=[n - r, n - 1])[1][:, ::-1]


def _mode_product(w: np.ndarray, m: np.ndarray, mode: int) -> np.ndarray:
    """w ×_mode mᵀ: contracts axis ``mode`` of w with the rows of m [dim, r]."""
    return np.moveaxis(np.tensordot(m, w, axes=(0, mode)), 0, mode)


def _unfold(w: np.ndarray, mode: int) -> np.ndarray:
    """Mode-``mode`` unfolding [w.shape[mode], rest]."""
    return np.moveaxis(w, mode, 0).reshape(w.shape[mode], -1)


def _hooi(w: np.ndarray, rank_in: int, rank_out: int, n_iter: int) -> Tucker2Factors:
    """HOSVD initialisation, then ``n_iter`` alternating (HOOI) updates of U_out and U_in."""
    u_out = _leading_left_vectors(_unfold(w, 0), rank_out)
    u_in = _leading_left_vectors(_unfold(w, 1), rank_in)
    for _ in range(n_iter):
        u_out = _leading_left_vectors(_unfold(_mode_product(w, u_in, 1), 0), rank_out)
        u_in = _leading_left_vectors(_unfold(_mode_product(w, u_out, 0), 1), rank_in)
    core = _mode_product(_mode_product(w, u_out, 0), u_in, 1)
    return Tucker2Factors(U_in=u_in, core=core, U_out=u_out)


def _tucker_args(
    W: np.ndarray, rank_in: int, rank_out: int, n_iter: int
) -> tuple[np.ndarray, int, int, int]:
    """Validate Tucker-2 arguments; return (weight as float64, rank_in, rank_out, n_iter)."""
    w = _conv_weight(W)
    r_in = check_rank(rank_in, w.shape[1], "rank_in", minimum=1)
    r_out = check_rank(rank_out, w.shape[0], "rank_out", minimum=1)
    if isinstance(n_iter, bool) or not isinstance(n_iter, (int, np.integer)) or n_iter < 0:
        raise ValueError(f"n_iter must be an integer >= 0, got {n_iter!r}")
    return w, r_in, r_out, int(n_iter)


def tucker2(W: np.ndarray, rank_in: int, rank_out: int, n_iter: int = 10) -> Tucker2Factors:
    """Tucker-2 of a conv weight: orthonormal U_in, U_out; core = W ×_out U_outᵀ ×_in U_inᵀ.

    Exact when rank_in = Cin and rank_out = Cout.
    """
    return _hooi(*_tucker_args(W, rank_in, rank_out, n_iter))


def tucker2_whitened(
    W: np.ndarray,
    gram_in_channels: np.ndarray,
    rank_in: int,
    rank_out: int,
    ridge: float = 1e-6,
    n_iter: int = 10,
) -> Tucker2Factors:
    """Tucker-2 minimising Σ_k ‖Lᵀ (W − Ŵ)[:, :, k]ᵀ‖²_F, with Σ = L Lᵀ from the channel Gram.

    Σ is ``gram_in_channels`` [Cin, Cin] plus the relative ridge (see ``whitening``): the
    output error when input channels correlate alike at every kernel tap and taps are
    uncorrelated. HOOI runs on W ×_in Lᵀ; the input factor maps back as U_in = L^{-T} Ũ_in
    (no longer orthonormal). Exact at full ranks.
    """
    w, r_in, r_out, n_iter = _tucker_args(W, rank_in, rank_out, n_iter)
    wh = whitening(as_square(gram_in_channels, w.shape[1], "gram_in_channels"), ridge)
    t = _hooi(_mode_product(w, wh.Lt.T, 1), r_in, r_out, n_iter)
    return Tucker2Factors(U_in=wh.unwhiten(t.U_in), core=t.core, U_out=t.U_out)


def tucker2_to_convs(t: Tucker2Factors) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(W1 [r_in, Cin, 1, …], W2 = core [r_out, r_in, *k], W3 [Cout, r_out, 1, …])."""
    n = len(t.kernel_shape)
    return _pointwise(t.U_in.T, n), t.core, _pointwise(t.U_out, n)
