"""Channel selection and least-squares repair (onnx_lrsd.decompose.channels) on seeded data."""
import numpy as np
import pytest

from onnx_lrsd.decompose.channels import (CRITERIA, ConsumerStats, channel_order, refit_consumer, refit_error,
                                          select_channels, slicing_error, width_errors)


def _stats(h, W, block=1):
    return ConsumerStats(gram=h.T @ h, total=h.sum(axis=0), count=h.shape[0], weight=W, block=block)


def _data(seed=0, rows=2000, channels=24, out=10, block=1):
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((rows, 8))
    mix = rng.standard_normal((8, channels * block))
    h = np.maximum(latent @ mix + 0.3 * rng.standard_normal((rows, channels * block)) + 0.5, 0.0)  # post-ReLU
    W = rng.standard_normal((channels * block, out)) * rng.uniform(0.1, 2.0, (channels * block, 1))
    b = rng.standard_normal(out)
    return h, W, b


def _empirical_error(h, W, b, kept, W_new, shift, block=1):
    cols = (np.asarray(kept)[:, None] * block + np.arange(block)).reshape(-1)
    y = h @ W + b
    y_hat = h[:, cols] @ W_new + b + shift
    return float(np.mean(np.sum((y - y_hat) ** 2, axis=1)))


@pytest.mark.parametrize("block", [1, 3])
def test_refit_matches_least_squares_and_closed_form(block):
    h, W, b = _data(block=block, channels=12)
    stats = _stats(h, W, block)
    kept = np.array([0, 2, 3, 7, 9])
    W_new, shift = refit_consumer(stats, kept)
    cols = stats.columns(kept)
    # reference: ordinary least squares with an intercept column
    X = np.hstack([h[:, cols], np.ones((h.shape[0], 1))])
    coef = np.linalg.lstsq(X, h @ W, rcond=None)[0]
    np.testing.assert_allclose(W_new, coef[:-1], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(shift, coef[-1], rtol=1e-6, atol=1e-8)
    empirical = _empirical_error(h, W, b, kept, W_new, shift, block)
    assert refit_error(stats, kept) == pytest.approx(empirical, rel=1e-6)
    order = np.concatenate([kept, np.setdiff1d(np.arange(12), kept)])
    assert width_errors(stats, order)[len(kept)] == pytest.approx(empirical, rel=1e-6)


def test_refit_beats_slicing_and_zero_at_full_width():
    h, W, b = _data()
    stats = _stats(h, W)
    for criterion in CRITERIA:
        for keep in (4, 8, 16):
            kept = select_channels([stats], keep, criterion)
            refit = refit_error(stats, kept)
            assert refit <= slicing_error(stats, kept, fold_mean=True) + 1e-9
            assert slicing_error(stats, kept, fold_mean=True) <= slicing_error(stats, kept) + 1e-9
    full = np.arange(stats.channels)
    assert refit_error(stats, full) < 1e-9 * np.sum((h @ W) ** 2) / h.shape[0]
    W_new, shift = refit_consumer(stats, full)
    np.testing.assert_allclose(W_new, W, atol=1e-6)
    np.testing.assert_allclose(shift, 0, atol=1e-6)


@pytest.mark.parametrize("criterion", CRITERIA)
def test_errors_fall_monotonically_with_width(criterion):
    h, W, _ = _data(seed=1)
    stats = _stats(h, W)
    errors = width_errors(stats, channel_order([stats], criterion))
    assert np.all(np.diff(errors) <= 1e-9 * errors[0])
    assert errors[-1] < 1e-8 * errors[0]
    assert errors[0] > 0


def test_greedy_is_best_on_its_own_objective_and_beats_energy():
    """Greedy output reconstruction ≤ energy on average over widths (it optimises the error each step)."""
    wins = 0
    for seed in range(4):
        h, W, _ = _data(seed=seed)
        stats = _stats(h, W)
        greedy = width_errors(stats, channel_order([stats], "greedy"))
        energy = width_errors(stats, channel_order([stats], "energy"))
        assert greedy[1] <= energy[1] + 1e-12  # the first greedy step is optimal
        wins += np.sum(greedy[1:-1] <= energy[1:-1] + 1e-12)
    assert wins >= 0.8 * 4 * 23


def test_several_consumers_share_one_selection():
    h, W, _ = _data(seed=2)
    rng = np.random.default_rng(5)
    other = _stats(np.maximum(h + 0.1 * rng.standard_normal(h.shape), 0), rng.standard_normal((24, 3)))
    first = _stats(h, W)
    kept = select_channels([first, other], 10, "greedy")
    assert kept.shape == (10,) and np.all(np.diff(kept) > 0)
    with pytest.raises(ValueError):
        select_channels([first, _stats(h[:, :5], W[:5])], 3)
    with pytest.raises(ValueError):
        select_channels([first], 0)


def test_sequential_refit_reproduces_the_original_from_the_perturbed_input():
    """With cross statistics the refit regresses the original output h W on the input ĥ the
    layer now sees (least squares with an intercept)."""
    h, W, b = _data(seed=4, channels=12)
    rng = np.random.default_rng(8)
    h_hat = h @ (np.eye(12) + 0.2 * rng.standard_normal((12, 12))) + 0.1 * rng.standard_normal(h.shape)
    stats = ConsumerStats(gram=h_hat.T @ h_hat, total=h_hat.sum(axis=0), count=h.shape[0], weight=W,
                          cross=h_hat.T @ h, target_total=h.sum(axis=0))
    kept = np.array([0, 1, 4, 5, 8, 11])
    W_new, shift = refit_consumer(stats, kept)
    X = np.hstack([h_hat[:, kept], np.ones((h.shape[0], 1))])
    coef = np.linalg.lstsq(X, h @ W, rcond=None)[0]
    np.testing.assert_allclose(W_new, coef[:-1], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(shift, coef[-1], rtol=1e-6, atol=1e-8)
