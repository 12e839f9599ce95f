"""Low rank + sparse (LRSD / CMD): recovery on planted data, optimality, budgets, BRP, splits."""
import numpy as np
import pytest

from onnx_lrsd.decompose import (
    LowRankFactors,
    LowRankSparse,
    SparseResidual,
    best_split,
    data_error,
    lrsd_fit,
    split_budget,
    whitened_svd,
)
from onnx_lrsd.decompose import lrsd as lrsd_module


def _rng(seed=0):
    return np.random.default_rng(seed)


def _rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _correlated_data(n_in, n=None, seed=1):
    """Activations with correlated columns and scales spread over a decade."""
    rng = _rng(seed)
    mix = rng.standard_normal((n_in, n_in)) * np.logspace(0, -1, n_in)[:, None]
    return rng.standard_normal((n or 4 * n_in, n_in)) @ mix


def _gram(kind, n_in):
    if kind == "identity":
        return np.eye(n_in)
    X = _correlated_data(n_in)
    return X.T @ X


def _objective(W, approx, G, ridge):
    """‖X(W − A)‖² + μ‖W − A‖², μ = ridge·tr G/in, written independently of the package."""
    d = W - approx
    return float(np.trace(d.T @ G @ d) + ridge * np.trace(G) / G.shape[0] * np.sum(d * d))


def _support(fit):
    dense = np.zeros(fit.shape, dtype=bool)
    if fit.sparse.structure == "rows":
        dense[fit.sparse.rows] = True
    else:
        dense[fit.sparse.indices[:, 0], fit.sparse.indices[:, 1]] = True
    return dense


def _f1(found, truth):
    tp = np.sum(found & truth)
    return 2 * tp / (found.sum() + truth.sum())


def _planted(structure, n_in=60, n_out=40, rank=4, k=5, nnz=100, seed=0):
    """W = L0 + S0: L0 of rank ``rank``, S0 on k whole rows or on nnz scattered entries."""
    rng = _rng(seed)
    L0 = rng.standard_normal((n_in, rank)) @ rng.standard_normal((rank, n_out))
    S0 = np.zeros((n_in, n_out))
    if structure == "rows":
        rows = rng.choice(n_in, k, replace=False)
        S0[rows] = 5 * rng.standard_normal((k, n_out))
        budget = k * n_out
    else:
        S0.ravel()[rng.choice(n_in * n_out, nnz, replace=False)] = 10 * rng.standard_normal(nnz)
        budget = nnz
    return L0, S0, budget


def _heavy_rows_case(n_in=192, n_out=64, n_heavy=8, boost=10.0, seed=0):
    """A realistic weight: slowly decaying spectrum plus a few input rows ~10× heavier."""
    rng = _rng(seed)
    m = min(n_in, n_out)
    p = np.linalg.qr(rng.standard_normal((n_in, m)))[0]
    q = np.linalg.qr(rng.standard_normal((n_out, m)))[0]
    W = (p / (1 + np.arange(m) / 4)) @ q.T
    typical = np.linalg.norm(W, axis=1).mean()
    heavy = np.sort(rng.choice(n_in, n_heavy, replace=False))
    W[heavy] += boost * typical * rng.standard_normal((n_heavy, n_out)) / np.sqrt(n_out)
    X = _correlated_data(n_in, seed=seed + 1)
    return W, X.T @ X, heavy


# --------------------------------------------------------------------------- typed results
def test_sparse_residual_rows():
    rng = _rng()
    values = rng.standard_normal((3, 4))
    s = SparseResidual.from_rows(np.array([5, 1, 3]), values)
    assert s.structure == "rows" and s.indices is None
    np.testing.assert_array_equal(s.rows, [1, 3, 5])  # sorted, values permuted with them
    np.testing.assert_array_equal(s.values, values[[1, 2, 0]])
    assert s.n_params == s.nnz == 12
    dense = s.to_dense((7, 4))
    expected = np.zeros((7, 4))
    expected[[5, 1, 3]] = values
    np.testing.assert_array_equal(dense, expected)
    x = rng.standard_normal((2, 7))
    np.testing.assert_allclose(s.apply(x), x @ dense, rtol=1e-12)
    with pytest.raises(ValueError, match="does not fit"):
        s.to_dense((5, 4))
    with pytest.raises(ValueError, match="does not fit"):
        s.to_dense((7, 3))
    with pytest.raises(ValueError, match="unique"):
        SparseResidual.from_rows(np.array([1, 1]), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="shape"):
        SparseResidual.from_rows(np.array([1, 2]), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="integer"):
        SparseResidual.from_rows(np.array([1.0]), np.zeros((1, 4)))
    with pytest.raises(ValueError, match="NaN"):
        SparseResidual.from_rows(np.array([1]), np.full((1, 4), np.nan))
    empty = SparseResidual.empty("rows", 4)
    assert empty.n_params == 0 and not empty.to_dense((3, 4)).any()


