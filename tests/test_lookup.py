"""Embedding tables (a Gather on a constant [V, d] table) as low-rank targets: y = onehot(ids)·E,
whose Gram is diag(token counts); E ≈ U·V written as Gather(U, ids)·V."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers.graphs import make_model
from onnx_lrsd import compress
from onnx_lrsd.config import LayerOverride
from onnx_lrsd.decompose.stats import GramAccumulator, TokenCounts
from onnx_lrsd.decompose.whitened import data_error, whitened_spectrum, whitened_svd
from onnx_lrsd.model.graph import import_graph
from onnx_lrsd.model.layers import LayerTarget, SkippedLayer, classify
from onnx_lrsd.plan.cost import factorized_cost
from onnx_lrsd.runtime.activations import collect_statistics

V, D = 120, 16


def _table(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(V, 6)) @ rng.normal(size=(6, D)) + 0.1 * rng.normal(size=(V, D))).astype(np.float32)


def _model(opset=17, ffn=False, seed=0):
    """Gather(E, ids) → Relu (or → an FFN MatMul-Relu-MatMul), ids and mask [n, t] dynamic."""
    rng = np.random.default_rng(seed + 1)
    inits = {"E": _table(seed)}
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["emb"], name="word", axis=0)]
    if ffn:
        inits.update(W1=rng.normal(size=(D, 64)).astype(np.float32) / 4, W2=rng.normal(size=(64, D)).astype(np.float32) / 8)
        nodes += [helper.make_node("MatMul", ["emb", "W1"], ["h"], name="ffn_in"),
                  helper.make_node("Relu", ["h"], ["a"], name="act"),
                  helper.make_node("MatMul", ["a", "W2"], ["f"], name="ffn_out"),
                  helper.make_node("Add", ["emb", "f"], ["y"], name="residual")]
    else:
        nodes.append(helper.make_node("Relu", ["emb"], ["y"], name="act"))
    return make_model(nodes, [("input_ids", TensorProto.INT64, ["n", "t"]), ("mask", TensorProto.INT64, ["n", "t"])],
                      [("y", TensorProto.FLOAT, ["n", "t", D])], inits, opset=opset)


def _feeds(batches=6, n=4, t=9, seed=1, top=40):
    """Batches drawing only tokens < `top` (Zipf-like), the last 2 positions padding (mask 0, id V − 1)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(batches):
        ids = np.minimum(rng.zipf(1.3, size=(n, t)) - 1, top - 1).astype(np.int64)
        mask = np.ones_like(ids)
        mask[:, -2:] = 0
        ids[:, -2:] = V - 1
        out.append({"input_ids": ids, "mask": mask})
    return out


