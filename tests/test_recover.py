"""Recovery (end-to-end distillation) on small graphs: the held-out loss and output error fall,
runs repeat for a seed, residual supports stay fixed, ops without gradient rules leave their
weights as fitted."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers.graphs import make_model
from onnx_lrsd.errors import LrsdError
from onnx_lrsd.recover.augment import augment_images, drop_tokens, input_kind
from onnx_lrsd.recover.distill import recover_models as recover, support_masks, trainable_tensors, with_values
from onnx_lrsd.recover.types import RecoverConfig

F = TensorProto.FLOAT


def _mlp(seed=0):
    rng = np.random.default_rng(seed)
    inits = {"W1": (rng.normal(size=(64, 128)) / 8).astype(np.float32), "b1": rng.normal(size=128).astype(np.float32),
             "W2": (rng.normal(size=(128, 10)) / 11).astype(np.float32)}
    return make_model([helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
                       helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
                       helper.make_node("Relu", ["hb"], ["r"], name="relu"),
                       helper.make_node("MatMul", ["r", "W2"], ["logits"], name="fc2")],
                      [("x", F, ["n", 64])], [("logits", F, ["n", 10])], inits, opset=17)


def _data(n=96, seed=1):
    x = np.random.default_rng(seed).normal(size=(n, 64)).astype(np.float32)
    return [{"x": x[i:i + 16]} for i in range(0, n, 16)]


@pytest.fixture(scope="module")
def pair():
    import onnx_lrsd

    teacher = _mlp()
    fitted = onnx_lrsd.compress(teacher, calibration=_data(32, seed=7), keep=0.3, verify=False,
                                calib_samples=32, calib_batch=16).model
    rng = np.random.default_rng(5)  # factors knocked off their fit, so there is something to recover
    factors = {t.name: numpy_helper.to_array(t) for t in fitted.graph.initializer if "/lrsd/" in t.name}
    assert factors
    return teacher, with_values(fitted, {k: v + 0.3 * v.std() * rng.normal(size=v.shape) for k, v in factors.items()})


def test_distillation_lowers_heldout_loss_and_output_error(pair):
    teacher, student = pair
    before = (teacher.SerializeToString(), student.SerializeToString())
    result = recover(student, teacher, _data(), RecoverConfig(steps=80, lr=1e-2, batch=8, eval_every=10, patience=None, schedule="constant"))
    r = result.report
    assert (teacher.SerializeToString(), student.SerializeToString()) == before  # inputs untouched
    assert r.loss == "kl" and r.augment == "noise" and r.steps == 80 and r.heldout_samples + r.train_samples == 96
    assert r.loss_after < 0.75 * r.loss_before
    assert r.error_after < 0.9 * r.error_before
    assert r.curve[0] == (0, r.loss_before) and min(l for _, l in r.curve) == r.loss_after
    assert r.trainable_tensors >= 2 and not r.left_as_fitted
    assert [i.name for i in result.model.graph.input] == [i.name for i in student.graph.input]
    trained = {t.name for t in result.model.graph.initializer}
    assert trained == {t.name for t in student.graph.initializer}


def test_same_seed_same_model_other_seed_other_model(pair):
    teacher, student = pair
    config = RecoverConfig(steps=12, lr=3e-3, batch=8, eval_every=4, patience=None)
    a = recover(student, teacher, _data(), config).model
    b = recover(student, teacher, _data(), config).model
    c = recover(student, teacher, _data(), config.replace(seed=1)).model
    assert a.SerializeToString() == b.SerializeToString()
    assert a.SerializeToString() != c.SerializeToString()


def test_mse_for_non_probability_outputs_and_time_budget(pair):
    teacher, student = pair
    r = recover(student, teacher, _data(), RecoverConfig(time_budget=2.0, lr=3e-3, loss="mse", eval_every=5)).report
    assert r.loss == "mse" and r.stopped_by in ("time", "early stop") and r.steps > 0
    assert r.loss_after <= r.loss_before


def test_trainable_default_is_the_compressed_layers(pair):
    _, student = pair
    names = trainable_tensors(student, "compressed")
    assert names and all("/lrsd/" in n or n == "b1" for n in names)
    assert "W2" not in names or any("fc2/lrsd" in n for n in names)
    assert set(trainable_tensors(student, "all")) >= set(names)


def test_sparse_residual_keeps_its_support():
    dense = np.zeros((4, 3), np.float32)
    dense[0, 1], dense[3, 2] = 1.5, -2.0
    model = make_model([helper.make_node("MatMul", ["x", "l/lrsd/S"], ["y"])], [("x", F, ["n", 4])],
                       [("y", F, ["n", 3])], {}, opset=17)
    values = numpy_helper.from_array(dense[dense != 0], "l/lrsd/S")
    indices = numpy_helper.from_array(np.flatnonzero(dense).astype(np.int64), "l/lrsd/S_idx")
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [4, 3]))
    mask = support_masks(model, ["l/lrsd/S"])["l/lrsd/S"]
    assert mask.sum() == 2 and mask[0, 1] and mask[3, 2]
    updated = with_values(model, {"l/lrsd/S": np.full((4, 3), 7.0)})
    sparse = updated.graph.sparse_initializer[0]
    assert list(numpy_helper.to_array(sparse.indices)) == [1, 11]
    np.testing.assert_array_equal(numpy_helper.to_array(sparse.values), [7.0, 7.0])


def test_weight_without_gradient_rule_is_left_as_fitted():
    """A grouped conv's weight has no gradient rule: it stays, the other factor trains."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(4, 1, 3, 3)).astype(np.float32)
    v = rng.normal(size=(4, 4, 1, 1)).astype(np.float32)

    def model(dw, pw):
        return make_model([helper.make_node("Conv", ["x", "c/lrsd/dw"], ["h"], group=4, pads=[1, 1, 1, 1], name="c/lrsd/d"),
                           helper.make_node("Conv", ["h", "c/lrsd/pw"], ["y"], name="c/lrsd/p")],
                          [("x", F, ["n", 4, 6, 6])], [("y", F, ["n", 4, 6, 6])], {"c/lrsd/dw": dw, "c/lrsd/pw": pw},
                          opset=17)
    teacher, student = model(w, v), model(w, v + 0.3 * rng.normal(size=v.shape).astype(np.float32))
    x = rng.normal(size=(24, 4, 6, 6)).astype(np.float32)
    result = recover(student, teacher, [{"x": x}], RecoverConfig(steps=20, lr=1e-2, batch=4, augment="none", schedule="constant",
                                                                 eval_every=5, patience=None))
    r = result.report
    assert [a.part for a in r.left_as_fitted] == ["c/lrsd/dw"] and "Conv" in r.left_as_fitted[0].reason
    assert r.trainable_tensors == 1 and r.loss == "mse" and r.loss_after < 0.5 * r.loss_before
    after = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    np.testing.assert_array_equal(after["c/lrsd/dw"], w)


