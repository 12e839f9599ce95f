"""Which channels of a layer's input to keep, and the least-squares repair of its consumers.

A producer writes channels h [rows, C] that one or more consumers read through weights
``y = h @ W + b`` (W [C·block, out]; a k×k conv consumer sees ``block = k²`` im2col columns per
channel, ordered channel-major as ``conv_to_matrix``). Removing channels D and keeping S, the
best consumer in the least-squares sense, with an intercept, is

    W_S' = Σ_SS⁻¹ Σ_S: W,   b' = b + μ W − μ_S W_S'

where μ = E[h] and Σ = E[h hᵀ] − μ μᵀ (the dropped channels' mean folds into the bias). Its
mean squared output error per row is ``tr(Wᵀ R_S W)`` with R_S = Σ − Σ_:S Σ_SS⁻¹ Σ_S: the
Schur complement (the part of h that the kept channels cannot explain linearly).

A consumer that reads the channels beside others (a Concat on the channel axis) sees them as
rows offset·block … (offset + C)·block of its input: `ConsumerStats.part` takes that diagonal
block of its Gram and those rows of W, and the refit reproduces that part's share h_A W_A of the
output (the other parts keep their rows).

Selection criteria (all return nested orders, so one pass gives every width):
- ``energy``: E[h_j²]·‖W_j‖², the channel's share of the output energy (no interaction);
- ``nystrom``: greedy column-subset selection on Σ (Nyström / pivoted-Cholesky type): each
  step adds the channel that most lowers tr(R_S), the error of reconstructing h itself;
- ``greedy``: greedy reconstruction of the consumers' outputs: each step adds the channel
  that most lowers Σ_consumers tr(Wᵀ R_S W) (the gain of channel j is ‖(R W)_j‖² / R_jj).

Pure numpy/scipy; float64 throughout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np
import scipy.linalg

__all__ = ["ConsumerStats", "CRITERIA", "channel_order", "select_channels", "refit_consumer", "refit_error",
           "slicing_error", "width_errors", "output_energy"]

CRITERIA = ("energy", "nystrom", "greedy")
_RIDGE = 1e-9


@dataclass(frozen=True)
class ConsumerStats:
    """One consumer of the channels: its input statistics (Σ hᵀh, Σ h, row count over rows of
    width C·block) and weight W [C·block, out]."""

    gram: np.ndarray
    total: np.ndarray
    count: int
    weight: np.ndarray
    block: int = 1
    cross: np.ndarray | None = None
    target_total: np.ndarray | None = None

    def __post_init__(self) -> None:
        d = self.weight.shape[0]
        if self.gram.shape != (d, d) or self.total.shape != (d,) or d % self.block:
            raise ValueError(f"statistics {self.gram.shape}/{self.total.shape} do not fit a weight of "
                             f"{d} rows in blocks of {self.block}")
        if self.count < 1:
            raise ValueError("no calibration rows")

    @property
    def channels(self) -> int:
        return self.weight.shape[0] // self.block

    @property
    def mean(self) -> np.ndarray:
        return np.asarray(self.total, np.float64) / self.count

    @property
    def second_moment(self) -> np.ndarray:
        """E[h hᵀ]."""
        return np.asarray(self.gram, np.float64) / self.count

    @property
    def covariance(self) -> np.ndarray:
        """Σ = E[h hᵀ] − μ μᵀ."""
        mu = self.mean
        return self.second_moment - np.outer(mu, mu)

    @property
    def target_mean(self) -> np.ndarray:
        """E[h] of the original model's input (sequential fits), else `mean`."""
        return self.mean if self.target_total is None else np.asarray(self.target_total, np.float64) / self.count

    @property
    def cross_covariance(self) -> np.ndarray:
        """E[ĥ hᵀ] − μ̂ μᵀ between the input ĥ the layer sees and the original model's h
        (sequential fits, `cross` = Σ ĥᵀh), else Σ."""
        if self.cross is None:
            return self.covariance
        return np.asarray(self.cross, np.float64) / self.count - np.outer(self.mean, self.target_mean)

    def part(self, offset: int, channels: int) -> "ConsumerStats":
        """The statistics of input channels offset … offset + channels alone: the diagonal
        block of the Gram (and of the cross statistics), those entries of the sums, those rows of W."""
        if offset < 0 or offset + channels > self.channels:
            raise ValueError(f"channels {offset}..{offset + channels} outside the {self.channels} inputs")
        rows = slice(offset * self.block, (offset + channels) * self.block)
        return ConsumerStats(gram=np.asarray(self.gram)[rows, rows], total=np.asarray(self.total)[rows],
                             count=self.count, weight=np.asarray(self.weight)[rows], block=self.block,
                             cross=None if self.cross is None else np.asarray(self.cross)[rows, rows],
                             target_total=None if self.target_total is None else np.asarray(self.target_total)[rows])

    def columns(self, channels: np.ndarray) -> np.ndarray:
        """The weight rows (im2col columns) of `channels`, in order."""
        channels = np.asarray(channels, dtype=np.int64)
        return (channels[:, None] * self.block + np.arange(self.block)[None, :]).reshape(-1)


