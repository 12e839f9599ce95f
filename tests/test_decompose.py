"""Maths of onnx_lrsd.decompose: optimality, exactness, conv reshapes and conv chains."""
import numpy as np
import pytest
import scipy.optimize
import scipy.signal

from onnx_lrsd.decompose import (
    LowRankFactors,
    Tucker2Factors,
    bias_correction,
    channel_factors_to_convs,
    conv_to_matrix,
    data_error,
    matrix_to_conv,
    randomized_svd,
    rank_for_energy,
    sequential_target,
    singular_values,
    spatial_factors_to_convs,
    spatial_matrix,
    spatial_matrix_to_conv,
    truncated_svd,
    tucker2,
    tucker2_to_convs,
    tucker2_whitened,
    whitened_svd,
    whitening,
)


def _rng(seed=0):
    return np.random.default_rng(seed)


def _rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _correlated_data(n=400, d=12, seed=0):
    """Rows with very unequal, correlated column scales (a realistic activation Gram)."""
    rng = _rng(seed)
    mix = rng.standard_normal((d, d)) * np.logspace(0, -2.5, d)[:, None]
    return rng.standard_normal((n, d)) @ mix


def _objective(X, W, A):
    return np.linalg.norm(X @ (W - A))


def _best_rank_r(M, r):
    """Eckart–Young rank-r approximation of M, written independently of the package."""
    p, s, qt = np.linalg.svd(M, full_matrices=False)
    return (p[:, :r] * s[:r]) @ qt[:r]


def _conv2d_reference(x, w, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1)):
    """ONNX Conv (no bias, group 1): x [N, C, H, W], w [Cout, C, kh, kw], pads (t, l, b, r)."""
    kh, kw = w.shape[2:]
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    oh = (xp.shape[2] - (kh - 1) * dilations[0] - 1) // strides[0] + 1
    ow = (xp.shape[3] - (kw - 1) * dilations[1] - 1) // strides[1] + 1
    y = np.zeros((x.shape[0], w.shape[0], oh, ow))
    for i in range(kh):
        for j in range(kw):
            r0, c0 = i * dilations[0], j * dilations[1]
            patch = xp[:, :, r0 : r0 + strides[0] * (oh - 1) + 1 : strides[0],
                       c0 : c0 + strides[1] * (ow - 1) + 1 : strides[1]]
            y += np.einsum("oc,nchw->nohw", w[:, :, i, j], patch)
    return y


def _conv1d_reference(x, w, stride=1, pads=(0, 0), dilation=1):
    """1-D conv as a 2-D conv of height 1."""
    y = _conv2d_reference(x[:, :, None], w[:, :, None], (1, stride), (0, pads[0], 0, pads[1]),
                          (1, dilation))
    return y[:, :, 0]


CONV_CASES = [  # strides, pads (t, l, b, r), dilations
    ((1, 1), (1, 1, 1, 1), (1, 1)),
    ((2, 1), (0, 2, 1, 0), (1, 2)),
    ((1, 3), (2, 0, 0, 1), (2, 1)),
]


# --------------------------------------------------------------------------- factors
def test_reference_conv_matches_scipy_correlate():
    rng = _rng(1)
    x = rng.standard_normal((1, 3, 9, 10))
    w = rng.standard_normal((2, 3, 3, 2))
    strides, pads, dil = (2, 3), (1, 0, 2, 1), (2, 1)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 2), (0, 1)))
    wd = np.zeros((2, 3, 5, 2))
    wd[:, :, ::2, :] = w  # dilation (2, 1) as a kernel with holes
    for o in range(2):
        full = sum(scipy.signal.correlate(xp[0, c], wd[o, c], mode="valid") for c in range(3))
        ref = _conv2d_reference(x, w, strides, pads, dil)[0, o]
        np.testing.assert_allclose(ref, full[::2, ::3], rtol=1e-12, atol=1e-12)


def test_lowrank_factors_properties():
    rng = _rng()
    U, V = rng.standard_normal((7, 3)), rng.standard_normal((3, 5))
    f = LowRankFactors(U, V)
    assert (f.rank, f.shape, f.n_params) == (3, (7, 5), 36)
    np.testing.assert_array_equal(f.to_dense(), U @ V)
    with pytest.raises(ValueError, match="inner dimensions"):
        LowRankFactors(U, V.T)
    with pytest.raises(ValueError, match="2-D"):
        LowRankFactors(U.ravel(), V)