def test_sparse_residual_unstructured():
    rng = _rng()
    idx = np.array([[2, 1], [0, 3], [2, 0]])
    vals = np.array([1.0, 2.0, 3.0])
    s = SparseResidual.from_entries(idx, vals)
    assert s.structure == "unstructured" and s.rows is None and s.n_params == 3
    np.testing.assert_array_equal(s.indices, [[0, 3], [2, 0], [2, 1]])  # row-major order
    np.testing.assert_array_equal(s.values, [2.0, 3.0, 1.0])
    dense = s.to_dense((3, 4))
    assert dense[2, 1] == 1.0 and dense[0, 3] == 2.0 and dense[2, 0] == 3.0 and dense.sum() == 6
    x = rng.standard_normal((5, 3))
    np.testing.assert_allclose(s.apply(x, out_dim=4), x @ dense, rtol=1e-12)
    with pytest.raises(ValueError, match="out_dim"):
        s.apply(x)
    with pytest.raises(ValueError, match="fit"):
        s.to_dense((2, 4))
    with pytest.raises(ValueError, match="unique"):
        SparseResidual.from_entries(np.array([[1, 1], [1, 1]]), np.ones(2))
    with pytest.raises(ValueError, match="structure"):
        SparseResidual.empty("blocks", 3)
    with pytest.raises(ValueError, match="needs"):
        SparseResidual("unstructured", np.zeros(0), rows=np.zeros(0, int))
    assert SparseResidual.empty("unstructured", 3).to_dense((2, 3)).sum() == 0


def test_low_rank_sparse_properties():
    rng = _rng()
    f = LowRankFactors(rng.standard_normal((6, 2)), rng.standard_normal((2, 5)))
    s = SparseResidual.from_rows(np.array([0, 4]), rng.standard_normal((2, 5)))
    lrs = LowRankSparse(f, s)
    assert lrs.shape == (6, 5) and lrs.rank == 2 and lrs.structure == "rows"
    assert lrs.n_params == 2 * 11 + 10 and lrs.history == ()
    np.testing.assert_allclose(lrs.to_dense(), f.to_dense() + s.to_dense((6, 5)), rtol=1e-15)
    with pytest.raises(ValueError, match="does not fit"):
        LowRankSparse(f, SparseResidual.from_rows(np.array([6]), np.zeros((1, 5))))


# --------------------------------------------------------------------------- planted recovery
@pytest.mark.parametrize("gram_kind", ["identity", "correlated"])
def test_rows_recovers_planted_low_rank_plus_rows(gram_kind):
    L0, S0, budget = _planted("rows")
    W = L0 + S0
    G = _gram(gram_kind, W.shape[0])
    fit = lrsd_fit(W, G, 4, budget, structure="rows")
    truth = np.zeros(W.shape, dtype=bool)
    truth[np.any(S0 != 0, axis=1)] = True
    assert _f1(_support(fit), truth) >= 0.9
    assert _rel(fit.to_dense(), W) <= 1e-3
    # L is identified off the freed rows (on them, any L is matched by S)
    off = np.setdiff1d(np.arange(W.shape[0]), fit.sparse.rows)
    assert _rel(fit.low_rank.to_dense()[off], L0[off]) <= 1e-3
    assert fit.n_params <= 4 * sum(W.shape) + budget


@pytest.mark.parametrize("gram_kind", ["identity", "correlated"])
def test_unstructured_recovers_planted_low_rank_plus_entries(gram_kind):
    L0, S0, budget = _planted("unstructured")
    W = L0 + S0
    G = _gram(gram_kind, W.shape[0])
    fit = lrsd_fit(W, G, 4, budget, structure="unstructured", n_iter=60)
    assert _f1(_support(fit), S0 != 0) >= 0.9
    assert _rel(fit.to_dense(), W) <= 1e-3
    assert _rel(fit.low_rank.to_dense(), L0) <= 1e-3
    assert _rel(fit.sparse.to_dense(W.shape), S0) <= 1e-3
    assert fit.sparse.n_params <= budget and fit.rank == 4


