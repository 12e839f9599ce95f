"""EVBMF rank estimation (Nakajima et al. 2013) and MUSCO's weakened rank."""
import math

import numpy as np
import pytest

from onnx_lrsd.decompose import EVBMFResult, evbmf, evbmf_rank, weakened_rank

SHAPES = [(200, 100), (100, 300), (64, 64)]


def _low_rank_plus_noise(shape, rank, sigma, seed):
    """Rank-k signal with singular values 4-8x the noise edge σ(√L + √M), plus N(0, σ²) noise."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    left = np.linalg.qr(rng.standard_normal((rows, rank)))[0]
    right = np.linalg.qr(rng.standard_normal((cols, rank)))[0]
    strengths = sigma * (math.sqrt(rows) + math.sqrt(cols)) * np.linspace(4.0, 8.0, rank)
    return (left * strengths) @ right.T + sigma * rng.standard_normal(shape)


def _svals(matrix):
    return np.linalg.svd(matrix, compute_uv=False)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank", [3, 10])
def test_recovers_rank_and_noise_variance(shape, rank):
    sigma = 0.05
    for seed in range(3):
        result = evbmf_rank(_low_rank_plus_noise(shape, rank, sigma, seed))
        assert isinstance(result, EVBMFResult)
        assert result.rank == rank
        assert result.sigma2 == pytest.approx(sigma**2, rel=0.10)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank", [3, 10])
def test_known_noise_variance_recovers_rank(shape, rank):
    sigma = 0.3
    s = _svals(_low_rank_plus_noise(shape, rank, sigma, seed=7))
    result = evbmf(np.random.default_rng(0).permutation(s), shape, sigma2=sigma**2)  # any order
    assert result.rank == rank
    assert result.sigma2 == sigma**2
    assert s[rank - 1] > result.threshold > s[rank]


def _reference_free_energy(sigma2, s, rows, cols, tau_bar):
    """Free energy over σ² as written in the paper's reference code (L ≤ M, all L values)."""
    alpha = rows / cols
    x = s**2 / (cols * sigma2)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    small, large = x[x <= x_bar], x[x > x_bar]
    b = large - 1 - alpha
    tau = (b + np.sqrt(b**2 - 4 * alpha)) / 2
    return (np.sum(small - np.log(small)) + np.sum(large - tau) + np.sum(np.log((tau + 1) / large))
            + alpha * np.sum(np.log(tau / alpha + 1)))


@pytest.mark.parametrize("shape, tau_bar", [((64, 64), 2.512862417), ((300, 100), 1.462592037)])
def test_estimated_sigma2_minimises_the_free_energy(shape, tau_bar):
    """τ̄ from Φ(τ) + Φ(τ/α) = 0 (α = 1/3: τ̄ = 1.46259, above the 2.5129·√α shortcut)."""
    s = _svals(_low_rank_plus_noise(shape, 10, 0.5, seed=4))
    result = evbmf(s, shape)
    rows, cols = min(shape), max(shape)
    x_bar = (1 + tau_bar) * (1 + rows / cols / tau_bar)
    assert result.threshold == pytest.approx(math.sqrt(cols * result.sigma2 * x_bar), rel=1e-8)
    grid = result.sigma2 * np.geomspace(0.98, 1.02, 401)
    energies = [_reference_free_energy(v, s, rows, cols, tau_bar) for v in grid]
    assert grid[int(np.argmin(energies))] == pytest.approx(result.sigma2, rel=3e-4)
    assert 0.2 < np.argmin(energies) / len(grid) < 0.8  # a true interior minimum


