"""Streaming statistics and im2col (onnx_lrsd.decompose.stats), and their contract with decompose."""
import numpy as np
import pytest

from onnx_lrsd.decompose import conv_to_matrix, data_error, truncated_svd, whitened_svd
from onnx_lrsd.decompose.stats import GramAccumulator, channel_gram, im2col
from onnx_lrsd.decompose import stats


def _rng(seed=0):
    return np.random.default_rng(seed)


def _loop_conv(x, w, strides, pads, dilations):
    """Naive ONNX Conv, one output position at a time: x [N, C, *S], w [Cout, C, *k]."""
    nsp = x.ndim - 2
    k = w.shape[2:]
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nsp]) for i in range(nsp)])
    out = [(xp.shape[2 + i] - (k[i] - 1) * dilations[i] - 1) // strides[i] + 1 for i in range(nsp)]
    y = np.zeros((x.shape[0], w.shape[0], *out))
    for n in range(x.shape[0]):
        for pos in np.ndindex(*out):
            start = [pos[i] * strides[i] for i in range(nsp)]
            idx = tuple(slice(start[i], start[i] + (k[i] - 1) * dilations[i] + 1, dilations[i])
                        for i in range(nsp))
            patch = xp[(n, slice(None), *idx)]
            y[(n, slice(None), *pos)] = np.tensordot(w, patch, axes=nsp + 1)
    return y


def _as_rows(y):
    """Conv output [N, Cout, *out] as rows [N·prod(out), Cout] in im2col's row order."""
    return np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])


