"""Gradients of `onnx_lrsd.recover.gradients.LossGradient` against central finite differences.

Float64 graphs where onnxruntime has float64 kernels (MatMul, Gemm, Softmax, LayerNorm ...);
onnxruntime's Conv is float32 only, so the Conv chain's loss is made quadratic in every single
weight (MSE of a linear chain): a central difference is then exact up to rounding.
"""
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers.graphs import make_model
from onnx_lrsd.recover.gradients import TEACHER_LOGP, TEACHER_PROB, TARGET, LossGradient, UnsupportedOp

D = TensorProto.DOUBLE
F = TensorProto.FLOAT
DIGITS = Path(__file__).resolve().parents[1] / "models" / "digits_cnn.onnx"


def _softmax(z, axis=-1):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _kl_targets(p):
    return {TEACHER_PROB: p, TEACHER_LOGP: np.log(np.maximum(p, 1e-300))}


def _check(lg: LossGradient, feeds, targets, h: float, rtol: float, atol: float, per_tensor: int = 6, seed: int = 0):
    """Central differences of lg.loss_only on `per_tensor` random entries of every trainable."""
    rng = np.random.default_rng(seed)
    params = {k: v.copy() for k, v in lg.initial.items()}
    loss, grads = lg(feeds, targets, params)
    assert loss == pytest.approx(lg.loss_only(feeds, targets, params), rel=1e-6)
    for name, value in params.items():
        assert grads[name].shape == value.shape
        flat = value.reshape(-1)
        picks = rng.choice(flat.size, size=min(per_tensor, flat.size), replace=False)
        numeric = []
        for i in picks:
            old = flat[i]
            flat[i] = old + h
            up = lg.loss_only(feeds, targets, params)
            flat[i] = old - h
            down = lg.loss_only(feeds, targets, params)
            flat[i] = old
            numeric.append((up - down) / (2 * h))
        np.testing.assert_allclose(grads[name].reshape(-1)[picks], numeric, rtol=rtol, atol=atol, err_msg=name)
    return grads


def test_matmul_add_relu_chain_mse_float64():
    rng = np.random.default_rng(1)
    inits = {"U": rng.normal(size=(6, 3)), "V": rng.normal(size=(3, 5)), "b": rng.normal(size=5),
             "W2": rng.normal(size=(5, 4))}
    model = make_model([helper.make_node("MatMul", ["x", "U"], ["a"]), helper.make_node("MatMul", ["a", "V"], ["c"]),
                        helper.make_node("Add", ["c", "b"], ["d"]), helper.make_node("Relu", ["d"], ["e"]),
                        helper.make_node("MatMul", ["e", "W2"], ["y"])],
                       [("x", D, ["n", 6])], [("y", D, ["n", 4])], inits)
    x = rng.normal(size=(7, 6))
    lg = LossGradient(model, ["U", "V", "b", "W2"], {"x": x.shape}, loss="mse", mse_scale=2.0)
    _check(lg, {"x": x}, {TARGET: rng.normal(size=(7, 4))}, h=1e-6, rtol=1e-6, atol=1e-9)


def test_gemm_softmax_kl_uses_logits_float64():
    rng = np.random.default_rng(2)
    inits = {"A": rng.normal(size=(4, 6)), "a": rng.normal(size=4), "B": rng.normal(size=(4, 3)), "c": rng.normal(size=3)}
    model = make_model([helper.make_node("Gemm", ["x", "A", "a"], ["h"], transB=1), helper.make_node("Tanh", ["h"], ["t"]),
                        helper.make_node("Gemm", ["t", "B", "c"], ["z"]), helper.make_node("Softmax", ["z"], ["p"], axis=-1)],
                       [("x", D, ["n", 6])], [("p", D, ["n", 3])], inits)
    x = rng.normal(size=(5, 6))
    lg = LossGradient(model, ["A", "a", "B", "c"], {"x": x.shape}, loss="kl", output_is_probability=True)
    p = _softmax(rng.normal(size=(5, 3)))
    _check(lg, {"x": x}, _kl_targets(p), h=1e-6, rtol=1e-6, atol=1e-9)
    # the loss is KL(p || q): zero when the teacher is the student itself
    q = _softmax(np.tanh(x @ inits["A"].T + inits["a"]) @ inits["B"] + inits["c"])
    assert lg.loss_only({"x": x}, _kl_targets(q), lg.initial) == pytest.approx(0.0, abs=1e-12)


