"""The Gram solver of the truncated SVD against LAPACK's exact SVD: singular values within
1e-6 (relative), reconstruction error within 1e-6 of the Eckart–Young optimum (relative to
‖W‖), on seeded matrices from well to badly conditioned, wide and tall; and auto's choices."""
import numpy as np
import pytest

from onnx_lrsd import config
from onnx_lrsd.decompose import singular_values, truncated_svd, whitened_spectrum, whitened_svd
from onnx_lrsd.decompose.svd import GRAM_MIN_SIDE, SVD_SOLVERS

SV_RTOL = 1e-6
ERR_ATOL = 1e-6


def _matrix(rows, cols, condition, seed=0):
    """rows×cols with log-spaced singular values from 1 down to 1/condition."""
    rng = np.random.default_rng(seed)
    k = min(rows, cols)
    p = np.linalg.qr(rng.standard_normal((rows, k)))[0]
    q = np.linalg.qr(rng.standard_normal((cols, k)))[0]
    return (p * np.logspace(0, -np.log10(condition), k)) @ q.T


def _check(w, rank, factors):
    exact = np.linalg.svd(w, compute_uv=False)
    got = np.linalg.norm(factors.U, axis=0) * np.linalg.norm(factors.V, axis=1)  # balanced: √σ each
    np.testing.assert_allclose(got, exact[:rank], rtol=SV_RTOL)
    norm = np.linalg.norm(w)
    optimum = np.sqrt(np.sum(exact[rank:] ** 2)) / norm
    error = np.linalg.norm(w - factors.U @ factors.V) / norm
    assert optimum - 1e-12 <= error <= optimum + ERR_ATOL


@pytest.mark.parametrize("shape", [(600, 300), (300, 600)])
@pytest.mark.parametrize("condition", [1e1, 1e4, 1e6, 1e12])
@pytest.mark.parametrize("share", [0.1, 0.5, 1.0])
def test_gram_and_auto_match_the_exact_svd(shape, condition, share):
    w = _matrix(*shape, condition, seed=int(condition) % 97)
    rank = max(1, int(share * min(shape)))
    sigma = np.linalg.svd(w, compute_uv=False)
    solvers = ["auto", "exact"]
    if sigma[rank - 1] >= 1e-6 * sigma[0]:  # the Gram resolves the kept spectrum (svd.GRAM_RESOLUTION)
        solvers.append("gram")
    for solver in solvers:
        factors = truncated_svd(w, rank, solver)
        assert factors.U.shape == (shape[0], rank) and factors.V.shape == (rank, shape[1])
        _check(w, rank, factors)


def test_gram_handles_zero_and_rank_deficient_matrices():
    w = np.zeros((300, 280))
    assert not np.any(truncated_svd(w, 5, "auto").to_dense())
    rng = np.random.default_rng(3)
    low = rng.standard_normal((300, 4)) @ rng.standard_normal((4, 280))
    dense = truncated_svd(low, 10, "auto").to_dense()  # beyond the numerical rank: exact fallback
    assert np.linalg.norm(dense - low) <= 1e-10 * np.linalg.norm(low)


def test_gram_is_deterministic_and_rank_zero_is_empty():
    w = _matrix(400, 300, 1e3, seed=5)
    a, b = truncated_svd(w, 50, "gram"), truncated_svd(w, 50, "gram")
    assert np.array_equal(a.U, b.U) and np.array_equal(a.V, b.V)
    assert truncated_svd(w, 0, "gram").to_dense().shape == (400, 300)
    with pytest.raises(ValueError, match="svd solver"):
        truncated_svd(w, 3, "magic")
    assert SVD_SOLVERS == config.SVD_SOLVERS


def test_spectra_from_the_gram_keep_their_energy():
    """Spectra (energy shares, tail errors) from the Gram: absolute error far below σ_1·1e-6."""
    w = _matrix(500, GRAM_MIN_SIDE + 44, 1e3, seed=7)
    exact = np.linalg.svd(w, compute_uv=False)
    for solver in ("auto", "gram"):
        np.testing.assert_allclose(singular_values(w, solver), exact, rtol=0, atol=1e-6 * exact[0])


def test_whitened_fit_with_the_gram_solver_matches_the_exact_one():
    rng = np.random.default_rng(11)
    w = _matrix(320, 280, 1e4, seed=11)
    x = rng.standard_normal((2000, 320)) * np.logspace(0, -2, 320)
    gram = x.T @ x
    exact = whitened_svd(w, gram, 60, 1e-3, "exact").to_dense()
    for solver in ("auto", "gram"):
        got = whitened_svd(w, gram, 60, 1e-3, solver).to_dense()
        assert np.linalg.norm(got - exact) <= 1e-6 * np.linalg.norm(exact)
    np.testing.assert_allclose(whitened_spectrum(w, gram, 1e-3, "auto"), whitened_spectrum(w, gram, 1e-3, "exact"),
                               rtol=0, atol=1e-8 * whitened_spectrum(w, gram, 1e-3, "exact")[0])


@pytest.mark.parametrize("calibration", [None, "random"])
def test_compressed_models_agree_across_solvers(calibration):
    """The whole compressor, data-free and data-aware, gives the same model (outputs within
    1e-4 relative in onnxruntime) with the Gram solver as with the exact SVD."""
    from helpers.graphs import mlp_model

    from onnx_lrsd import compress
    from onnx_lrsd.runtime.bench import outputs_on
    from onnx_lrsd.runtime.feeds import random_feeds

    model = mlp_model(sizes=(320, 512, 288, 10), names=("fc1", "fc2", "head"))
    options = dict(keep=0.5, calibration=calibration, calib_samples=64, verify=False)
    results = {solver: compress(model, svd_solver=solver, **options) for solver in ("exact", "auto")}
    assert [layer.ranks for layer in results["exact"].report.layers] == \
        [layer.ranks for layer in results["auto"].report.layers]
    feeds = [random_feeds(model, batch=16, seed=3)]
    exact, auto = (outputs_on(results[s].model, feeds)[0] for s in ("exact", "auto"))
    assert np.linalg.norm(auto - exact) <= 1e-4 * np.linalg.norm(exact)
