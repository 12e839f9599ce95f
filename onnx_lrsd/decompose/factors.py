"""Typed results of the factorizations, plus the argument checks they share.

Orientation: a dense layer computes ``y = x @ W`` with ``W`` of shape ``[in, out]``;
conv weights keep ONNX's ``[Cout, Cin, *kernel]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["LowRankFactors", "Tucker2Factors", "as_matrix", "as_square", "check_rank"]


def as_matrix(a: np.ndarray, name: str = "W") -> np.ndarray:
    """Return ``a`` as a finite float64 2-D array, or raise ValueError."""
    m = np.asarray(a, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError(f"{name} contains NaN or Inf")
    return m


def as_square(a: np.ndarray, dim: int, name: str) -> np.ndarray:
    """Return ``a`` as a finite float64 [dim, dim] array, or raise ValueError."""
    m = as_matrix(a, name)
    if m.shape != (dim, dim):
        raise ValueError(f"{name} must have shape ({dim}, {dim}), got {m.shape}")
    return m


def check_rank(rank: int, limit: int, name: str = "rank", minimum: int = 0) -> int:
    """Return ``rank`` as int if ``minimum <= rank <= limit``, else raise ValueError."""
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {rank!r}")
    if not minimum <= rank <= limit:
        raise ValueError(f"{name}={rank} is outside [{minimum}, {limit}]")
    return int(rank)


@dataclass(frozen=True, eq=False)
class LowRankFactors:
    """W ≈ U @ V with U [in, r] and V [r, out]."""

    U: np.ndarray
    V: np.ndarray

    def __post_init__(self) -> None:
        if self.U.ndim != 2 or self.V.ndim != 2:
            raise ValueError(f"U and V must be 2-D, got {self.U.shape} and {self.V.shape}")
        if self.U.shape[1] != self.V.shape[0]:
            raise ValueError(f"inner dimensions differ: U {self.U.shape}, V {self.V.shape}")

    @property
    def rank(self) -> int:
        """r, the inner dimension."""
        return self.U.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        """(in, out) of the approximated matrix."""
        return self.U.shape[0], self.V.shape[1]

    @property
    def n_params(self) -> int:
        """r·(in + out)."""
        return self.U.size + self.V.size

    def to_dense(self) -> np.ndarray:
        """U @ V, of shape [in, out] (zeros at rank 0)."""
        return self.U @ self.V


@dataclass(frozen=True, eq=False)
class Tucker2Factors:
    """W[o,i,*k] ≈ Σ_{a,b} U_out[o,b] · core[b,a,*k] · U_in[i,a].

    ``U_in`` [Cin, r_in], ``core`` [r_out, r_in, *k] (any number of kernel dims),
    ``U_out`` [Cout, r_out].
    """

    U_in: np.ndarray
    core: np.ndarray
    U_out: np.ndarray

    def __post_init__(self) -> None:
        if self.U_in.ndim != 2 or self.U_out.ndim != 2 or self.core.ndim < 3:
            raise ValueError(
                f"need 2-D U_in/U_out and a core with >= 3 dims, got "
                f"{self.U_in.shape}, {self.core.shape}, {self.U_out.shape}"
            )
        if self.core.shape[:2] != (self.U_out.shape[1], self.U_in.shape[1]):
            raise ValueError(
                f"core {self.core.shape} does not match ranks "
                f"(r_out={self.U_out.shape[1]}, r_in={self.U_in.shape[1]})"
            )

    @property
    def ranks(self) -> tuple[int, int]:
        """(r_in, r_out)."""
        return self.U_in.shape[1], self.U_out.shape[1]

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """Spatial kernel dims of the core."""
        return tuple(self.core.shape[2:])

    @property
    def shape(self) -> tuple[int, ...]:
        """(Cout, Cin, *k) of the approximated weight."""
        return (self.U_out.shape[0], self.U_in.shape[0], *self.kernel_shape)

    @property
    def n_params(self) -> int:
        """Cin·r_in + r_out·r_in·prod(k) + Cout·r_out."""
        return self.U_in.size + self.core.size + self.U_out.size

    def to_dense(self) -> np.ndarray:
        """The full weight [Cout, Cin, *k]."""
        return np.einsum("ob,ba...,ia->oi...", self.U_out, self.core, self.U_in)