def test_result_is_invariant_to_scale_and_transpose():
    matrix = _low_rank_plus_noise((100, 300), 10, 1.0, seed=1)
    base = evbmf_rank(matrix)
    scaled = evbmf_rank(1e-3 * matrix.T)  # weights-sized values: the σ² search is relative
    assert scaled.rank == base.rank == 10
    assert scaled.sigma2 == pytest.approx(1e-6 * base.sigma2, rel=1e-6)
    assert scaled.threshold == pytest.approx(1e-3 * base.threshold, rel=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_pure_noise_has_rank_zero(shape):
    for seed in range(3):
        noise = 0.3 * np.random.default_rng(seed).standard_normal(shape)
        estimated = evbmf_rank(noise)
        assert estimated.rank == 0
        assert estimated.sigma2 == pytest.approx(0.09, rel=0.10)
        assert evbmf(_svals(noise), shape, sigma2=0.09).rank == 0
        assert not np.any(estimated.posterior_singular_values)


def test_all_zero_matrix_has_rank_zero():
    result = evbmf_rank(np.zeros((20, 30)))
    assert (result.rank, result.sigma2, result.threshold) == (0, 0.0, 0.0)
    assert np.array_equal(result.posterior_singular_values, np.zeros(20))
    assert evbmf(np.zeros(5), (5, 8), sigma2=1.0).rank == 0


def test_threshold_increases_with_sigma2_and_matches_square_case():
    s = _svals(_low_rank_plus_noise((64, 64), 10, 0.3, seed=2))
    results = [evbmf(s, (64, 64), sigma2=v) for v in (0.01, 0.09, 0.5, 2.0, 10.0)]
    thresholds = [r.threshold for r in results]
    ranks = [r.rank for r in results]
    assert all(a < b for a, b in zip(thresholds, thresholds[1:]))
    assert all(a >= b for a, b in zip(ranks, ranks[1:])) and ranks[0] > ranks[-1]
    # α = 1: τ̄ solves log(1+τ) = τ/2, τ̄ ≈ 2.51286, so γ_EVB = σ √(M (1+τ̄)²/τ̄)
    tau = 2.512862417
    assert thresholds[1] == pytest.approx(0.3 * math.sqrt(64 * (1 + tau) ** 2 / tau), rel=1e-8)


@pytest.mark.parametrize("shape", SHAPES)
def test_posterior_values_shrink_and_vanish_beyond_rank(shape):
    s = _svals(_low_rank_plus_noise(shape, 10, 0.1, seed=3))
    result = evbmf(s[::-1], shape)
    posterior = result.posterior_singular_values
    assert posterior.shape == s.shape
    assert np.all(posterior[: result.rank] > 0)
    assert np.all(posterior[: result.rank] < s[: result.rank])
    assert np.all(posterior[result.rank:] == 0)
    assert np.all(np.diff(posterior[: result.rank]) <= 0)


def test_weakened_rank_endpoints_and_monotonicity():
    assert weakened_rank(100, 20, 0.0) == 100
    assert weakened_rank(100, 20, 1.0) == 20
    assert weakened_rank(100, 20, 0.5) == 60
    assert weakened_rank(100, 20, 0.33) == 73  # ⌊100 − 26.4⌋
    assert weakened_rank(100, 0, 1.0) == 1  # never below 1
    assert weakened_rank(7, 7, 0.6) == 7
    ranks = [weakened_rank(100, 20, w) for w in np.linspace(0.0, 1.0, 41)]
    assert all(a >= b for a, b in zip(ranks, ranks[1:]))
    assert all(20 <= r <= 100 for r in ranks)


@pytest.mark.parametrize(
    "singular_values, shape, sigma2, message",
    [
        ([1.0, np.nan], (4, 5), None, "finite"),
        ([1.0, np.inf], (4, 5), None, "finite"),
        ([1.0, -0.5], (4, 5), None, ">= 0"),
        ([1.0], (1, 5), None, "too small"),
        ([1.0, 2.0], (2,), None, "two integers"),
        ([1.0, 2.0], (2.0, 5), None, "two integers"),
        ([1.0] * 5, (4, 6), None, "at most 4"),
        ([1.0] * 5, (6, 4), None, "at most 4"),
        ([], (4, 5), None, "non-empty"),
        (np.ones((2, 2)), (4, 5), None, "1-D"),
        ([1.0, 2.0], (4, 5), 0.0, "sigma2"),
        ([1.0, 2.0], (4, 5), -1.0, "sigma2"),
        ([1.0, 2.0], (4, 5), float("nan"), "sigma2"),
    ],
)
def test_evbmf_validation(singular_values, shape, sigma2, message):
    with pytest.raises(ValueError, match=message):
        evbmf(np.asarray(singular_values, dtype=float), shape, sigma2)


@pytest.mark.parametrize("matrix", [np.ones(5), np.ones((3, 3, 3)), np.array([[1.0, np.nan]])])
def test_evbmf_rank_validation(matrix):
    with pytest.raises(ValueError):
        evbmf_rank(matrix)


@pytest.mark.parametrize(
    "args, message",
    [
        ((0, 0, 0.5), "full_rank"),
        ((10, 11, 0.5), "extreme_rank"),
        ((10, -1, 0.5), "extreme_rank"),
        ((10.0, 2, 0.5), "full_rank"),
        ((10, 2, -0.1), "weakening"),
        ((10, 2, 1.1), "weakening"),
        ((10, 2, float("nan")), "weakening"),
        ((10, 2, True), "weakening"),
    ],
)
def test_weakened_rank_validation(args, message):
    with pytest.raises(ValueError, match=message):
        weakened_rank(*args)