def test_tucker2_factors_properties():
    rng = _rng()
    t = Tucker2Factors(U_in=rng.standard_normal((4, 2)), core=rng.standard_normal((3, 2, 3, 3)),
                       U_out=rng.standard_normal((5, 3)))
    assert t.ranks == (2, 3) and t.shape == (5, 4, 3, 3) and t.kernel_shape == (3, 3)
    assert t.n_params == 8 + 54 + 15
    dense = np.zeros(t.shape)
    for o, i, b, a in np.ndindex(5, 4, 3, 2):
        dense[o, i] += t.U_out[o, b] * t.core[b, a] * t.U_in[i, a]
    np.testing.assert_allclose(t.to_dense(), dense, rtol=1e-12)
    with pytest.raises(ValueError, match="does not match ranks"):
        Tucker2Factors(U_in=t.U_in, core=t.core[:, :1], U_out=t.U_out)


# --------------------------------------------------------------------------- svd
def test_truncated_svd_eckart_young_error_and_balance():
    W = _rng().standard_normal((9, 6))
    s = np.linalg.svd(W, compute_uv=False)
    for r in range(7):
        f = truncated_svd(W, r)
        assert f.shape == (9, 6) and f.rank == r
        err = np.linalg.norm(W - f.to_dense())
        assert err == pytest.approx(np.sqrt(np.sum(s[r:] ** 2)), rel=1e-10, abs=1e-12)
        np.testing.assert_allclose(np.linalg.norm(f.U, axis=0), np.sqrt(s[:r]), rtol=1e-10)
        np.testing.assert_allclose(np.linalg.norm(f.V, axis=1), np.sqrt(s[:r]), rtol=1e-10)
    assert _rel(truncated_svd(W, 6).to_dense(), W) < 1e-13
    np.testing.assert_array_equal(truncated_svd(W, 0).to_dense(), np.zeros((9, 6)))


@pytest.mark.parametrize("bad", [7, -1, 2.0, True])
def test_truncated_svd_rejects_bad_rank(bad):
    with pytest.raises(ValueError, match="rank"):
        truncated_svd(np.ones((6, 9)), bad)


def test_svd_rejects_bad_matrix():
    with pytest.raises(ValueError, match="2-D"):
        truncated_svd(np.ones(5), 1)
    with pytest.raises(ValueError, match="NaN"):
        singular_values(np.array([[1.0, np.nan]]))


def test_randomized_svd_exact_on_low_rank_and_close_to_exact():
    rng = _rng(3)
    low = rng.standard_normal((150, 5)) @ rng.standard_normal((5, 90))
    assert _rel(randomized_svd(low, 5).to_dense(), low) < 1e-10
    noisy = low + 1e-2 * rng.standard_normal(low.shape)
    exact_err = np.linalg.norm(noisy - truncated_svd(noisy, 5).to_dense())
    approx_err = np.linalg.norm(noisy - randomized_svd(noisy, 5).to_dense())
    assert exact_err * (1 - 1e-12) <= approx_err <= exact_err * (1 + 1e-6)


def test_randomized_svd_is_seeded():
    W = _rng(4).standard_normal((40, 30))
    a, b = randomized_svd(W, 4, seed=7), randomized_svd(W, 4, seed=7)
    np.testing.assert_array_equal(a.U, b.U)
    np.testing.assert_array_equal(a.V, b.V)
    c = randomized_svd(W, 4, n_iter=0, seed=8)
    assert not np.array_equal(a.to_dense(), c.to_dense())
    assert randomized_svd(W, 0).to_dense().shape == (40, 30)
    with pytest.raises(ValueError, match="oversample"):
        randomized_svd(W, 4, oversample=-1)


def test_singular_values():
    W = _rng().standard_normal((5, 8))
    np.testing.assert_allclose(singular_values(W), np.linalg.svd(W, compute_uv=False), rtol=1e-12)