def _run(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(["y"], feeds)[0]


def _target(model) -> LayerTarget:
    graph = import_graph(model)
    return classify(next(n for n in graph.nodes if n.name == "word"), graph)


# ---------------------------------------------------------------------------- targets

def test_a_table_lookup_is_a_target_with_lookup_costs():
    target = _target(_model())
    assert isinstance(target, LayerTarget) and target.lookup
    assert (target.op, target.in_features, target.out_features, target.activation) == ("Gather", V, D, "input_ids")
    assert (target.params, target.macs, target.rows) == (V * D, 0, 1)  # symbolic n, t count as 1
    cost = factorized_cost(target, "svd", (5,))
    assert (cost.params, cost.macs) == (5 * (V + D), 5 * D)  # the MatMul multiplies, the Gather reads


def test_shared_columns_and_index_gathers_are_not_targets():
    table = _table()
    shared = make_model([helper.make_node("Gather", ["E", "ids"], ["a"], name="word", axis=0),
                         helper.make_node("MatMul", ["a", "Et"], ["y"], name="tied"),
                         helper.make_node("Gather", ["E", "ids"], ["b"], name="again", axis=0)],
                        [("ids", TensorProto.INT64, [3])], [("y", TensorProto.FLOAT, None), ("b", TensorProto.FLOAT, None)],
                        {"E": table, "Et": table.T.copy()})
    graph = import_graph(shared)
    found = {n.name: classify(n, graph) for n in graph.nodes}
    assert isinstance(found["word"], SkippedLayer) and "shared" in found["word"].reason
    columns = make_model([helper.make_node("Gather", ["E", "ids"], ["y"], name="cols", axis=1)],
                         [("ids", TensorProto.INT64, [3])], [("y", TensorProto.FLOAT, None)], {"E": table})
    graph = import_graph(columns)
    assert "axis 1" in classify(graph.nodes[0], graph).reason
    shape = make_model([helper.make_node("Shape", ["x"], ["s"], name="shape"),
                        helper.make_node("Gather", ["s", "i"], ["y"], name="dim", axis=0)],
                       [("x", TensorProto.FLOAT, [2, 3])], [("y", TensorProto.INT64, None)],
                       {"i": np.array(1, np.int64)})
    graph = import_graph(shape)
    assert all(classify(n, graph) is None for n in graph.nodes)  # an index Gather is no layer


def test_inspect_lists_the_table():
    from onnx_lrsd import inspect_model

    report = inspect_model(_model())
    assert any(t.name == "word" and t.op == "Gather" and t.weight_shape == (V, D) for t in report.targets)


# ---------------------------------------------------------------------------- maths

def _weights(counts, ridge):
    return counts + ridge * counts.mean()


def test_diagonal_gram_equals_the_dense_one_hot_gram():
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 30, size=(5, 7))
    mask = rng.random((5, 7)) > 0.3
    counts, dense = TokenCounts(30), GramAccumulator(30)
    counts.update(ids, mask)
    dense.update(np.eye(30)[ids], mask)
    np.testing.assert_array_equal(np.diag(counts.gram), dense.gram)
    np.testing.assert_allclose(counts.mean, dense.mean)
    assert counts.count == dense.count == mask.sum()
    w = rng.normal(size=(30, 8))
    for ridge in (1e-3, 0.5):
        np.testing.assert_allclose(whitened_spectrum(w, counts.gram, ridge), whitened_spectrum(w, dense.gram, ridge),
                                   rtol=1e-9)
        diagonal, full = whitened_svd(w, counts.gram, 3, ridge), whitened_svd(w, dense.gram, 3, ridge)
        np.testing.assert_allclose(diagonal.to_dense(), full.to_dense(), atol=1e-9)
        assert data_error(w, diagonal.to_dense(), counts.gram) == pytest.approx(
            data_error(w, full.to_dense(), dense.gram), rel=1e-9)


def test_the_weighted_closed_form_is_the_weighted_least_squares_optimum():
    """min Σ_v σ_v ‖E_v − A_v B‖², σ = c + λ·mean(c): the closed form's value is the
    Eckart–Young tail of diag(√σ)·E, and alternating weighted least squares from random starts
    never does better."""
    rng = np.random.default_rng(4)
    e = rng.normal(size=(40, 10))
    counts = np.where(rng.random(40) < 0.5, 0.0, rng.integers(1, 20, size=40).astype(float))  # half unseen
    rank, ridge = 3, 0.3
    sigma = _weights(counts, ridge)

    def objective(approx):
        return float(sigma @ np.sum((e - approx) ** 2, axis=1))

    closed = whitened_svd(e, counts, rank, ridge).to_dense()
    tail = np.linalg.svd(np.sqrt(sigma)[:, None] * e, compute_uv=False)[rank:]
    assert objective(closed) == pytest.approx(np.sum(tail ** 2), rel=1e-9)
    for seed in range(3):
        b = np.random.default_rng(seed).normal(size=(rank, 10))
        for _ in range(300):  # each row's weight cancels in its own A-step; B is the weighted LS
            a = e @ np.linalg.pinv(b)
            b = np.linalg.lstsq(np.sqrt(sigma)[:, None] * a, np.sqrt(sigma)[:, None] * e, rcond=None)[0]
        assert objective(a @ b) >= objective(closed) * (1 - 1e-9)
    seen = counts > 0
    rel = np.linalg.norm(e - closed, axis=1) / np.linalg.norm(e, axis=1)
    assert rel[seen].mean() < rel[~seen].mean()  # the tokens that occur are fitted better