def test_augmentation_by_input_kind():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, size=(6, 3, 8, 8)).astype(np.float32)
    assert input_kind({"x": images}) == "image"
    assert input_kind({"ids": np.ones((2, 5), np.int64), "mask": np.ones((2, 5), np.int64)}) == "tokens"
    out = augment_images(images, np.random.default_rng(1), (0.0, 1.0))
    assert out.dtype == images.dtype and out.min() >= 0 and out.max() <= 1 and not np.allclose(out, images)
    np.testing.assert_array_equal(out, augment_images(images, np.random.default_rng(1), (0.0, 1.0)))
    ids = np.array([[101, 5, 6, 7, 8, 9, 102, 0, 0]] * 200)
    mask = (ids != 0).astype(np.int64)
    dropped = drop_tokens(ids, mask, np.random.default_rng(2), unk_id=100)
    assert (dropped[:, 0] == 101).all() and (dropped[:, 6] == 102).all() and (dropped[:, 7:] == 0).all()
    share = (dropped[:, 1:6] == 100).mean()
    assert 0.05 < share < 0.15


@pytest.mark.parametrize("bad", [dict(steps=-1), dict(batch=0), dict(loss="l1"), dict(holdout=1.0), dict(lr=0)])
def test_bad_config_is_one_line_error(bad):
    with pytest.raises(LrsdError):
        RecoverConfig(**bad)


def test_no_compressed_layers_is_an_error():
    teacher = _mlp()
    with pytest.raises(LrsdError, match="nothing to train"):
        recover(teacher, teacher, _data(), RecoverConfig(steps=1))


def test_cosine_schedule_spans_the_budget():
    from onnx_lrsd.recover.distill import _decay

    steps = RecoverConfig(steps=100)
    assert [_decay(steps, s, 0.0) for s in (0, 50, 100)] == pytest.approx([1.0, 0.5, 0.0])
    timed = RecoverConfig(time_budget=10.0)
    assert _decay(timed, 3, 5.0) == pytest.approx(0.5) and _decay(timed, 3, 20.0) == pytest.approx(0.0)
    assert _decay(RecoverConfig(steps=100, schedule="constant"), 99, 0.0) == 1.0


def test_all_float_weights_including_constant_nodes(pair):
    """trainable="all" trains weights held in Constant nodes too, and writes them back there."""
    teacher, student = pair
    as_constant = onnx.ModelProto()
    as_constant.CopyFrom(student)
    w2 = next(t for t in as_constant.graph.initializer if t.name == "W2")
    as_constant.graph.node.insert(0, helper.make_node("Constant", [], ["W2"], value=w2))
    as_constant.graph.initializer.remove(w2)
    result = recover(as_constant, teacher, _data(), RecoverConfig(steps=20, lr=2e-3, batch=8, eval_every=5,
                                                                   trainable="all", schedule="constant"))
    assert result.report.best_step > 0, result.report.curve
    assert result.report.trainable_tensors == len(trainable_tensors(as_constant, "all")) >= 4
    constant = next(n for n in result.model.graph.node if n.op_type == "Constant")
    before = numpy_helper.to_array(w2)
    after = numpy_helper.to_array(constant.attribute[0].t)
    assert after.shape == before.shape and not np.array_equal(after, before)
    assert result.report.loss_after < result.report.loss_before
