"""Block-wise reconstruction (`onnx_lrsd.recover.blockwise`): cut points of a graph, blocks of
several compressed layers, each block's loss falls, runs repeat for a seed, and the
blocks-then-end-to-end level reports both."""
import numpy as np
import pytest
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnx_lrsd
from helpers.graphs import make_model
from onnx_lrsd.recover.blockwise import choose_blocks, cut_points, recover_at_level as recover_models
from onnx_lrsd.recover.distill import trainable_tensors, with_values
from onnx_lrsd.recover.gradients import prepared_copy
from onnx_lrsd.recover.types import RecoverConfig
from onnx_lrsd.errors import LrsdError

F = TensorProto.FLOAT


def _deep_mlp(seed=0, layers=4, width=96):
    """x → (MatMul, Add, Tanh) × layers → MatMul → y, with a skip from the first hidden layer
    to the second (no cut inside the skip)."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev, size = [], {}, "x", 32
    for i in range(layers):
        inits[f"W{i}"] = (rng.normal(size=(size, width)) / np.sqrt(size)).astype(np.float32)
        inits[f"b{i}"] = (0.1 * rng.normal(size=width)).astype(np.float32)
        nodes += [helper.make_node("MatMul", [prev, f"W{i}"], [f"h{i}"], name=f"fc{i}"),
                  helper.make_node("Add", [f"h{i}", f"b{i}"], [f"a{i}"], name=f"fc{i}_bias"),
                  helper.make_node("Tanh", [f"a{i}"], [f"t{i}"], name=f"act{i}")]
        prev, size = f"t{i}", width
        if i == 1:
            nodes.append(helper.make_node("Add", ["t1", "t0"], ["s1"], name="skip"))
            prev = "s1"
    inits["Wo"] = (rng.normal(size=(width, 8)) / np.sqrt(width)).astype(np.float32)
    nodes.append(helper.make_node("MatMul", [prev, "Wo"], ["y"], name="out"))
    return make_model(nodes, [("x", F, ["n", 32])], [("y", F, ["n", 8])], inits, opset=17)


def _data(n=160, seed=1):
    x = np.random.default_rng(seed).normal(size=(n, 32)).astype(np.float32)
    return [{"x": x[i:i + 16]} for i in range(0, n, 16)]


@pytest.fixture(scope="module")
def pair():
    teacher = _deep_mlp()
    return teacher, onnx_lrsd.compress(teacher, calibration=_data(64, seed=7), keep=0.25, verify=False,
                                       calib_samples=64, calib_batch=16).model


def test_cut_points_skip_the_inside_of_a_residual():
    cuts = [t for _, t in cut_points(_deep_mlp())]
    assert not {"h1", "a1", "t1"} & set(cuts)  # inside the skip: t0 is still read by its Add
    assert {"t0", "s1", "t2", "t3"} <= set(cuts) and "y" not in cuts


def test_blocks_hold_several_compressed_layers(pair):
    _, student = pair
    prepared = prepared_copy(student)
    trainable = trainable_tensors(prepared, "compressed")
    blocks = choose_blocks(prepared, trainable, lambda t: True, size=4)
    assert len(blocks) >= 2 and blocks[-1][1] == "y"
    assert all(a == b for (_, a), (b, _) in zip(blocks, blocks[1:]))  # contiguous
    assert len(choose_blocks(prepared, trainable, lambda t: True, size=1000)) == 1


def test_blockwise_lowers_the_output_error_and_repeats(pair):
    teacher, student = pair
    rng = np.random.default_rng(5)  # factors knocked off their fit, so there is something to recover
    factors = {t.name: np.frombuffer(t.raw_data, np.float32).reshape(t.dims) for t in student.graph.initializer
               if "/lrsd/" in t.name}
    student = with_values(student, {k: v + 0.3 * v.std() * rng.normal(size=v.shape) for k, v in factors.items()})
    config = RecoverConfig(steps=120, lr=3e-3, batch=8, eval_every=10, patience=None, level="blocks", block_size=4)
    first = recover_models(student, teacher, _data(), config)
    again = recover_models(student, teacher, _data(), config)
    r = first.report
    assert r.level.startswith("block-wise (") and int(r.level.split("(")[1].split()[0]) >= 2
    assert r.loss_after < 0.8 * r.loss_before and r.error_after < 0.85 * r.error_before
    assert first.model.SerializeToString() == again.model.SerializeToString()
    both = recover_models(student, teacher, _data(), config.replace(level="blocks+end-to-end")).report
    assert both.level.endswith("+ end-to-end") and both.steps <= 120 and both.error_after < both.error_before


def test_bad_level_is_one_line_error():
    with pytest.raises(LrsdError, match="level must be one of"):
        RecoverConfig(level="layers")


def _masked_mlp(seed=0, layers=3, width=48):
    """x, m → (MatMul, Add, Add mask bias, Tanh) × layers → MatMul → y; the mask bias (1 − m)·(−5)
    is computed once from the input m and read by every layer, as a transformer's attention mask."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Sub", ["one", "m"], ["inverted"], name="mask_sub"),
             helper.make_node("Mul", ["inverted", "big"], ["mask_bias"], name="mask_mul")]
    inits = {"one": np.array(1.0, np.float32), "big": np.array(-5.0, np.float32)}
    prev, size = "x", 16
    for i in range(layers):
        inits[f"W{i}"] = (rng.normal(size=(size, width)) / np.sqrt(size)).astype(np.float32)
        inits[f"b{i}"] = (0.1 * rng.normal(size=width)).astype(np.float32)
        nodes += [helper.make_node("MatMul", [prev, f"W{i}"], [f"h{i}"], name=f"fc{i}"),
                  helper.make_node("Add", [f"h{i}", f"b{i}"], [f"a{i}"], name=f"fc{i}_bias"),
                  helper.make_node("Add", [f"a{i}", "mask_bias"], [f"z{i}"], name=f"mask{i}"),
                  helper.make_node("Tanh", [f"z{i}"], [f"t{i}"], name=f"act{i}")]
        prev, size = f"t{i}", width
    inits["Wo"] = (rng.normal(size=(width, 4)) / np.sqrt(width)).astype(np.float32)
    nodes.append(helper.make_node("MatMul", [prev, "Wo"], ["y"], name="out"))
    return make_model(nodes, [("x", F, ["n", 16]), ("m", F, ["n", width])], [("y", F, ["n", 4])], inits, opset=17)


