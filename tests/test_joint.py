"""Joint decompositions (JMD): shared factors recover planted shared subspaces, beat separate
fits at equal parameters when the subspace is shared, and count shared parameters once."""
import numpy as np
import pytest

from onnx_lrsd.decompose import data_error, whitened_svd
from onnx_lrsd.decompose.joint import joint_fit, joint_ranks


def grams(k, n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(k):
        x = rng.standard_normal((400, n)) @ rng.standard_normal((n, n)) * rng.uniform(0.5, 3)
        out.append(x.T @ x)
    return out


def relative_errors(fit, ws, gs):
    return [data_error(w, fit.to_dense(i), g) for i, (w, g) in enumerate(zip(ws, gs))]


def test_rjmd_recovers_a_shared_output_subspace_exactly():
    rng = np.random.default_rng(1)
    v0 = rng.standard_normal((6, 20))
    ws = [rng.standard_normal((16, 6)) @ v0 for _ in range(4)]
    gs = grams(4, 16)
    fit = joint_fit(ws, gs, "right", (0, 6), ridge=0.0)
    assert max(relative_errors(fit, ws, gs)) < 1e-10
    assert fit.V.shape == (6, 20) and len(fit.U_own) == 4
    assert fit.n_params == 6 * 20 + 4 * 16 * 6


def test_ljmd_recovers_a_shared_input_subspace_with_different_grams():
    rng = np.random.default_rng(2)
    u0 = rng.standard_normal((16, 5))
    ws = [u0 @ rng.standard_normal((5, 12)) for _ in range(3)]
    gs = grams(3, 16, seed=3)
    fit = joint_fit(ws, gs, "left", (5, 0), ridge=0.0)
    assert max(relative_errors(fit, ws, gs)) < 1e-6
    assert fit.n_params == 16 * 5 + 3 * 5 * 12


@pytest.mark.parametrize("side", ["left", "right"])
def test_joint_beats_separate_fits_at_equal_params_on_a_shared_subspace(side):
    rng = np.random.default_rng(4)
    n = 24
    base_u, base_v = rng.standard_normal((n, 10)), rng.standard_normal((10, n))
    ws = [base_u @ rng.standard_normal((10, 10)) @ base_v + 0.05 * rng.standard_normal((n, n)) for _ in range(6)]
    gs = grams(6, n, seed=5)
    budget = 6 * 6 * (2 * n)  # what separate rank-6 fits cost
    ranks = joint_ranks(side, [w.shape for w in ws], budget)
    fit = joint_fit(ws, gs, side, ranks)
    assert fit.n_params <= budget
    separate = [data_error(w, whitened_svd(w, g, 6).to_dense(), g) for w, g in zip(ws, gs)]
    assert np.mean(relative_errors(fit, ws, gs)) < 0.7 * np.mean(separate)


def test_bjmd_recovers_a_shared_left_plus_shared_right_structure():
    rng = np.random.default_rng(6)
    u0, v0 = rng.standard_normal((16, 3)), rng.standard_normal((3, 14))
    ws = [u0 @ rng.standard_normal((3, 14)) + rng.standard_normal((16, 3)) @ v0 for _ in range(4)]
    gs = grams(4, 16, seed=7)
    fit = joint_fit(ws, gs, "both", (3, 3), ridge=0.0)
    assert max(relative_errors(fit, ws, gs)) < 1e-3
    assert len(fit.terms(0)) == 2


def test_joint_ranks_count_shared_factors_once():
    shapes = [(384, 384)] * 6
    assert joint_ranks("right", shapes, 6 * 384 * 100 + 384 * 100) == (0, 100)
    assert joint_ranks("left", shapes, 384 * 50 + 6 * 50 * 384) == (50, 0)
    r_left, r_right = joint_ranks("both", shapes, 700 * 384 * 7)
    assert r_left == r_right == (700 * 384 * 7 // 2) // (7 * 384)


@pytest.mark.parametrize("ws, side, ranks, message", [
    ([np.ones((4, 3))], "right", (0, 2), "at least two"),
    ([np.ones((4, 3)), np.ones((4, 5))], "right", (0, 2), "output size"),
    ([np.ones((4, 3)), np.ones((4, 3))], "up", (1, 1), "needs positive ranks"),
    ([np.ones((4, 3)), np.ones((4, 3))], "left", (0, 0), "needs positive ranks"),
])
def test_joint_fit_validates(ws, side, ranks, message):
    with pytest.raises(ValueError, match=message):
        joint_fit(ws, None, side, ranks)