IM2COL_CASES = [  # x shape, kernel, strides, pads, dilations
    ((2, 3, 13), (3,), (1,), (1, 1), (1,)),
    ((2, 3, 13), (4,), (3,), (0, 2), (2,)),
    ((2, 3, 8, 9), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    ((2, 3, 8, 9), (3, 2), (2, 3), (0, 2, 1, 0), (2, 1)),
    ((1, 2, 5, 6, 4), (2, 3, 1), (1, 2, 1), (0, 1, 0, 1, 0, 1), (2, 1, 1)),
]


@pytest.mark.parametrize("shape, kernel, strides, pads, dilations", IM2COL_CASES)
def test_im2col_times_conv_matrix_is_the_conv(shape, kernel, strides, pads, dilations):
    rng = _rng(1)
    x = rng.standard_normal(shape)
    w = rng.standard_normal((4, shape[1], *kernel))
    cols = im2col(x, kernel, strides, pads, dilations)
    assert cols.shape[1] == shape[1] * int(np.prod(kernel))
    expected = _as_rows(_loop_conv(x, w, strides, pads, dilations))
    np.testing.assert_allclose(cols @ conv_to_matrix(w), expected, rtol=1e-12, atol=1e-12)


def test_im2col_defaults_and_dtype():
    x = _rng(2).standard_normal((1, 2, 4, 5)).astype(np.float32)
    cols = im2col(x, (2, 2))
    assert cols.dtype == np.float32 and cols.shape == (3 * 4, 8)
    np.testing.assert_array_equal(cols[0], x[0, :, :2, :2].ravel())
    np.testing.assert_array_equal(cols[5], x[0, :, 1:3, 1:3].ravel())


def test_im2col_max_positions_subsamples_rows():
    x = _rng(3).standard_normal((3, 2, 7, 7))
    full = im2col(x, (3, 3), pads=(1, 1, 1, 1))
    part = im2col(x, (3, 3), pads=(1, 1, 1, 1), max_positions=20, rng=5)
    assert part.shape == (20, full.shape[1])
    where = [int(np.flatnonzero(np.all(full == row, axis=1))[0]) for row in part]
    assert where == sorted(set(where))  # distinct rows of the full matrix, in row order
    again = im2col(x, (3, 3), pads=(1, 1, 1, 1), max_positions=20, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(part, again)
    other = im2col(x, (3, 3), pads=(1, 1, 1, 1), max_positions=20, rng=6)
    assert not np.array_equal(part, other)
    np.testing.assert_array_equal(im2col(x, (3, 3), pads=(1, 1, 1, 1), max_positions=10**6), full)


def test_im2col_subsampling_is_uniform():
    x = np.arange(40.0).reshape(1, 1, 40)
    counts = np.zeros(40)
    gen = np.random.default_rng(0)
    for _ in range(400):
        counts[im2col(x, (1,), max_positions=10, rng=gen)[:, 0].astype(int)] += 1
    expected = 400 * 10 / 40
    assert counts.min() > 0.6 * expected and counts.max() < 1.4 * expected


@pytest.mark.parametrize("kwargs, match", [
    (dict(x=np.ones((2, 3)), kernel_shape=(1,)), "x must be"),
    (dict(x=np.ones((1, 1, 4)), kernel_shape=(5,)), "kernel span"),
    (dict(x=np.ones((1, 1, 4, 4)), kernel_shape=(3,)), "kernel_shape"),
    (dict(x=np.ones((1, 1, 4)), kernel_shape=(2,), strides=(0,)), "strides"),
    (dict(x=np.ones((1, 1, 4)), kernel_shape=(2,), pads=(1,)), "pads"),
    (dict(x=np.ones((1, 1, 4)), kernel_shape=(2,), pads=(-1, 0)), "pads"),
    (dict(x=np.ones((1, 1, 4)), kernel_shape=(2,), max_positions=0), "max_positions"),
])
def test_im2col_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        im2col(**kwargs)


def test_channel_gram_equals_pointwise_im2col_gram():
    for shape in ((3, 4, 5, 6), (3, 4, 7)):
        x = _rng(4).standard_normal(shape)
        rows = im2col(x, (1,) * (len(shape) - 2))
        np.testing.assert_allclose(channel_gram(x), rows.T @ rows, rtol=1e-12)
    with pytest.raises(ValueError, match="x must be"):
        channel_gram(np.ones((3, 4)))


def test_gram_streaming_equals_one_shot_and_merge():
    X = _rng(5).standard_normal((103, 6)) + 2.0
    acc = GramAccumulator(6)
    for batch in np.array_split(X, 5):
        acc.update(batch)
    assert acc.count == 103
    np.testing.assert_allclose(acc.gram, X.T @ X, rtol=1e-12)
    np.testing.assert_allclose(acc.mean, X.mean(axis=0), rtol=1e-12)
    a, b = GramAccumulator(6), GramAccumulator(6)
    a.update(X[:40])
    b.update(X[40:])
    merged = a.merge(b)
    assert (merged.count, a.count, b.count) == (103, 40, 63)
    np.testing.assert_allclose(merged.gram, acc.gram, rtol=1e-12)
    np.testing.assert_allclose(merged.mean, acc.mean, rtol=1e-12)
    np.testing.assert_allclose(a.gram, X[:40].T @ X[:40], rtol=1e-12)  # merge left a unchanged
    with pytest.raises(ValueError):
        acc.gram[0, 0] = 1.0


def test_add_in_place_equals_merge_and_copies_shared_arrays_first():
    """Shards arrive from Ray's object store as read-only views of shared memory: `add` sums
    into a private copy of them, never into the shared buffer, with the sums `merge` gives."""
    X = _rng(6).standard_normal((50, 4))
    a, b = GramAccumulator(4, track_cross=True), GramAccumulator(4, track_cross=True)
    a.update_pair(X[:20], X[:20] * 2)
    b.update_pair(X[20:], X[20:] * 2)
    expected = a.merge(b)
    shared = a._gram.copy()
    untouched = shared.copy()
    for name in ("_gram", "_sum", "_cross", "_target_sum"):
        getattr(a, name).flags.writeable = False
    a._gram = shared.view()
    a._gram.flags.writeable = False
    a.add(b)
    assert a.count == 50 and a._gram.flags.writeable
    np.testing.assert_array_equal(a.gram, expected.gram)
    np.testing.assert_array_equal(a.cross, expected.cross)
    np.testing.assert_array_equal(a.target_mean, expected.target_mean)
    np.testing.assert_array_equal(shared, untouched)  # the shared buffer is untouched


def test_gram_accumulates_in_float64():
    X = np.full((20000, 2), 1.0001, dtype=np.float32)
    acc = GramAccumulator(2)
    for batch in np.array_split(X, 4):
        acc.update(batch)
    exact = 20000 * float(np.float32(1.0001)) ** 2
    np.testing.assert_allclose(acc.gram, np.full((2, 2), exact), rtol=1e-13)
    assert acc.gram.dtype == np.float64


def test_gram_mask_drops_rows():
    rng = _rng(6)
    X = rng.standard_normal((4, 7, 5))  # [batch, tokens, features]
    mask = rng.random((4, 7)) > 0.4
    acc = GramAccumulator(5)
    acc.update(X, mask=mask)
    kept = X[mask]
    assert acc.count == kept.shape[0] < 28
    np.testing.assert_allclose(acc.gram, kept.T @ kept, rtol=1e-12)
    np.testing.assert_allclose(acc.mean, kept.mean(axis=0), rtol=1e-12)
    with pytest.raises(ValueError, match="mask"):
        acc.update(X, mask=mask.astype(int))
    with pytest.raises(ValueError, match="mask"):
        acc.update(X, mask=mask[:, :3])


def test_gram_pairs_accumulate_cross_terms():
    rng = _rng(7)
    X = rng.standard_normal((50, 4))
    X_hat = X + 0.1 * rng.standard_normal(X.shape)
    Z = rng.standard_normal((10, 4))
    acc = GramAccumulator(4, track_cross=True)
    acc.update_pair(X_hat[:30], X[:30])
    other = GramAccumulator(4, track_cross=True)
    other.update_pair(X_hat[30:], X[30:])
    other.update(Z)  # X_hat = X = Z
    acc = acc.merge(other)
    all_hat, all_x = np.vstack([X_hat, Z]), np.vstack([X, Z])
    np.testing.assert_allclose(acc.gram, all_hat.T @ all_hat, rtol=1e-12)
    np.testing.assert_allclose(acc.cross, all_hat.T @ all_x, rtol=1e-12)
    np.testing.assert_allclose(acc.mean, all_hat.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(acc.target_mean, all_x.mean(axis=0), rtol=1e-12)
    with pytest.raises(ValueError, match="differ in shape"):
        acc.update_pair(X_hat, X[:10])


def test_gram_accumulator_rejects():
    acc = GramAccumulator(3)
    with pytest.raises(ValueError, match="no rows"):
        acc.mean
    with pytest.raises(ValueError, match="track_cross"):
        acc.cross
    with pytest.raises(ValueError, match="track_cross"):
        acc.update_pair(np.ones((2, 3)), np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"\[\.\.\., 3\]"):
        acc.update(np.ones((2, 4)))
    with pytest.raises(ValueError, match="cannot merge"):
        acc.merge(GramAccumulator(3, track_cross=True))
    with pytest.raises(ValueError, match="dim"):
        GramAccumulator(0)


def test_im2col_gram_gives_the_true_conv_output_error():
    """data_error from a streamed im2col Gram equals the measured relative conv-output error."""
    rng = _rng(8)
    mix = rng.standard_normal((4, 4)) * np.array([[3.0], [1.0], [0.2], [0.05]])
    x = np.einsum("nchw,cd->ndhw", rng.standard_normal((6, 4, 10, 10)), mix)
    w = rng.standard_normal((8, 4, 3, 3))
    args = ((3, 3), (2, 1), (1, 1, 0, 1), (1, 2))
    acc = GramAccumulator(36)
    for batch in np.array_split(x, 3):
        acc.update(im2col(batch, *args))
    M = conv_to_matrix(w)
    y = _loop_conv(x, w, *args[1:])
    errors = []
    for f in (truncated_svd(M, 4), whitened_svd(M, acc.gram, 4)):
        w_hat = f.to_dense().T.reshape(w.shape)
        measured = np.linalg.norm(_loop_conv(x, w_hat, *args[1:]) - y) / np.linalg.norm(y)
        assert data_error(M, f.to_dense(), acc.gram) == pytest.approx(measured, rel=1e-10)
        errors.append(measured)
    assert errors[1] < 0.8 * errors[0]


def test_gram_read_between_updates_is_symmetric_and_current(monkeypatch):
    """G is accumulated as its upper triangle; every read mirrors it (by blocks smaller than
    the matrix here) and stays exact after further updates."""
    monkeypatch.setattr(stats, "MIRROR_BLOCK", 3)
    X = _rng(7).standard_normal((60, 8))
    acc = GramAccumulator(8)
    for start, stop in ((0, 10), (10, 30), (30, 60)):
        acc.update(X[start:stop])
        gram = acc.gram
        np.testing.assert_array_equal(gram, gram.T)
        np.testing.assert_allclose(gram, X[:stop].T @ X[:stop], rtol=1e-12, atol=1e-12)
