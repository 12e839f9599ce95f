"""The benchmarks' word-embedding factorization (`benchmarks.recovery.factor_embedding`):
Gather(E, ids) → Gather(A, ids)·B, the count-weighted best rank-r fit of E."""
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from benchmarks.recovery import factor_embedding
from helpers.graphs import make_model


def _lookup_model(vocab=50, dim=12, seed=0):
    rng = np.random.default_rng(seed)
    table = rng.normal(size=(vocab, dim)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["emb"], name="word", axis=0),
             helper.make_node("Relu", ["emb"], ["y"], name="act")]
    model = make_model(nodes, [("input_ids", TensorProto.INT64, ["n", "t"]), ("mask", TensorProto.INT64, ["n", "t"])],
                       [("y", TensorProto.FLOAT, ["n", "t", dim])], {"E": table}, opset=17)
    return model, table


def _feeds(seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 6, size=(8, 12))  # only tokens 0..5 occur
    mask = np.ones_like(ids)
    mask[:, -2:] = 0
    ids[:, -2:] = 49  # padding positions: not counted
    return [{"input_ids": ids, "mask": mask}]


def _run(model, feeds):
    return ort.InferenceSession(model.SerializeToString()).run(["y"], feeds[0])[0]


def test_full_rank_is_the_same_lookup():
    model, _ = _lookup_model()
    factored = factor_embedding(model, 12, _feeds(), "mask")
    assert {n.op_type for n in factored.graph.node} == {"Gather", "MatMul", "Relu"}
    np.testing.assert_allclose(_run(factored, _feeds(seed=3)), _run(model, _feeds(seed=3)), atol=1e-5)


def test_low_rank_is_the_count_weighted_optimum():
    from onnx import numpy_helper

    model, table = _lookup_model()
    factored = factor_embedding(model, 4, _feeds(), "mask")
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in factored.graph.initializer}
    fit = inits["word/lrsd/A"] @ inits["word/lrsd/B"]
    counts = np.zeros(50)
    np.add.at(counts, _feeds()[0]["input_ids"][:, :-2].ravel(), 1)
    weights = counts + 1.0
    s = np.linalg.svd(np.sqrt(weights)[:, None] * table.astype(np.float64), compute_uv=False)
    error = np.sum(weights[:, None] * (table - fit) ** 2)
    np.testing.assert_allclose(error, np.sum(s[4:] ** 2), rtol=1e-5)  # Eckart–Young on diag(√w)·E
    seen = counts > 0
    rel = np.linalg.norm(table - fit, axis=1) / np.linalg.norm(table, axis=1)
    assert rel[seen].mean() < 0.5 * rel[~seen].mean()  # the tokens that occur are fitted far better