def test_unseen_rows_are_projected_not_zeroed():
    """Rows of weight 0 (λ = 0, never seen) still get their least-squares fit on the basis."""
    rng = np.random.default_rng(5)
    e = rng.normal(size=(20, 6))
    counts = np.zeros(20)
    counts[:10] = 3.0
    f = whitened_svd(e, counts, 6, ridge=0.0)
    np.testing.assert_allclose(f.to_dense(), e, atol=1e-9)  # full rank: exact, unseen rows included


def test_counts_respect_the_mask():
    model, feeds = _model(), _feeds()
    target = _target(model)
    stats = collect_statistics(model, [target], feeds, mask_input="mask")["word"].fit
    expected = np.bincount(np.concatenate([f["input_ids"][f["mask"] > 0] for f in feeds]), minlength=V)
    np.testing.assert_array_equal(stats.gram, expected)
    assert stats.gram[V - 1] == 0  # the padding id is never counted
    unmasked = collect_statistics(model, [target], feeds)["word"].fit
    assert unmasked.gram[V - 1] == sum(f["input_ids"].size - f["mask"].sum() for f in feeds)


# ---------------------------------------------------------------------------- the rewrite

@pytest.mark.parametrize("opset", [7, 11, 13, 17, 21])
def test_full_rank_is_the_same_lookup_at_every_opset(opset):
    model = _model(opset)
    result = compress(model, calibration=_feeds(), mask_input="mask", overrides=(LayerOverride("word", rank="full"),),
                      verify=False)
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("Gather") == 1 and "MatMul" in ops
    names = {t.name for t in result.model.graph.initializer}
    assert {"word/lrsd/U", "word/lrsd/V"} <= names and "E" not in names
    for shape in [(1, 1), (3, 5), (2, 33)]:  # dynamic batch and sequence
        ids = np.random.default_rng(sum(shape)).integers(0, V, size=shape)
        feed = {"input_ids": ids, "mask": np.ones_like(ids)}
        np.testing.assert_allclose(_run(result.model, feed), _run(model, feed), atol=1e-5)


def test_skip_and_rank_patterns_apply_to_the_table():
    model = _model()
    skipped = compress(model, calibration=_feeds(), mask_input="mask", keep=0.3,
                       overrides=(LayerOverride("wo*", skip=True),), verify=False)
    assert "E" in {t.name for t in skipped.model.graph.initializer}
    ranked = compress(model, calibration=_feeds(), mask_input="mask", overrides=(LayerOverride("w*", rank=4),),
                      verify=False)
    u = {t.name: numpy_helper.to_array(t) for t in ranked.model.graph.initializer}["word/lrsd/U"]
    assert u.shape == (V, 4)


def test_target_params_meets_its_budget_with_the_table_in_play():
    model = _model(ffn=True)
    total = V * D + 2 * D * 64
    result = compress(model, calibration=_feeds(), mask_input="mask", target_params=0.65, verify=False)
    assert result.report.params_ratio <= 0.65 + 1e-9
    plans = {layer.name: layer for layer in result.report.layers}
    assert plans["word"].method == "svd" and plans["word"].ranks[0] < V * D / (V + D)
    assert result.report.before.params == total


def test_prune_and_low_rank_allocates_widths_and_the_table_rank_together():
    model = _model(ffn=True)
    # without bias correction: this allocation does not count the bias vectors a correction adds to
    # layers with no bias to fold it into (every layer of this toy model; MiniLM's fold into their Adds)
    result = compress(model, calibration=_feeds(batches=10), mask_input="mask", target_params=0.65,
                      method="prune+lowrank", bias_correction=False, verify=False)
    assert result.report.params_ratio <= 0.65 + 0.002
    assert any(layer.name == "word" and layer.method == "svd" for layer in result.report.layers)
    feed = _feeds(batches=1, seed=9)[0]
    error = np.linalg.norm(_run(result.model, feed) - _run(model, feed)) / np.linalg.norm(_run(model, feed))
    assert error < 0.5


# ---------------------------------------------------------------------------- recovery

