"""Streaming calibration statistics in float64, never holding all samples.

A layer ``y = x @ W`` needs G = XᵀX (and Σx, N for the mean); sequential fitting against the
original model also needs the cross term X̂ᵀX, where X̂ is the input the compressed layer sees
and X the original one. Conv inputs become rows with ``im2col``, whose column order matches
``decompose.conv_to_matrix``: conv(x, W) = im2col(x) @ conv_to_matrix(W) at every position.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy.linalg.blas import dsyrk

__all__ = ["GramAccumulator", "TokenCounts", "im2col", "channel_gram"]


def _readonly(a: np.ndarray) -> np.ndarray:
    """A read-only view of ``a``."""
    view = a.view()
    view.flags.writeable = False
    return view


@dataclass
class GramAccumulator:
    """Running G = Σ xᵀx, Σx and the row count over rows x of width ``dim``.

    With ``track_cross`` it also keeps X̂ᵀX and ΣX for ``update_pair(X_hat, X)``; there a
    plain ``update(X)`` means X̂ = X. ``gram``, ``mean`` and ``count`` describe X̂.

    G is accumulated as its upper triangle only (BLAS syrk: half the multiply-adds of a full
    XᵀX), in place in a Fortran-ordered array; ``gram`` returns the full symmetric matrix.
    """

    dim: int
    track_cross: bool = False
    _gram: np.ndarray = field(init=False, repr=False)
    _sum: np.ndarray = field(init=False, repr=False)
    _cross: np.ndarray | None = field(init=False, repr=False)
    _target_sum: np.ndarray | None = field(init=False, repr=False)
    _count: int = field(init=False, repr=False, default=0)
    _lower_stale: bool = field(init=False, repr=False, default=False)

    def __post_init__(self) -> None:
        dim = self.dim
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {self.dim!r}")
        self._gram = np.zeros((self.dim, self.dim), order="F")
        self._sum = np.zeros(self.dim)
        self._cross = np.zeros((self.dim, self.dim)) if self.track_cross else None
        self._target_sum = np.zeros(self.dim) if self.track_cross else None

    def _rows(self, X: np.ndarray, mask: np.ndarray | None, name: str = "X") -> np.ndarray:
        """X [..., dim] as float64 rows [n, dim], keeping rows where ``mask`` [...] is true."""
        x = np.asarray(X)
        if x.ndim < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"{name} must have shape [..., {self.dim}], got {x.shape}")
        if mask is not None:
            m = np.asarray(mask)
            if m.dtype != np.bool_ or m.shape != x.shape[:-1]:
                raise ValueError(
                    f"mask must be boolean with shape {x.shape[:-1]}, got {m.dtype} {m.shape}"
                )
            x = x[m]
        return np.asarray(x, dtype=np.float64).reshape(-1, self.dim)

    def _add(self, x_hat: np.ndarray, x: np.ndarray) -> None:
        """Accumulate rows of X̂ (gram, sum, count) and, when tracked, X̂ᵀX and ΣX."""
        if x_hat.shape[0]:
            # X̂ᵀ as an F-ordered [dim, n] view: syrk adds X̂ᵀX̂ into the upper triangle, no copies
            self._gram = dsyrk(1.0, np.ascontiguousarray(x_hat).T, beta=1.0, c=self._gram, overwrite_c=True)
            self._lower_stale = True
        self._sum += x_hat.sum(axis=0)
        self._count += x_hat.shape[0]
        if self.track_cross:
            self._cross += x_hat.T @ x
            self._target_sum += x.sum(axis=0)

    def update(self, X: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Add rows X [..., dim]; rows whose boolean ``mask`` [...] is False are dropped."""
        x = self._rows(X, mask)
        self._add(x, x)

    def update_pair(self, X_hat: np.ndarray, X: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Add paired rows: X̂ (compressed model's input) and X (original model's input)."""
        if not self.track_cross:
            raise ValueError("update_pair needs GramAccumulator(dim, track_cross=True)")
        if np.shape(X_hat) != np.shape(X):
            raise ValueError(f"X_hat and X differ in shape: {np.shape(X_hat)} vs {np.shape(X)}")
        self._add(self._rows(X_hat, mask, "X_hat"), self._rows(X, mask))

    @property
    def count(self) -> int:
        """Number of rows accumulated."""
        return self._count

    @property
    def gram(self) -> np.ndarray:
        """X̂ᵀX̂ [dim, dim] (read-only view; its lower triangle is refreshed from the
        accumulated upper one when rows were added since the last read)."""
        if self._lower_stale:
            self.own()
            _mirror_upper(self._gram)
            self._lower_stale = False
        return _readonly(self._gram)

    @property
    def mean(self) -> np.ndarray:
        """Column mean of X̂ [dim]."""
        return self._sum / self._nonzero_count()

    @property
    def cross(self) -> np.ndarray:
        """X̂ᵀX [dim, dim] (read-only view); needs ``track_cross``."""
        return _readonly(self._tracked(self._cross))

    @property
    def target_mean(self) -> np.ndarray:
        """Column mean of X [dim]; needs ``track_cross``."""
        return self._tracked(self._target_sum) / self._nonzero_count()

    def _nonzero_count(self) -> int:
        if self._count == 0:
            raise ValueError("no rows accumulated yet")
        return self._count

    def _tracked(self, a: np.ndarray | None) -> np.ndarray:
        if a is None:
            raise ValueError("cross statistics need GramAccumulator(dim, track_cross=True)")
        return a

    def merge(self, other: GramAccumulator) -> GramAccumulator:
        """A new accumulator holding the sums of both (e.g. calibration shards)."""
        merged = GramAccumulator(self.dim, self.track_cross)
        merged.add(self)
        merged.add(other)
        return merged

    def add(self, other: GramAccumulator) -> None:
        """Add `other`'s sums into this accumulator, in place. Arrays that arrived read-only
        (e.g. from a shared-memory object store) are copied first: see `own`."""
        if (other.dim, other.track_cross) != (self.dim, self.track_cross):
            raise ValueError(
                f"cannot merge dim={other.dim}, track_cross={other.track_cross} into "
                f"dim={self.dim}, track_cross={self.track_cross}"
            )
        self.own()
        self._gram += other._gram
        self._lower_stale = True
        self._sum += other._sum
        self._count += other._count
        if self.track_cross:
            self._cross += other._cross
            self._target_sum += other._target_sum

    def own(self) -> None:
        """Make every array writable, copying those that are not (a result deserialized
        from Ray's object store is a view of shared memory); free when they already are."""
        for name in ("_gram", "_sum", "_cross", "_target_sum"):
            a = getattr(self, name)
            if a is not None and not a.flags.writeable:
                setattr(self, name, a.copy(order="K"))


@dataclass
class TokenCounts:
    """The statistics of one-hot rows x = e_id, the input of a lookup y = onehot(ids)·E: the
    Gram XᵀX = diag(c), c_v the count of index v, held as its diagonal c [dim] (never the
    dense V × V matrix), Σx = c and the row count N = Σ c.

    The interface of a `GramAccumulator` whose ``gram`` is a diagonal: the whitened kernels
    (`decompose.whitened`) take a 1-D Gram as diag(gram). ``update`` takes the indices
    [...] themselves. X̂ = X is assumed (no cross statistics): a lookup's indices are model
    inputs, which compression leaves as they are.
    """

    dim: int
    track_cross = False
    _counts: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.dim, bool) or not isinstance(self.dim, (int, np.integer)) or self.dim < 1:
            raise ValueError(f"dim must be a positive integer, got {self.dim!r}")
        self._counts = np.zeros(self.dim)

    def update(self, ids: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Count the indices `ids` [...] (negative ones from the end, as Gather reads them);
        those whose boolean ``mask`` [...] is False are dropped."""
        index = np.asarray(ids)
        if not np.issubdtype(index.dtype, np.integer):
            raise ValueError(f"ids must be integers, got {index.dtype}")
        if mask is not None:
            m = np.asarray(mask)
            if m.dtype != np.bool_ or m.shape != index.shape:
                raise ValueError(f"mask must be boolean with shape {index.shape}, got {m.dtype} {m.shape}")
            index = index[m]
        index = index.ravel().astype(np.int64)
        if index.size and (index.min() < -self.dim or index.max() >= self.dim):
            raise ValueError(f"ids must lie in [-{self.dim}, {self.dim}), got [{index.min()}, {index.max()}]")
        self._counts += np.bincount(np.where(index < 0, index + self.dim, index), minlength=self.dim)

    def update_pair(self, ids_hat: np.ndarray, ids: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Sequential fitting's paired rows: the compressed model's indices are counted."""
        self.update(ids_hat, mask)

    @property
    def count(self) -> int:
        return int(self._counts.sum())

    @property
    def gram(self) -> np.ndarray:
        """The diagonal c [dim] of XᵀX (read-only view)."""
        return _readonly(self._counts)

    @property
    def mean(self) -> np.ndarray:
        """Column mean of X: the index frequencies c / N [dim]."""
        if not self.count:
            raise ValueError("no rows accumulated yet")
        return self._counts / self.count

    def merge(self, other: TokenCounts) -> TokenCounts:
        merged = TokenCounts(self.dim)
        merged.add(self)
        merged.add(other)
        return merged

    def add(self, other: TokenCounts) -> None:
        if not isinstance(other, TokenCounts) or other.dim != self.dim:
            raise ValueError(f"cannot merge {other!r} into TokenCounts(dim={self.dim})")
        self.own()
        self._counts += other._counts

    def own(self) -> None:
        """Make the counts writable (a copy when they arrived read-only, e.g. from Ray)."""
        if not self._counts.flags.writeable:
            self._counts = self._counts.copy()


MIRROR_BLOCK = 512
"""Rows of the lower triangle refreshed per step (bounds the temporary to MIRROR_BLOCK × dim)."""


def _mirror_upper(g: np.ndarray) -> None:
    """Copy the upper triangle of the square `g` onto its lower one, in place, by blocks."""
    n = g.shape[0]
    for start in range(0, n, MIRROR_BLOCK):
        stop = min(start + MIRROR_BLOCK, n)
        g[start:stop, :start] = g[:start, start:stop].T
        block = g[start:stop, start:stop]
        block[...] = np.triu(block) + np.triu(block, 1).T


def _int_tuple(values, length: int, name: str, minimum: int) -> tuple[int, ...]:
    """``values`` as a tuple of ``length`` ints, each >= ``minimum``, or ValueError."""
    t = tuple(int(v) for v in values)
    if len(t) != length or any(v < minimum for v in t):
        raise ValueError(f"{name} must be {length} integers >= {minimum}, got {tuple(values)}")
    return t


def im2col(
    x: np.ndarray,
    kernel_shape: tuple[int, ...],
    strides: tuple[int, ...] | None = None,
    pads: tuple[int, ...] | None = None,
    dilations: tuple[int, ...] | None = None,
    max_positions: int | None = None,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """Patches of x [N, C, *spatial] as rows [M, C·prod(k)], one per output position.

    Columns are ordered (c, kernel position in C order), rows (n, output position in C
    order), so conv(x, W) = im2col(x) @ conv_to_matrix(W). ``pads`` follow ONNX (all begins,
    then all ends). ``max_positions`` keeps a uniform random subset of rows, drawn without
    replacement from ``rng`` (a Generator or seed; None means seed 0), in row order.
    The dtype of x is kept.
    """
    x = np.asarray(x)
    if x.ndim < 3:
        raise ValueError(f"x must be [N, C, *spatial], got shape {x.shape}")
    nsp = x.ndim - 2
    k = _int_tuple(kernel_shape, nsp, "kernel_shape", 1)
    s = _int_tuple((1,) * nsp if strides is None else strides, nsp, "strides", 1)
    d = _int_tuple((1,) * nsp if dilations is None else dilations, nsp, "dilations", 1)
    p = _int_tuple((0,) * (2 * nsp) if pads is None else pads, 2 * nsp, "pads", 0)
    xp = np.pad(x, [(0, 0), (0, 0)] + [(p[i], p[i + nsp]) for i in range(nsp)])
    span = tuple((k[i] - 1) * d[i] + 1 for i in range(nsp))
    if any(xp.shape[2 + i] < span[i] for i in range(nsp)):
        raise ValueError(f"kernel span {span} exceeds padded input {xp.shape[2:]}")
    win = sliding_window_view(xp, span, axis=tuple(range(2, 2 + nsp)))
    win = win[(slice(None), slice(None)) + tuple(slice(None, None, v) for v in s + d)]
    out = win.shape[2 : 2 + nsp]
    total = x.shape[0] * int(np.prod(out))
    if max_positions is not None and max_positions < 1:
        raise ValueError(f"max_positions must be >= 1, got {max_positions}")
    if max_positions is None or max_positions >= total:
        return np.moveaxis(win, 1, 1 + nsp).reshape(total, -1)
    gen = np.random.default_rng(0 if rng is None else rng)
    rows = np.sort(gen.choice(total, size=max_positions, replace=False))
    n_idx, *pos_idx = np.unravel_index(rows, (x.shape[0], *out))
    return win[(n_idx, slice(None), *pos_idx)].reshape(max_positions, -1)


def channel_gram(x: np.ndarray) -> np.ndarray:
    """Per-input-channel Gram [C, C] = Σ_{n, position} x[n, c, pos] · x[n, c', pos]."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim < 3:
        raise ValueError(f"x must be [N, C, *spatial], got shape {a.shape}")
    a = a.reshape(a.shape[0], a.shape[1], -1)
    return np.tensordot(a, a, axes=([0, 2], [0, 2]))