def _channel_count(consumers: Sequence[ConsumerStats]) -> int:
    if not consumers:
        raise ValueError("at least one consumer is needed")
    counts = {c.channels for c in consumers}
    if len(counts) != 1:
        raise ValueError(f"consumers disagree on the channel count: {sorted(counts)}")
    return counts.pop()


class _Schur:
    """The Schur complement R of Σ after conditioning on the channels taken so far, and R·T
    for a target map T (W for output error, identity for reconstructing h)."""

    def __init__(self, consumer: ConsumerStats, target: np.ndarray | None):
        """`target` None means the identity (R·T is R itself: kept once)."""
        self.block = consumer.block
        self.R = consumer.covariance
        self.RT = self.R if target is None else self.R @ target
        self.target = np.eye(self.R.shape[0]) if target is None else target
        self.floor = _RIDGE * max(float(np.trace(self.R)) / self.R.shape[0], 1e-300)

    def error(self) -> float:
        return float(np.sum(self.target * self.RT))

    def gains(self) -> np.ndarray:
        """Fall of the error from taking each channel: tr(M_jᵀ R_jj⁻¹ M_j), M_j = (R T)[block j]."""
        b, C = self.block, self.R.shape[0] // self.block
        if b == 1:
            diag = np.diag(self.R)
            safe = diag > self.floor
            out = np.zeros(C)
            out[safe] = np.sum(self.RT[safe] ** 2, axis=1) / diag[safe]
            return out
        R4 = self.R.reshape(C, b, C, b)
        blocks = R4[np.arange(C), :, np.arange(C), :] + self.floor * np.eye(b)
        M = self.RT.reshape(C, b, -1)
        solved = np.linalg.solve(blocks, M)
        return np.einsum("cbo,cbo->c", M, solved)

    def take(self, channel: int) -> None:
        cols = np.arange(channel * self.block, (channel + 1) * self.block)
        R_B = self.R[:, cols]
        inv = np.linalg.pinv(R_B[cols] + self.floor * np.eye(self.block))
        RB_inv = R_B @ inv
        if self.RT is not self.R:
            self.RT -= RB_inv @ self.RT[cols]
        self.R -= RB_inv @ R_B.T


def _energy_scores(consumers: Sequence[ConsumerStats]) -> np.ndarray:
    """Σ_consumers Σ_block E[h_c²]·‖W_c‖² per channel."""
    scores = 0.0
    for c in consumers:
        per_column = np.diag(c.second_moment) * np.sum(np.asarray(c.weight, np.float64) ** 2, axis=1)
        scores = scores + per_column.reshape(c.channels, c.block).sum(axis=1)
    return np.asarray(scores)


def channel_order(consumers: Sequence[ConsumerStats], criterion: str = "greedy", limit: int | None = None
                  ) -> np.ndarray:
    """Channels in the order the criterion takes them (the first k are the kept set of width k);
    greedy criteria stop after `limit` channels."""
    C = _channel_count(consumers)
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if criterion == "energy":
        return np.argsort(-_energy_scores(consumers), kind="stable")
    states = [_Schur(c, np.asarray(c.weight, np.float64) if criterion == "greedy" else None) for c in consumers]
    steps = C if limit is None else min(limit, C)
    taken = np.zeros(C, dtype=bool)
    order = []
    for _ in range(steps):
        gains = sum(s.gains() for s in states)
        gains[taken] = -np.inf
        j = int(np.argmax(gains))
        order.append(j)
        taken[j] = True
        for s in states:
            s.take(j)
    rest = np.flatnonzero(~taken)
    return np.concatenate([np.asarray(order, dtype=np.int64), rest[np.argsort(-_energy_scores(consumers)[rest],
                                                                              kind="stable")]])