def test_rank_for_energy_edges():
    s = np.array([3.0, 4.0])  # sorted internally: 16 + 9 = 25
    assert rank_for_energy(s, 0.64) == 1
    assert rank_for_energy(s, 0.65) == 2
    assert rank_for_energy(s, 1.0) == 2
    assert rank_for_energy(s, 1e-12) == 1
    assert rank_for_energy(np.array([2.0, 1.0, 0.0, 0.0]), 1.0) == 2
    assert rank_for_energy(np.zeros(3), 0.5) == 0
    assert rank_for_energy(np.array([]), 1.0) == 0
    σ = np.linalg.svd(_rng().standard_normal((30, 20)), compute_uv=False)
    for e in (0.3, 0.9, 0.99):
        r = rank_for_energy(σ, e)
        assert np.sum(σ[:r] ** 2) >= e * np.sum(σ**2) > np.sum(σ[: r - 1] ** 2)


@pytest.mark.parametrize("s, e", [([1.0], 0.0), ([1.0], 1.5), ([-1.0], 0.5), ([[1.0]], 0.5)])
def test_rank_for_energy_rejects(s, e):
    with pytest.raises(ValueError):
        rank_for_energy(np.array(s), e)


# --------------------------------------------------------------------------- whitened
def test_whitened_svd_exact_at_full_rank_and_balanced():
    X = _correlated_data()
    W = _rng(1).standard_normal((12, 7))
    f = whitened_svd(W, X.T @ X, 7)
    assert _rel(f.to_dense(), W) < 1e-10
    g = whitened_svd(W, X.T @ X, 3)
    np.testing.assert_allclose(np.linalg.norm(g.U, axis=0), np.linalg.norm(g.V, axis=1), rtol=1e-12)


def test_whitened_svd_never_worse_than_truncated_svd():
    X = _correlated_data()
    G = X.T @ X
    W = _rng(2).standard_normal((12, 9))
    gains = []
    for r in range(1, 9):
        plain = _objective(X, W, truncated_svd(W, r).to_dense())
        exact = _objective(X, W, whitened_svd(W, G, r, ridge=0.0).to_dense())
        ridged = _objective(X, W, whitened_svd(W, G, r).to_dense())
        assert exact <= plain * (1 + 1e-12)
        assert ridged <= plain * (1 + 1e-6)
        gains.append(plain / exact)
    assert max(gains) > 3.0  # the data matters on this spectrum


def test_whitened_svd_is_the_optimum():
    X = _correlated_data(n=60, d=5, seed=5)
    W = _rng(6).standard_normal((5, 4))
    r = 2
    best = _objective(X, W, whitened_svd(W, X.T @ X, r, ridge=0.0).to_dense())
    # Independent closed form: X A* = [X W]_r, and X has full column rank.
    closed = _objective(X, W, np.linalg.pinv(X) @ _best_rank_r(X @ W, r))
    assert best == pytest.approx(closed, rel=1e-10)

    def loss(z):
        U, V = z[:10].reshape(5, 2), z[10:].reshape(2, 4)
        R = X @ (U @ V - W)
        return np.sum(R**2), np.concatenate([(X.T @ R @ V.T).ravel(), (U.T @ X.T @ R).ravel()]) * 2

    found = [scipy.optimize.minimize(loss, _rng(s).standard_normal(18), jac=True,
                                     method="BFGS", options={"gtol": 1e-10}).fun
             for s in range(6)]
    assert min(found) >= best**2 * (1 - 1e-9)
    assert min(found) == pytest.approx(best**2, rel=1e-6)


def test_whitened_svd_rank_deficient_gram():
    X = _correlated_data(n=80, d=8, seed=7)
    X[:, 2] = 0.0  # dead input
    X[:, 5] = X[:, 4]  # duplicated input
    G = X.T @ X
    W = _rng(8).standard_normal((8, 6))
    assert whitening(G, ridge=0.0).eigvals is not None  # Cholesky failed, eigen fallback
    assert whitening(G).eigvals is None
    for r in (1, 3, 5):
        A = whitened_svd(W, G, r, ridge=0.0).to_dense()
        assert np.all(np.isfinite(A))
        closed = _objective(X, W, np.linalg.pinv(X) @ _best_rank_r(X @ W, r))
        assert _objective(X, W, A) == pytest.approx(closed, rel=1e-7)
        assert np.all(np.isfinite(whitened_svd(W, G, r).to_dense()))
    assert data_error(W, whitened_svd(W, G, 6, ridge=0.0).to_dense(), G) < 1e-7