def test_layer_norm_and_decomposed_norm_float64():
    rng = np.random.default_rng(3)
    inits = {"W": rng.normal(size=(8, 8)), "g": 1 + 0.1 * rng.normal(size=8), "beta": rng.normal(size=8),
             "W2": rng.normal(size=(8, 8)), "eps": np.array(1e-5), "ax": np.array([-1], np.int64)}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]),
             helper.make_node("LayerNormalization", ["h", "g", "beta"], ["n1"], axis=-1),
             helper.make_node("Add", ["n1", "x"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["h2"]),  # a norm spelled out, as exporters write it
             helper.make_node("ReduceMean", ["h2"], ["mu"], axes=[-1]), helper.make_node("Sub", ["h2", "mu"], ["cen"]),
             helper.make_node("Mul", ["cen", "cen"], ["sq"]), helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1]),
             helper.make_node("Add", ["var", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"]),
             helper.make_node("Div", ["cen", "sd"], ["y"])]
    model = make_model(nodes, [("x", D, ["n", 3, 8])], [("y", D, ["n", 3, 8])], inits, opset=17)
    x = rng.normal(size=(2, 3, 8))
    lg = LossGradient(model, ["W", "g", "beta", "W2"], {"x": x.shape}, loss="mse")
    _check(lg, {"x": x}, {TARGET: rng.normal(size=(2, 3, 8))}, h=1e-6, rtol=1e-5, atol=1e-8)


def test_conv_chain_float32_with_constant_weights_and_old_opset():
    """Conv weights held in Constant nodes at opset 11 (PP-OCR's layout): promoted, converted."""
    rng = np.random.default_rng(4)
    w1 = rng.normal(size=(4, 2, 3, 3)).astype(np.float32) * 0.3
    w2 = rng.normal(size=(3, 4, 1, 1)).astype(np.float32) * 0.3
    nodes = [helper.make_node("Constant", [], ["w1"], value=numpy_helper.from_array(w1)),
             helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["h", "w2"], ["y"])]
    model = make_model(nodes, [("x", F, ["n", 2, 6, 6])], [("y", F, ["n", 3, 6, 6])],
                       {"b1": rng.normal(size=4).astype(np.float32), "w2": w2}, opset=11)
    x = rng.normal(size=(2, 2, 6, 6)).astype(np.float32)
    lg = LossGradient(model, ["w1", "b1", "w2"], {"x": x.shape}, loss="mse")
    # MSE of a linear chain is quadratic in each single weight: the central difference is exact
    _check(lg, {"x": x}, {TARGET: rng.normal(size=(2, 3, 6, 6)).astype(np.float32)}, h=0.05, rtol=2e-3, atol=1e-5)


def test_op_without_rule_names_the_op():
    rng = np.random.default_rng(5)
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Round", ["h"], ["y"])],
                       [("x", D, ["n", 3])], [("y", D, ["n", 3])], {"W": rng.normal(size=(3, 3))}, opset=17)
    onnx_ad_rules = __import__("onnx_ad.rules", fromlist=["REVERSE"]).REVERSE
    assert "Round" in onnx_ad_rules  # Round has a (zero) rule; a custom-domain op has none
    model.graph.node[1].op_type, model.graph.node[1].domain = "Frobnicate", "custom"
    model.opset_import.append(helper.make_opsetid("custom", 1))
    with pytest.raises(UnsupportedOp) as info:
        LossGradient(model, ["W"], {"x": (2, 3)}, loss="mse")
    assert info.value.op_type == "Frobnicate" and "Frobnicate" in str(info.value)
    grouped = make_model([helper.make_node("Conv", ["x", "w"], ["y"], group=2)], [("x", F, ["n", 2, 5, 5])],
                         [("y", F, ["n", 2, 3, 3])], {"w": np.ones((2, 1, 3, 3), np.float32)}, opset=17)
    with pytest.raises(UnsupportedOp) as info:  # onnx_ad has no rule for a grouped conv's weight
        LossGradient(grouped, ["w"], {"x": (1, 2, 5, 5)}, loss="mse")
    assert info.value.op_type == "Conv"


def _float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with every float tensor, input and output in float64."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, tensor in enumerate(out.graph.initializer):
        if tensor.data_type == F:
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float64),
                                                                      tensor.name))
    for value in list(out.graph.input) + list(out.graph.output) + list(out.graph.value_info):
        if value.type.tensor_type.elem_type == F:
            value.type.tensor_type.elem_type = D
    return out


def test_real_model_slice_compressed_digits_head_float64():
    """The compressed digits CNN's head (Flatten output -> factors -> logits), KL on logits."""
    import onnx_lrsd

    calib = np.load(DIGITS.parent / "digits_calib.npz")["input"][:32]
    compressed = onnx_lrsd.compress(DIGITS, calibration=[{"input": calib}], keep=0.1, verify=False,
                                    calib_samples=32, calib_batch=32).model
    flatten = next(n for n in compressed.graph.node if n.op_type == "Flatten")
    head = onnx.utils.Extractor(compressed).extract_model([flatten.output[0]], [compressed.graph.output[0].name])
    head = _float64(head)
    trainable = [t.name for t in head.graph.initializer if "/lrsd/" in t.name]
    assert len(trainable) >= 2
    rng = np.random.default_rng(6)
    x = np.abs(rng.normal(size=(4, 3136)))
    lg = LossGradient(head, trainable, {flatten.output[0]: x.shape}, loss="kl")
    p = _softmax(rng.normal(size=(4, 10)))
    _check(lg, {flatten.output[0]: x}, _kl_targets(p), h=1e-6, rtol=1e-5, atol=1e-9, per_tensor=4)