@pytest.mark.parametrize("structure", ["rows", "unstructured"])
@pytest.mark.parametrize("l_step", ["exact", "brp"])
def test_objective_history_is_monotone_and_matches(structure, l_step):
    W, G, _ = _heavy_rows_case(96, 48, seed=3)
    rank, budget = split_budget(*W.shape, W.size // 3, 0.3, structure)
    fit = lrsd_fit(W, G, rank, budget, structure=structure, l_step=l_step, ridge=1e-3)
    h = np.array(fit.history)
    assert h.size >= 1 and np.all(np.diff(h) <= 1e-12 * h[0])
    assert h[-1] == pytest.approx(_objective(W, fit.to_dense(), G, 1e-3), rel=1e-8)
    if structure == "unstructured":
        assert h.size > 2 and h[-1] < h[0]


# --------------------------------------------------------------------------- special cases
@pytest.mark.parametrize("structure", ["rows", "unstructured"])
@pytest.mark.parametrize("gram_kind", ["identity", "correlated"])
def test_zero_sparse_budget_is_whitened_svd(structure, gram_kind):
    W = _rng(2).standard_normal((30, 20))
    G = _gram(gram_kind, 30)
    ref = whitened_svd(W, G, 5, ridge=1e-3)
    budgets = [0, 19] if structure == "rows" else [0]  # < out: no whole row fits
    for b in budgets:
        fit = lrsd_fit(W, G, 5, b, structure=structure, ridge=1e-3)
        np.testing.assert_array_equal(fit.low_rank.U, ref.U)
        np.testing.assert_array_equal(fit.low_rank.V, ref.V)
        assert fit.sparse.n_params == 0 and fit.sparse.structure == structure
        assert fit.history[0] == pytest.approx(_objective(W, ref.to_dense(), G, 1e-3), rel=1e-10)


def test_rank_zero_rows_is_pruning_with_exact_least_squares():
    rng = _rng(4)
    n_in, n_out, k, ridge = 40, 12, 4, 1e-3
    X = _correlated_data(n_in, n=200, seed=5)
    G = X.T @ X
    rows = np.sort(rng.choice(n_in, k, replace=False))
    W = 0.05 * rng.standard_normal((n_in, n_out))  # every row matters a little ...
    W[rows] += 3 * rng.standard_normal((k, n_out))  # ... these a lot
    fit = lrsd_fit(W, G, 0, k * n_out + n_out - 1, structure="rows", ridge=ridge)
    assert fit.rank == 0 and fit.low_rank.shape == (n_in, n_out)
    np.testing.assert_array_equal(fit.sparse.rows, rows)
    # brute force: min ‖[X; √μ I](W − S)‖ over S supported on the chosen rows
    mu = ridge * np.trace(G) / n_in
    A = np.vstack([X, np.sqrt(mu) * np.eye(n_in)])
    values = np.linalg.lstsq(A[:, rows], A @ W, rcond=None)[0]
    np.testing.assert_allclose(fit.sparse.values, values, rtol=1e-8, atol=1e-10)
    assert fit.n_params == k * n_out


def test_rank_zero_rows_greedy_matches_exhaustive_search_on_small_problem():
    from itertools import combinations

    rng = _rng(6)
    n_in, n_out, k, ridge = 8, 5, 2, 1e-3
    X = _correlated_data(n_in, n=30, seed=7)
    G = X.T @ X
    W = rng.standard_normal((n_in, n_out))
    fit = lrsd_fit(W, G, 0, k * n_out, structure="rows", ridge=ridge)
    mu = ridge * np.trace(G) / n_in
    A = np.vstack([X, np.sqrt(mu) * np.eye(n_in)])

    def err(rows):
        rows = list(rows)
        vals = np.linalg.lstsq(A[:, rows], A @ W, rcond=None)[0]
        return np.linalg.norm(A @ W - A[:, rows] @ vals) ** 2

    best = min(err(c) for c in combinations(range(n_in), k))
    assert fit.history[-1] == pytest.approx(err(fit.sparse.rows), rel=1e-9)
    assert fit.history[-1] <= 1.05 * best  # greedy: near the exhaustive optimum


@pytest.mark.parametrize("gram_kind", ["identity", "correlated"])
def test_rank_zero_unstructured_keeps_largest_and_refits(gram_kind):
    rng = _rng(8)
    n_in, n_out, nnz = 20, 6, 15
    W = 0.01 * rng.standard_normal((n_in, n_out))
    W.ravel()[rng.choice(W.size, nnz, replace=False)] += 5 + rng.random(nnz)
    G = _gram(gram_kind, n_in)
    fit = lrsd_fit(W, G, 0, nnz, structure="unstructured", refit_steps=60)
    assert _f1(_support(fit), np.abs(W) > 1) == 1.0
    mu = 1e-3 * np.trace(G) / n_in
    sig = G + mu * np.eye(n_in)
    ref = np.zeros_like(W)  # per-column least squares on the support, in the Σ metric
    for j in range(n_out):
        p = np.flatnonzero(np.abs(W[:, j]) > 1)
        ref[p, j] = np.linalg.solve(sig[np.ix_(p, p)], (sig @ W[:, j])[p])
    np.testing.assert_allclose(fit.sparse.to_dense(W.shape), ref, rtol=1e-8, atol=1e-10)


def test_rank_zero_and_no_budget_gives_zero():
    W = _rng().standard_normal((5, 4))
    for structure in ("rows", "unstructured"):
        fit = lrsd_fit(W, None, 0, 0, structure=structure)
        assert fit.n_params == 0 and not fit.to_dense().any()


@pytest.mark.parametrize("structure", ["rows", "unstructured"])
def test_singular_gram_without_ridge(structure):
    """Dead inputs and ridge 0: whitening falls back to a floored eigendecomposition."""
    rng = _rng(14)
    X = _correlated_data(30, n=100, seed=15)
    X[:, [3, 17]] = 0.0  # two inputs never active
    G = X.T @ X
    W = rng.standard_normal((30, 12))
    rank, budget = split_budget(30, 12, 200, 0.3, structure)
    fit = lrsd_fit(W, G, rank, budget, structure=structure, ridge=0.0)
    h = np.array(fit.history)
    assert np.all(np.isfinite(fit.to_dense())) and np.all(np.diff(h) <= 1e-10 * h[0])
    assert fit.n_params <= 200
    assert data_error(W, fit.to_dense(), G) <= data_error(
        W, whitened_svd(W, G, rank, ridge=0.0).to_dense(), G) + 1e-9


def test_drop_cost_bounds_the_exact_rise():
    """The secular-equation cost of dropping a row bounds (and here matches) the re-fitted rise."""
    L0, S0, _ = _planted("rows", seed=3)
    W = L0 + S0
    prob = lrsd_module._Problem(W, _gram("correlated", W.shape[0]), 1e-3)
    lstep = lrsd_module._LowRankStep(4, "exact", 0, _rng())
    truth = np.flatnonzero(np.any(S0 != 0, axis=1))
    extra = np.setdiff1d([7, 40, 41, 42], truth)[:2]  # two needless rows
    Q = np.sort(np.concatenate([truth, extra]))
    state = lrsd_module._rows_joint(prob, lstep, Q, None)
    costs = lrsd_module._drop_costs(prob, state) * prob.scale
    for i, row in enumerate(Q):
        rise = lrsd_module._rows_joint(prob, lstep, Q[Q != row], None).f - state.f
        assert costs[i] >= rise - 1e-9 * prob.objective(prob.B)
    assert set(Q[np.argsort(costs)[:2]]) == set(extra)
    assert np.all(costs[np.isin(Q, extra)] <= 1e-9 * prob.objective(prob.B))


# --------------------------------------------------------------------------- BRP
@pytest.mark.parametrize("structure", ["rows", "unstructured"])
def test_brp_recovers_planted_and_is_close_to_exact(structure):
    L0, S0, budget = _planted(structure)
    W = L0 + S0
    G = _gram("correlated", W.shape[0])
    n_iter = 20 if structure == "rows" else 60
    fit = lrsd_fit(W, G, 4, budget, structure=structure, l_step="brp", n_iter=n_iter)
    assert _rel(fit.to_dense(), W) <= 1e-3

    W, G, _ = _heavy_rows_case(96, 48, seed=1)
    rank, b = split_budget(*W.shape, W.size // 3, 0.2, structure)
    exact = lrsd_fit(W, G, rank, b, structure=structure, l_step="exact")
    brp = lrsd_fit(W, G, rank, b, structure=structure, l_step="brp")
    e_exact = data_error(W, exact.to_dense(), G)
    e_brp = data_error(W, brp.to_dense(), G)
    assert e_brp <= 1.03 * e_exact
    assert brp.rank == rank and brp.n_params <= W.size // 3


def test_brp_is_seeded_and_auto_is_exact_on_small_layers():
    W, G, _ = _heavy_rows_case(60, 30, seed=2)
    a = lrsd_fit(W, G, 5, 90, l_step="brp", seed=3)
    b = lrsd_fit(W, G, 5, 90, l_step="brp", seed=3)
    np.testing.assert_array_equal(a.to_dense(), b.to_dense())
    auto = lrsd_fit(W, G, 5, 90)
    exact = lrsd_fit(W, G, 5, 90, l_step="exact")
    np.testing.assert_array_equal(auto.to_dense(), exact.to_dense())
    assert max(W.shape) <= lrsd_module.AUTO_EXACT_MAX_DIM


def test_brp_with_zero_budget_approaches_whitened_svd():
    W, G, _ = _heavy_rows_case(80, 40, seed=4)
    ref = data_error(W, whitened_svd(W, G, 6, ridge=1e-3).to_dense(), G)
    brp = lrsd_fit(W, G, 6, 0, l_step="brp", n_iter=30, tol=1e-10)
    assert ref <= data_error(W, brp.to_dense(), G) <= 1.01 * ref


# --------------------------------------------------------------------------- budgets
def test_split_budget_values():
    # rows: k = ⌊share·B/out⌋, sparse_budget = k·out; rank = ⌊(1 − share)·B/(in + out)⌋
    assert split_budget(100, 50, 3000, 0.0) == (20, 0)
    assert split_budget(100, 50, 3000, 0.5, "rows") == (10, 1500)
    assert split_budget(100, 50, 3000, 0.2, "rows") == (16, 600)
    assert split_budget(100, 50, 3000, 0.1, "unstructured") == (18, 300)
    assert split_budget(100, 50, 3000, 1.0, "unstructured") == (0, 3000)
    assert split_budget(10, 10, 10**6, 0.5, "rows") == (10, 100)  # capped at the matrix
    assert split_budget(10, 10, 10**6, 0.5, "unstructured") == (10, 100)


def test_budgets_respected_exactly():
    rng = _rng(9)
    W = rng.standard_normal((30, 18))
    G = _gram("correlated", 30)
    for structure in ("rows", "unstructured"):
        for budget in (0, 47, 48, 300, 301, 1000):
            for share in (0.0, 0.1, 0.2, 0.35, 0.5, 0.73, 1.0):
                rank, sb = split_budget(30, 18, budget, share, structure)
                assert rank * 48 + sb <= budget
                if structure == "rows":
                    assert sb % 18 == 0
            rank, sb = split_budget(30, 18, budget, 0.35, structure)
            fit = lrsd_fit(W, G, rank, sb, structure=structure, n_iter=3)
            assert fit.n_params <= budget and fit.rank == rank
            assert fit.sparse.n_params <= sb


# --------------------------------------------------------------------------- CMD's automatic mode
@pytest.mark.parametrize("structure", ["rows", "unstructured"])
def test_best_split_never_worse_than_low_rank_only(structure):
    rng = _rng(10)
    n_in, n_out = 48, 32
    G = _gram("correlated", n_in)
    budget = n_in * n_out // 3
    low_rank_only = rng.standard_normal((n_in, 6)) @ rng.standard_normal((6, n_out))
    heavy, _, _ = _heavy_rows_case(n_in, n_out, n_heavy=4, seed=11)
    for W in (low_rank_only + 1e-3 * rng.standard_normal((n_in, n_out)), heavy):
        choice = best_split(W, G, budget, shares=(0.2, 0.5), structure=structure)
        rank, _ = split_budget(n_in, n_out, budget, 0.0, structure)
        l_only = data_error(W, whitened_svd(W, G, rank, ridge=1e-3).to_dense(), G)
        assert choice.error <= l_only
        assert choice.share in (0.0, 0.2, 0.5) and choice.fit.n_params <= budget
        assert choice.error == pytest.approx(data_error(W, choice.fit.to_dense(), G))
    share, fit, err, plain = best_split(low_rank_only, G, budget, structure=structure)  # a plain tuple
    assert share == 0.0 and err < 1e-6  # L alone is exact: ties go to the cheaper graph
    assert plain is fit  # the share-0 fit, kept as the fallback


def test_split_budget_in_whole_groups_of_rows():
    rank, sparse = split_budget(72, 16, 2000, 0.3, "rows", group=9)  # a 3×3 conv with 8 input channels
    assert sparse % (9 * 16) == 0 and sparse == 4 * 9 * 16 and rank * (72 + 16) + sparse <= 2000
    with pytest.raises(ValueError, match="group"):
        split_budget(72, 16, 2000, 0.3, "rows", group=7)
    with pytest.raises(ValueError, match="group"):
        split_budget(72, 16, 2000, 0.3, "unstructured", group=9)


def test_best_split_uses_eval_gram():
    W, G, _ = _heavy_rows_case(64, 32, n_heavy=4, seed=12)
    X_held = _correlated_data(64, seed=13)
    G_held = X_held.T @ X_held
    choice = best_split(W, G, W.size // 3, eval_gram=G_held)
    assert choice.error == pytest.approx(data_error(W, choice.fit.to_dense(), G_held))
    for share in (0.0, 0.1, 0.2, 0.35, 0.5):
        r, b = split_budget(64, 32, W.size // 3, share)
        assert choice.error <= data_error(W, lrsd_fit(W, G, r, b).to_dense(), G_held) + 1e-12


def test_heavy_rows_low_rank_plus_rows_beats_low_rank_only_clearly():
    W, G, heavy = _heavy_rows_case()  # 192×64, 8 heavy input rows
    budget = int(0.3 * W.size)
    rank, _ = split_budget(*W.shape, budget, 0.0)
    l_only = data_error(W, whitened_svd(W, G, rank, ridge=1e-3).to_dense(), G)
    choice = best_split(W, G, budget, structure="rows")
    assert choice.share > 0 and choice.fit.n_params <= budget
    assert choice.error <= 0.85 * l_only
    assert set(heavy) <= set(choice.fit.sparse.rows)  # the outlier rows end up in S
    unstructured = best_split(W, G, budget, structure="unstructured")
    assert unstructured.error < l_only


def test_deterministic():
    W, G, _ = _heavy_rows_case(60, 30, seed=5)
    for structure in ("rows", "unstructured"):
        a = lrsd_fit(W, G, 4, 120, structure=structure, seed=1)
        b = lrsd_fit(W, G, 4, 120, structure=structure, seed=1)
        np.testing.assert_array_equal(a.to_dense(), b.to_dense())
        assert a.history == b.history


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=11), "rank"),
        (dict(rank=-1), "rank"),
        (dict(rank=2.0), "rank"),
        (dict(sparse_budget=-1), "sparse_budget"),
        (dict(sparse_budget=1.5), "sparse_budget"),
        (dict(structure="blocks"), "structure"),
        (dict(l_step="svd"), "l_step"),
        (dict(ridge=-1.0), "ridge"),
        (dict(ridge=float("nan")), "ridge"),
        (dict(n_iter=0), "n_iter"),
        (dict(tol=-1.0), "tol"),
        (dict(power_iter=-1), "power_iter"),
        (dict(refit_steps=-2), "refit_steps"),
        (dict(gram=np.eye(9)), "gram"),
        (dict(W=np.ones(5)), "2-D"),
        (dict(W=np.full((12, 10), np.nan)), "NaN"),
    ],
)
def test_lrsd_fit_rejects_bad_arguments(kwargs, match):
    args = dict(W=np.ones((12, 10)), gram=np.eye(12), rank=2, sparse_budget=20)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        lrsd_fit(**args)


@pytest.mark.parametrize(
    "args, match",
    [
        ((10, 5, 100, -0.1), "sparse_share"),
        ((10, 5, 100, 1.5), "sparse_share"),
        ((10, 5, 100, float("nan")), "sparse_share"),
        ((10, 5, -1, 0.2), "budget_params"),
        ((0, 5, 100, 0.2), "in_dim"),
        ((10, 5, 100, 0.2, "blocks"), "structure"),
    ],
)
def test_split_budget_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        split_budget(*args)


def test_best_split_rejects_bad_arguments():
    W = np.ones((6, 4))
    with pytest.raises(ValueError, match="sparse_share"):
        best_split(W, np.eye(6), 20, shares=(0.2, 2.0))
    with pytest.raises(ValueError, match="eval_gram"):
        best_split(W, np.eye(6), 20, eval_gram=np.eye(5))
