"""Channel Concats join groups: each part keeps its own group, the readers of the concatenated
tensor are consumers at the part's offset; narrowed, refitted and checked against onnxruntime."""
import numpy as np
import pytest
from onnx import numpy_helper

from helpers.graphs import Builder
from onnx_lrsd.decompose.channels import refit_error
from onnx_lrsd.model.channel_groups import find_channel_groups
from onnx_lrsd.model.graph import import_graph
from onnx_lrsd.passes.prune import PruneOptions, channel_groups, group_statistics, prune_model
from onnx_lrsd.plan.width import group_consumers

from test_channel_groups import by_name, narrowed
from test_width import IR, run, zero_inputs


def conv_concat_model(opset=13, axis=1, with_input=False, after="Relu", seed=0, unknown_rank=False):
    """x [batch, 3, 8, 9] → branch a: Conv 3→4 (3×3, bias) → Relu; branch b: Conv 3→5 → BN;
    Concat(a, [x,] b) on `axis` → `after` (an op on the concatenated tensor, or None) → head
    Conv (3×3, bias) → y. Groups a and b; head reads a at offset 0, b at 4 (7 with x between)."""
    b = Builder(seed=seed)
    x = b.input("x", ["batch", 3, 8, 9])
    b.node("Conv", [x, b.init("a_w", b.randn(4, 3, 3, 3, scale=0.4)), b.init("a_b", b.randn(4, scale=0.1))],
           ["a_conv"], name="a", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    b.node("Relu", ["a_conv"], ["a_out"], name="a_relu")
    b_in = x
    if unknown_rank:  # b's tensors get no recorded shape: its channel count comes from its weight
        b.node("Reshape", [x, b.input("shape", ["rank"], np.int64)], ["x_view"], name="x_view")
        b_in = "x_view"
    b.node("Conv", [b_in, b.init("b_w", b.randn(5, 3, 1, 1, scale=0.5))], ["b_conv"], name="b", kernel_shape=[1, 1])
    bn = [b.init(f"bn_{k}", v.astype(np.float32)) for k, v in (
        ("scale", b.randn(5, scale=0.1) + 1), ("bias", b.randn(5, scale=0.2)), ("mean", b.randn(5, scale=0.1)),
        ("var", np.abs(b.randn(5)) * 0.2 + 0.5))]
    b.node("BatchNormalization", ["b_conv"] + bn, ["b_out"], name="b_bn")
    parts = ["a_out", x, "b_out"] if with_input else ["a_out", "b_out"]
    b.node("Concat", parts, ["cat"], name="cat", axis=axis)
    width = 12 if with_input else 9
    read = "cat"
    if after == "Relu":
        b.node("Relu", ["cat"], ["cat_act"], name="cat_relu")
        read = "cat_act"
    elif after == "Reshape":
        b.node("Reshape", ["cat", b.init("cat_shape", np.asarray([0, width, -1], np.int64))], ["cat_flat"],
               name="cat_reshape")
        b.output("cat_flat", ["batch", width, 72])
    elif after == "output":
        b.output("cat", ["batch", width, 8, 9])
    b.node("Conv", [read, b.init("head_w", b.randn(6, width, 3, 3, scale=0.3)), b.init("head_b", b.randn(6))],
           ["y"], name="head", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    b.output("y", ["batch", 6, 8, 9])
    return b.model(opset, IR[opset])


def matmul_concat_model(opset=17, axis=-1):
    """x [batch, seq, 6] → up1 MatMul 6→8 + bias → Relu; up2 MatMul 6→5; Concat on `axis` →
    down MatMul 13→7 + bias → y: groups up1 (offset 0) and up2 (offset 8) read by down."""
    b = Builder(seed=2)
    b.input("x", ["batch", "seq", 6])
    b.node("MatMul", ["x", b.init("up1_w", b.randn(6, 8, scale=0.5))], ["up1_out"], name="up1")
    b.node("Add", ["up1_out", b.init("up1_b", b.randn(8, scale=0.1))], ["up1_biased"], name="up1_bias")
    b.node("Relu", ["up1_biased"], ["h1"], name="up1_relu")
    b.node("MatMul", ["x", b.init("up2_w", b.randn(6, 5, scale=0.5))], ["h2"], name="up2")
    b.node("Concat", ["h1", "h2"], ["cat"], name="cat", axis=axis)
    b.node("MatMul", ["cat", b.init("down_w", b.randn(13, 7, scale=0.4))], ["down_out"], name="down")
    b.node("Add", ["down_out", b.init("down_b", b.randn(7, scale=0.1))], ["y"], name="down_bias")
    b.output("y", ["batch", "seq", 7])
    return b.model(opset, IR[opset])


def conv_feeds(rng, batch=2):
    return {"x": rng.standard_normal((batch, 3, 8, 9)).astype(np.float32)}


@pytest.mark.parametrize("axis", [1, -3])
@pytest.mark.parametrize("with_input", [False, True])
def test_concat_parts_keep_their_groups_and_the_reader_reads_each_at_its_offset(axis, with_input):
    groups, blocked = by_name(conv_concat_model(axis=axis, with_input=with_input))
    assert set(groups) == {"a", "b"} and set(blocked) == {"head"}
    assert groups["a"].consumers == groups["b"].consumers == ("head",)
    width = 12 if with_input else 9
    assert groups["a"].read_at("head") == (0, width)
    assert groups["b"].read_at("head") == (7 if with_input else 4, width)
    assert groups["a"].concats == groups["b"].concats == ("cat",)
    assert groups["b"].producers == ("b",) and groups["b"].channels == 5


def test_a_part_without_a_recorded_shape_is_counted_from_its_layer():
    model = conv_concat_model(unknown_rank=True)
    graph = import_graph(model)
    assert graph.tensors()["b_out"].shape is None
    groups, _ = find_channel_groups(graph)
    assert {g.name: g.read_at("head") for g in groups} == {"a": (0, 9), "b": (4, 9)}


@pytest.mark.parametrize("opset,axis,with_input", [(7, 1, False), (11, -3, True), (13, 1, True), (21, -3, False)])
def test_concat_cut_equals_zeroed_reader_rows_for_every_batch(opset, axis, with_input):
    model = conv_concat_model(opset, axis, with_input)
    kept = {"a": [0, 3], "b": [1, 2, 4]}
    cut = narrowed(model, kept)
    offset_b = 7 if with_input else 4
    dropped = np.concatenate([np.setdiff1d(np.arange(4), kept["a"]), offset_b + np.setdiff1d(np.arange(5), kept["b"])])
    reference = zero_inputs(model, {"head_w": 1}, dropped)
    rng = np.random.default_rng(opset)
    for batch in (1, 3):
        x = conv_feeds(rng, batch)
        np.testing.assert_allclose(run(cut, x)[0], run(reference, x)[0], rtol=1e-5, atol=1e-5)
    assert cut.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    weights = {t.name: numpy_helper.to_array(t) for t in cut.graph.initializer}
    assert weights["head/lrsd/weight"].shape == (6, 5 + (3 if with_input else 0), 3, 3)
    # only one part narrowed: the other part's rows stay in place
    only_b = narrowed(model, {"b": kept["b"]})
    reference = zero_inputs(model, {"head_w": 1}, offset_b + np.setdiff1d(np.arange(5), kept["b"]))
    x = conv_feeds(rng, 2)
    np.testing.assert_allclose(run(only_b, x)[0], run(reference, x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("opset,axis", [(11, -1), (13, 2), (21, -1)])
def test_matmul_concat_on_the_last_axis_cut_equals_zeroed_rows_for_dynamic_dims(opset, axis):
    model = matmul_concat_model(opset, axis)
    groups, blocked = by_name(model)
    assert set(groups) == {"up1", "up2"} and groups["up2"].read_at("down") == (8, 13)
    cut = narrowed(model, {"up1": [1, 2, 5, 7], "up2": [0, 4]})
    dropped = np.concatenate([np.setdiff1d(np.arange(8), [1, 2, 5, 7]), 8 + np.array([1, 2, 3])])
    reference = zero_inputs(model, {"down_w": 0}, dropped)
    rng = np.random.default_rng(opset)
    for batch, seq in ((1, 3), (4, 7)):
        x = {"x": rng.standard_normal((batch, seq, 6)).astype(np.float32)}
        np.testing.assert_allclose(run(cut, x)[0], run(reference, x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("after,reason", [
    ("output", "the output 'cat' of Concat 'cat' is a graph output"),
    ("Reshape", "Reshape 'cat_reshape' reads the output of Concat 'cat' not through a weight")])
def test_a_concat_also_read_otherwise_blocks_its_parts(after, reason):
    groups, blocked = by_name(conv_concat_model(after=after))
    assert "a" not in groups and "b" not in groups
    assert blocked["a"].reason == reason and blocked["b"].reason == reason


def test_a_concat_along_another_axis_blocks():
    """Two 3→4 convs stacked along the height (axis 2), read by a 4→6 conv."""
    b = Builder(seed=1)
    b.input("x", ["batch", 3, 8, 9])
    for name in ("a", "c"):
        b.node("Conv", ["x", b.init(f"{name}_w", b.randn(4, 3, 1, 1))], [f"{name}_out"], name=name,
               kernel_shape=[1, 1])
    b.node("Concat", ["a_out", "c_out"], ["cat"], name="cat", axis=2)
    b.node("Conv", ["cat", b.init("head_w", b.randn(6, 4, 1, 1))], ["y"], name="head", kernel_shape=[1, 1])
    b.output("y", ["batch", 6, 16, 9])
    groups, blocked = by_name(b.model(13, IR[13]))
    assert not groups
    assert blocked["a"].reason == blocked["c"].reason == "Concat 'cat' joins along axis 2, not the channel axis"


@pytest.mark.parametrize("with_input", [False, True])
def test_concat_refit_reproduces_the_part_and_full_width_round_trips(with_input):
    """Narrowing one part with the refit: the measured output error on the calibration data is
    the closed-form error of that part's rows of the head's Gram; the refit beats the cut; and
    sequential narrowing runs through the Concat too."""
    model = conv_concat_model(with_input=with_input, after=None)
    rng = np.random.default_rng(7)
    calibration = [conv_feeds(rng, 4) for _ in range(3)]
    groups, _ = channel_groups(model)
    stats = group_statistics(model, groups, calibration)
    by = {g.name: g for g in groups}
    reference = np.concatenate([run(model, x)[0] for x in calibration])

    def mse(pruned):
        out = np.concatenate([run(pruned, x)[0] for x in calibration])
        return float(np.mean(np.sum((out.astype(np.float64) - reference) ** 2, axis=1)))

    for name, keep in (("b", 2), ("a", 2)):
        widths = {g.name: g.channels for g in groups}
        widths[name] = keep
        result = prune_model(model, calibration, PruneOptions(), stats=stats, widths=widths)
        plan = next(p for p in result.plans if p.group.name == name)
        part = group_consumers(by[name], stats)[0]
        predicted = refit_error(part, plan.kept)
        assert mse(result.model) == pytest.approx(predicted, rel=1e-3)
        cut = prune_model(model, calibration, PruneOptions(refit=False), stats=stats, widths=widths).model
        assert mse(result.model) < 0.9 * mse(cut)
    sequential = prune_model(model, calibration, PruneOptions(keep=0.5, sequential=True)).model
    both_cut = prune_model(model, calibration, PruneOptions(keep=0.5, refit=False), stats=stats).model
    assert mse(sequential) < mse(both_cut)
    full = prune_model(model, calibration, PruneOptions(keep=1.0), stats=stats).model
    for batch in (1, 5):
        x = conv_feeds(rng, batch)
        np.testing.assert_array_equal(run(full, x)[0], run(model, x)[0])


def test_inspect_names_the_concat_of_each_part():
    from onnx_lrsd import inspect_model

    listed = inspect_model(conv_concat_model(with_input=True))
    assert {g.name: g.concats for g in listed.channel_groups} == {"a": ("cat",), "b": ("cat",)}
    assert "  b  5 channels: b -> head  Concat cat" in listed.to_text().splitlines()


@pytest.mark.parametrize("method,kind", [("prune", "target_params"), ("prune", "target_macs"),
                                         ("prune+lowrank", "target_macs")])
def test_targets_are_met_with_readers_of_a_concat(method, kind):
    """The allocations cost a Concat reader's rows with the group that owns them: the written
    model meets the target (MACs at the data's dims) and stays close to the original."""
    from onnx_lrsd import compress

    model = conv_concat_model(with_input=True, after=None)
    rng = np.random.default_rng(3)
    calibration = [conv_feeds(rng, 8) for _ in range(6)]
    result = compress(model, calibration=calibration, method=method, **{kind: 0.7})
    ratio = result.report.params_ratio if kind == "target_params" else result.report.macs_ratio
    assert ratio <= 0.7 + 0.01
    assert any(w.kept < w.channels for w in result.report.widths)
    x = conv_feeds(rng, 3)
    want = run(model, x)[0]
    assert np.linalg.norm(run(result.model, x)[0] - want) / np.linalg.norm(want) < 0.5