def select_channels(consumers: Sequence[ConsumerStats], keep: int, criterion: str = "greedy") -> np.ndarray:
    """The `keep` channels to keep (ascending indices)."""
    C = _channel_count(consumers)
    if not 1 <= keep <= C:
        raise ValueError(f"keep must be in [1, {C}], got {keep}")
    return np.sort(channel_order(consumers, criterion, limit=keep)[:keep])


def refit_consumer(consumer: ConsumerStats, kept: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(W_S' [len(kept)·block, out], bias shift [out]) of the least-squares refit with intercept:
    W_S' = Σ_SS⁻¹ Σ_S: W and shift = μ W − μ_S W_S'. With cross statistics (sequential: the
    layer sees ĥ, the original saw h) it reproduces h W from ĥ_S:
    W_S' = Σ̂_SS⁻¹ Cov(ĥ, h)_S: W and shift = μ W − μ̂_S W_S'."""
    W = np.asarray(consumer.weight, np.float64)
    cols = consumer.columns(kept)
    S = consumer.covariance[np.ix_(cols, cols)]
    floor = _RIDGE * max(float(np.trace(S)) / max(len(cols), 1), 1e-300)
    rhs = consumer.cross_covariance[cols] @ W
    try:
        W_new = scipy.linalg.solve(S + floor * np.eye(len(cols)), rhs, assume_a="pos")
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        W_new = np.linalg.lstsq(S, rhs, rcond=None)[0]
    return W_new, consumer.target_mean @ W - consumer.mean[cols] @ W_new


def refit_error(consumer: ConsumerStats, kept: np.ndarray) -> float:
    """Mean squared output error per row of the refitted consumer: tr(Wᵀ R_S W)."""
    W = np.asarray(consumer.weight, np.float64)
    W_new, shift = refit_consumer(consumer, kept)
    cols = consumer.columns(kept)
    # y − ŷ = h W − h_S W_S' − shift; E‖·‖² = tr(Dᵀ E[h hᵀ] D) − 2 shift·E[h]D + ‖shift‖², D = W − W_S' on S
    D = W.copy()
    D[cols] -= W_new
    mu = consumer.mean
    return _quadratic(consumer.second_moment, D) - 2 * float(mu @ D @ shift) + float(shift @ shift)


def slicing_error(consumer: ConsumerStats, kept: np.ndarray, fold_mean: bool = False) -> float:
    """Mean squared output error per row when the dropped channels are simply cut
    (``fold_mean``: their mean moved into the bias): tr(W_Dᵀ M_DD W_D), M = E[hhᵀ] (or Σ)."""
    W = np.asarray(consumer.weight, np.float64)
    dropped = consumer.columns(np.setdiff1d(np.arange(consumer.channels), kept))
    M = consumer.covariance if fold_mean else consumer.second_moment
    return _quadratic(M[np.ix_(dropped, dropped)], W[dropped])


def output_energy(consumer: ConsumerStats) -> float:
    """E‖h W‖² (to make errors relative)."""
    return _quadratic(consumer.second_moment, np.asarray(consumer.weight, np.float64))


def width_errors(consumer: ConsumerStats, order: np.ndarray) -> np.ndarray:
    """Refit error at every width k = 0..C when the first k channels of `order` are kept:
    errors[k] = tr(Wᵀ R_{order[:k]} W), by rank-`block` updates of the Schur complement."""
    W = np.asarray(consumer.weight, np.float64)
    state = _Schur(consumer, W)
    errors = [state.error()]
    for j in order:
        state.take(int(j))
        errors.append(max(state.error(), 0.0))
    return np.asarray(errors)


def _quadratic(M: np.ndarray, W: np.ndarray) -> float:
    """tr(Wᵀ M W)."""
    return float(np.sum(W * (M @ W)))