def test_whitened_svd_degenerate_grams():
    W = _rng(9).standard_normal((6, 4))
    plain = truncated_svd(W, 2).to_dense()
    for ridge in (0.0, 1e-6):
        np.testing.assert_allclose(whitened_svd(W, np.zeros((6, 6)), 2, ridge).to_dense(), plain,
                                   rtol=1e-10, atol=1e-12)
    X = _correlated_data(n=50, d=6)
    a = whitened_svd(W, X.T @ X, 2).to_dense()
    np.testing.assert_allclose(whitened_svd(W, 1e6 * X.T @ X, 2).to_dense(), a, rtol=1e-9)


def test_whitened_svd_rejects_bad_arguments():
    W, G = np.ones((4, 3)), np.eye(4)
    with pytest.raises(ValueError, match="gram must have shape"):
        whitened_svd(W, np.eye(3), 1)
    with pytest.raises(ValueError, match="NaN"):
        whitened_svd(W, np.full((4, 4), np.nan), 1)
    with pytest.raises(ValueError, match="ridge"):
        whitened_svd(W, G, 1, ridge=-1.0)
    with pytest.raises(ValueError, match="rank"):
        whitened_svd(W, G, 4)


def test_sequential_target_recovers_the_optimum():
    rng = _rng(10)
    X = _correlated_data(n=300, d=10, seed=11)
    X_hat = X + 0.2 * rng.standard_normal(X.shape) * X.std(axis=0)  # a compressed model's input
    W = rng.standard_normal((10, 7))
    t = sequential_target(W, X_hat.T @ X_hat, X_hat.T @ X, ridge=0.0)
    np.testing.assert_allclose(t.W_star, np.linalg.lstsq(X_hat, X @ W, rcond=None)[0], rtol=1e-9)
    proj = X_hat @ np.linalg.pinv(X_hat)
    for r in (2, 5):
        A = whitened_svd(t.W_star, X_hat.T @ X_hat, r, ridge=0.0).to_dense()
        closed = np.linalg.pinv(X_hat) @ _best_rank_r(proj @ X @ W, r)
        got = np.linalg.norm(X @ W - X_hat @ A)
        assert got == pytest.approx(np.linalg.norm(X @ W - X_hat @ closed), rel=1e-10)
        naive = whitened_svd(W, X_hat.T @ X_hat, r, ridge=0.0).to_dense()
        assert got < np.linalg.norm(X @ W - X_hat @ naive)


def test_sequential_target_with_ridge():
    X = _correlated_data(n=200, d=9, seed=12)
    G = X.T @ X
    W = _rng(13).standard_normal((9, 5))
    W_star, gram_reg = sequential_target(W, G, G)
    assert _rel(W_star, W) < 1e-10  # X_hat = X: nothing to compensate
    X_hat = X * 1.1 + 0.05
    t = sequential_target(W, X_hat.T @ X_hat, X_hat.T @ X)
    a = whitened_svd(t.W_star, X_hat.T @ X_hat, 3).to_dense()
    b = whitened_svd(t.W_star, t.gram_hat_reg, 3, ridge=0.0).to_dense()
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="cross must have shape"):
        sequential_target(W, G, G[:, :4])


def test_data_error_and_bias_correction():
    rng = _rng(14)
    X = _correlated_data(n=100, d=6) + rng.standard_normal(6)
    W = rng.standard_normal((6, 4))
    A = truncated_svd(W, 2).to_dense()
    G = X.T @ X
    assert data_error(W, A, G) == pytest.approx(_rel(X @ A, X @ W), rel=1e-10)
    assert data_error(W, W, G) == 0.0
    e0 = np.zeros((6, 6))
    e0[0, 0] = 1.0
    W0 = W.copy()
    W0[0] = 0.0
    assert data_error(W0, W, e0) == float("inf")
    c = bias_correction(W, A, X.mean(axis=0))
    np.testing.assert_allclose((X @ A + c).mean(axis=0), (X @ W).mean(axis=0), rtol=1e-10)
    with pytest.raises(ValueError, match="mean_x"):
        bias_correction(W, A, np.zeros(4))
    with pytest.raises(ValueError, match="W_approx"):
        data_error(W, A.T, G)