def test_recovery_trains_the_factors_and_their_gradient_matches_finite_differences():
    from onnx_lrsd.recover.distill import trainable_tensors
    from onnx_lrsd.recover.gradients import TARGET, LossGradient

    result = compress(_model(opset=13), calibration=_feeds(), mask_input="mask",
                      overrides=(LayerOverride("word", rank=4),), verify=False)
    student = result.model
    for tensor in student.graph.initializer:  # float64 (onnxruntime's Gather / MatMul / ScatterND have it)
        if tensor.data_type == TensorProto.FLOAT:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float64), tensor.name))
    for value in list(student.graph.output) + list(student.graph.value_info):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.DOUBLE
    trainable = trainable_tensors(student, "compressed")
    assert {"word/lrsd/U", "word/lrsd/V"} <= set(trainable)
    feed = _feeds(batches=1)[0]
    lg = LossGradient(student, trainable, {k: v.shape for k, v in feed.items()})
    target = np.random.default_rng(0).normal(size=(4, 9, D))
    params = {k: v.copy() for k, v in lg.initial.items()}
    _, grads = lg(feed, {TARGET: target}, params)
    rng, h = np.random.default_rng(1), 1e-6
    for name in ("word/lrsd/U", "word/lrsd/V"):
        flat = params[name].reshape(-1)
        rows = np.unique(feed["input_ids"]) if name.endswith("U") else np.arange(params[name].shape[0])
        picks = [int(r) * params[name].shape[1] + int(c) for r, c in
                 zip(rng.choice(rows, 6), rng.integers(0, params[name].shape[1], 6))]
        numeric = []
        for i in picks:
            old = flat[i]
            flat[i] = old + h
            up = lg.loss_only(feed, {TARGET: target}, params)
            flat[i] = old - h
            down = lg.loss_only(feed, {TARGET: target}, params)
            flat[i] = old
            numeric.append((up - down) / (2 * h))
        np.testing.assert_allclose(grads[name].reshape(-1)[picks], numeric, rtol=1e-5, atol=1e-9, err_msg=name)
    unseen = np.setdiff1d(np.arange(V), feed["input_ids"])
    assert not np.any(grads["word/lrsd/U"][unseen])  # only the rows read get a gradient


# ---------------------------------------------------------------------------- latency

def test_latency_candidates_of_a_table_run():
    from onnx_lrsd.runtime.latency import LatencyModel, candidate_model

    target = _target(_model())
    model = candidate_model(target, (2, 7), ("svd", (4,)))
    ids = np.random.default_rng(0).integers(0, V, size=(2, 7))
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": ids})[0]
    assert out.shape == (2, 7, D)
    times = LatencyModel(cache_path=None).measure(target, (2, 7), [("dense", ()), ("svd", (4,))])
    assert len(times) == 2 and all(t > 0 for t in times)


def test_prune_and_low_rank_leaves_a_skipped_table_dense():
    model = _model(ffn=True)
    result = compress(model, calibration=_feeds(batches=10), mask_input="mask", target_params=0.75,
                      method="prune+lowrank", bias_correction=False, overrides=(LayerOverride("word", skip=True),),
                      verify=False)
    assert "E" in {t.name for t in result.model.graph.initializer}
    with pytest.raises(Exception, match="only --skip overrides"):
        compress(model, calibration=_feeds(), mask_input="mask", target_params=0.75, method="prune+lowrank",
                 overrides=(LayerOverride("word", rank=4),), verify=False)


def test_token_counts_read_negative_ids_from_the_end_and_refuse_out_of_range_ones():
    counts = TokenCounts(5)
    counts.update(np.array([[0, -1, 4]]))
    np.testing.assert_array_equal(counts.gram, [1, 0, 0, 0, 2])
    with pytest.raises(ValueError, match="ids must lie"):
        counts.update(np.array([5]))


def test_sequential_mode_fits_the_table_on_its_counts():
    model = _model(ffn=True)
    result = compress(model, calibration=_feeds(), mask_input="mask", mode="sequential", keep=0.7, verify=False)
    plans = {layer.name: layer for layer in result.report.layers}
    assert plans["word"].method == "svd" and plans["word"].data_error is not None
    full = compress(model, calibration=_feeds(), mask_input="mask", mode="sequential",
                    overrides=(LayerOverride("word", rank="full"), LayerOverride("*", skip=True)), verify=False)
    feed = _feeds(batches=1, seed=5)[0]
    np.testing.assert_allclose(_run(full.model, feed), _run(model, feed), atol=1e-5)