def _masked_data(n=96, seed=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 16)).astype(np.float32)
    m = (rng.random(size=(n, 48)) < 0.8).astype(np.float32)
    return [{"x": x[i:i + 16], "m": m[i:i + 16]} for i in range(0, n, 16)]


def test_a_tensor_of_the_inputs_alone_read_by_every_layer_does_not_prevent_cuts():
    from onnx_lrsd.recover.blockwise import _block_model, side_tensors

    model = _masked_mlp()
    assert {"m", "inverted", "mask_bias"} <= side_tensors(model) and "t0" not in side_tensors(model)
    assert {"t0", "t1"} <= {t for _, t in cut_points(model)}
    block = _block_model(model, "t0", "t1")
    assert sorted(i.name for i in block.graph.input if i.name not in {t.name for t in block.graph.initializer}) \
        == ["mask_bias", "t0"]
    rng = np.random.default_rng(5)  # the weights knocked off, so there is something to recover
    weights = {t.name: np.frombuffer(t.raw_data, np.float32).reshape(t.dims) for t in model.graph.initializer
               if t.name.startswith("W")}
    student = with_values(model, {k: v + 0.3 * v.std() * rng.normal(size=v.shape) for k, v in weights.items()})
    config = RecoverConfig(steps=60, lr=3e-3, batch=8, eval_every=10, patience=None, level="blocks", block_size=2,
                           trainable="all")
    report = recover_models(student, model, _masked_data(), config).report
    assert int(report.level.split("(")[1].split()[0]) >= 2
    assert report.loss_after < report.loss_before and report.error_after < report.error_before


def test_a_block_input_without_the_batch_axis_becomes_a_constant_of_the_block():
    """A block input computed once per chunk of samples rather than per sample (position terms
    of a transformer: [1, seq, d] from shapes alone) is the same in every chunk: the block takes
    the first chunk's copy as a constant instead of indexing it by sample."""
    from onnx_lrsd.recover.blockwise import _with_shape_only_inputs_fixed

    block = make_model([helper.make_node("Add", ["t", "pos"], ["y"], name="add")],
                       [("t", F, ["n", 3, 4]), ("pos", F, [1, 3, 4])], [("y", F, ["n", 3, 4])], {}, opset=17)
    rng = np.random.default_rng(7)
    pos = rng.normal(size=(1, 3, 4)).astype(np.float32)
    inputs = {"t": rng.normal(size=(20, 3, 4)).astype(np.float32), "pos": np.concatenate([pos] * 3)}  # 3 chunks of 8
    fixed, kept = _with_shape_only_inputs_fixed(block, inputs, n=20, batch=8)
    assert list(kept) == ["t"] and [i.name for i in fixed.graph.input] == ["t"]
    np.testing.assert_array_equal(numpy_helper.to_array(fixed.graph.initializer[-1]), pos)
    same, untouched = _with_shape_only_inputs_fixed(block, {"t": inputs["t"]}, n=20, batch=8)
    assert same is block and list(untouched) == ["t"]