# --------------------------------------------------------------------------- conv
@pytest.mark.parametrize("shape", [(5, 3, 2, 4), (5, 3, 3), (4, 2, 1, 1)])
def test_conv_matrix_round_trip_and_order(shape):
    W = _rng().standard_normal(shape)
    M = conv_to_matrix(W)
    assert M.shape == (shape[1] * int(np.prod(shape[2:])), shape[0])
    for o, c, *k in np.ndindex(*shape):
        row = c * int(np.prod(shape[2:])) + int(np.ravel_multi_index(k, shape[2:]))
        assert M[row, o] == W[(o, c, *k)]
    np.testing.assert_array_equal(matrix_to_conv(M, shape[1], shape[2:]), W)
    with pytest.raises(ValueError, match="Cin"):
        matrix_to_conv(M, shape[1] + 1, shape[2:])


def test_spatial_matrix_round_trip():
    W = _rng().standard_normal((5, 3, 2, 4))
    M = spatial_matrix(W)
    assert M.shape == (6, 20) and M[1 * 2 + 1, 4 * 4 + 3] == W[4, 1, 1, 3]
    np.testing.assert_array_equal(spatial_matrix_to_conv(M, 5, 3, 2, 4), W)
    with pytest.raises(ValueError, match="2-D conv"):
        spatial_matrix(W[..., 0])


@pytest.mark.parametrize("strides, pads, dilations", CONV_CASES)
def test_channel_convs_equal_dense_conv(strides, pads, dilations):
    rng = _rng(20)
    W = rng.standard_normal((6, 4, 3, 2))
    x = rng.standard_normal((2, 4, 9, 8))
    for r in (3, 6):
        f = truncated_svd(conv_to_matrix(W), r)
        w1, w2 = channel_factors_to_convs(f, 4, (3, 2))
        assert w1.shape == (r, 4, 3, 2) and w2.shape == (6, r, 1, 1)
        chain = _conv2d_reference(_conv2d_reference(x, w1, strides, pads, dilations), w2)
        dense = matrix_to_conv(f.to_dense(), 4, (3, 2))
        np.testing.assert_allclose(chain, _conv2d_reference(x, dense, strides, pads, dilations),
                                   rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(chain, _conv2d_reference(x, W, strides, pads, dilations),
                               rtol=1e-10, atol=1e-10)


def test_channel_convs_1d():
    rng = _rng(21)
    W = rng.standard_normal((5, 3, 4))
    x = rng.standard_normal((2, 3, 15))
    w1, w2 = channel_factors_to_convs(truncated_svd(conv_to_matrix(W), 5), 3, (4,))
    assert w2.shape == (5, 5, 1)
    chain = _conv1d_reference(_conv1d_reference(x, w1, 2, (1, 2), 2), w2)
    np.testing.assert_allclose(chain, _conv1d_reference(x, W, 2, (1, 2), 2), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("strides, pads, dilations", CONV_CASES)
def test_spatial_convs_equal_dense_conv(strides, pads, dilations):
    rng = _rng(22)
    W = rng.standard_normal((6, 4, 3, 2))
    x = rng.standard_normal((2, 4, 9, 8))
    (sh, sw), (pt, pl, pb, pr), (dh, dw) = strides, pads, dilations
    for r in (2, 12):
        f = truncated_svd(spatial_matrix(W), r)
        w1, w2 = spatial_factors_to_convs(f, 6, 4, 3, 2)
        assert w1.shape == (r, 4, 3, 1) and w2.shape == (6, r, 1, 2)
        mid = _conv2d_reference(x, w1, (sh, 1), (pt, 0, pb, 0), (dh, 1))
        chain = _conv2d_reference(mid, w2, (1, sw), (0, pl, 0, pr), (1, dw))
        dense = spatial_matrix_to_conv(f.to_dense(), 6, 4, 3, 2)
        np.testing.assert_allclose(chain, _conv2d_reference(x, dense, strides, pads, dilations),
                                   rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(chain, _conv2d_reference(x, W, strides, pads, dilations),
                               rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="factors must be"):
        spatial_factors_to_convs(f, 4, 6, 3, 2)


def _tucker_core(W, U_in, U_out):
    return np.einsum("oi...,ob,ia->ba...", W, U_out, U_in)


def test_tucker2_exact_at_full_rank_and_orthonormal():
    W = _rng(23).standard_normal((6, 5, 3, 3))
    t = tucker2(W, 5, 6)
    assert _rel(t.to_dense(), W) < 1e-12
    t = tucker2(W, 3, 4)
    np.testing.assert_allclose(t.U_in.T @ t.U_in, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(t.U_out.T @ t.U_out, np.eye(4), atol=1e-12)
    np.testing.assert_allclose(t.core, _tucker_core(W, t.U_in, t.U_out), rtol=1e-12, atol=1e-12)


def test_tucker2_recovers_low_multilinear_rank_and_hooi_helps():
    rng = _rng(24)
    low = Tucker2Factors(U_in=rng.standard_normal((8, 3)), core=rng.standard_normal((2, 3, 3)),
                         U_out=rng.standard_normal((7, 2))).to_dense()
    assert _rel(tucker2(low, 3, 2).to_dense(), low) < 1e-12
    W = rng.standard_normal((12, 10, 3, 3))
    errs = [np.linalg.norm(W - tucker2(W, 4, 5, n_iter=n).to_dense()) for n in (0, 1, 10)]
    assert errs[2] <= errs[1] <= errs[0]
    assert errs[2] < errs[0] * (1 - 1e-6)


@pytest.mark.parametrize("strides, pads, dilations", CONV_CASES)
def test_tucker2_convs_equal_dense_conv(strides, pads, dilations):
    rng = _rng(25)
    W = rng.standard_normal((6, 5, 3, 2))
    x = rng.standard_normal((2, 5, 9, 8))
    for ranks in ((2, 3), (5, 6)):
        t = tucker2(W, *ranks)
        w1, w2, w3 = tucker2_to_convs(t)
        assert w1.shape == (ranks[0], 5, 1, 1) and w2.shape == (ranks[1], ranks[0], 3, 2)
        assert w3.shape == (6, ranks[1], 1, 1)
        chain = _conv2d_reference(_conv2d_reference(_conv2d_reference(x, w1), w2, strides, pads,
                                                    dilations), w3)
        np.testing.assert_allclose(chain, _conv2d_reference(x, t.to_dense(), strides, pads,
                                                            dilations), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(chain, _conv2d_reference(x, W, strides, pads, dilations),
                               rtol=1e-10, atol=1e-10)


def test_tucker2_1d_convs():
    rng = _rng(26)
    W = rng.standard_normal((6, 4, 3))
    x = rng.standard_normal((2, 4, 11))
    t = tucker2(W, 2, 3)
    w1, w2, w3 = tucker2_to_convs(t)
    assert w1.shape == (2, 4, 1) and w3.shape == (6, 3, 1)
    chain = _conv1d_reference(_conv1d_reference(_conv1d_reference(x, w1), w2, 2, (1, 1), 2), w3)
    np.testing.assert_allclose(chain, _conv1d_reference(x, t.to_dense(), 2, (1, 1), 2),
                               rtol=1e-10, atol=1e-10)


def _channel_objective(W, A, gram):
    D = (W - A).reshape(W.shape[0], W.shape[1], -1)
    return np.einsum("oik,ij,ojk->", D, gram, D)


def test_tucker2_whitened():
    rng = _rng(27)
    W = rng.standard_normal((8, 6, 3, 3))
    X = _correlated_data(n=200, d=6, seed=28)
    G = X.T @ X
    assert _rel(tucker2_whitened(W, G, 6, 8).to_dense(), W) < 1e-10
    plain = _channel_objective(W, tucker2(W, 2, 4).to_dense(), G)
    aware = _channel_objective(W, tucker2_whitened(W, G, 2, 4, ridge=0.0).to_dense(), G)
    assert aware < 0.5 * plain
    np.testing.assert_allclose(tucker2_whitened(W, 3.0 * np.eye(6), 3, 4).to_dense(),
                               tucker2(W, 3, 4).to_dense(), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="gram_in_channels"):
        tucker2_whitened(W, np.eye(8), 3, 4)


@pytest.mark.parametrize("ranks", [(0, 2), (7, 2), (2, 9), (2.5, 2)])
def test_tucker2_rejects_bad_ranks(ranks):
    with pytest.raises(ValueError, match="rank_"):
        tucker2(np.ones((8, 6, 3, 3)), *ranks)


def test_tucker2_rejects_bad_weight_and_iterations():
    with pytest.raises(ValueError, match="Cout, Cin"):
        tucker2(np.ones((8, 6)), 2, 2)
    with pytest.raises(ValueError, match="n_iter"):
        tucker2(np.ones((8, 6, 3)), 2, 2, n_iter=-1)
