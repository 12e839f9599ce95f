"""Residual-Add groups (ResNet- and MobileNetV2-style chains joined into one group), squeeze-
excitation biases stored as reshaped vectors, and the flatten of pooled channels into a
classifier: found from the graph, narrowed, and checked against onnxruntime."""
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from helpers.graphs import Builder
from onnx_lrsd.model.channel_groups import find_channel_groups
from onnx_lrsd.model.graph import export_model, import_graph, model_template
from onnx_lrsd.model.narrow import ConsumerRefit, GroupPlan, narrow_graph
from onnx_lrsd.passes.prune import PruneOptions, channel_groups, group_statistics, prune_model

from test_width import IR, run, zero_inputs

HEADS = ("flatten", "reshape", "minus_one", "shape")


def _conv(b, name, x, cin, cout, kernel=1, bias=False, scale=0.4, group=1):
    inputs = [x, b.init(f"{name}_w", b.randn(cout, cin // group, kernel, kernel, scale=scale))]
    if bias:
        inputs.append(b.init(f"{name}_b", b.randn(cout, scale=0.1)))
    b.node("Conv", inputs, [f"{name}_out"], name=name, kernel_shape=[kernel, kernel],
           pads=[kernel // 2] * 4, group=group)
    return f"{name}_out"


def _bn(b, name, x, channels, scale=1.0):
    values = (("scale", b.randn(channels, scale=0.1) + scale), ("bias", b.randn(channels, scale=0.2)),
              ("mean", b.randn(channels, scale=0.1)), ("var", np.abs(b.randn(channels)) * 0.2 + 0.5))
    b.node("BatchNormalization", [x] + [b.init(f"{name}_{k}", v.astype(np.float32)) for k, v in values],
           [f"{name}_out"], name=name)
    return f"{name}_out"


def _relu6(b, name, x, opset):
    if opset >= 11:
        b.node("Clip", [x, b.init(f"{name}_lo", np.asarray(0.0, np.float32)),
                        b.init(f"{name}_hi", np.asarray(6.0, np.float32))], [f"{name}_out"], name=name)
    else:
        b.node("Clip", [x], [f"{name}_out"], name=name, min=0.0, max=6.0)
    return f"{name}_out"


def _classifier(b, x, channels, classes, head, opset, pool=True):
    """Global average pool → [N, C] (Flatten, Reshape [0, C] or [-1, C], or Reshape to Concat(Shape[:1], [C]))
    → MatMul + bias → y."""
    b.node("GlobalAveragePool" if pool else "Identity", [x], ["pooled"], name="pool")
    features = channels if pool else channels * 8 * 9
    if head == "flatten":
        b.node("Flatten", ["pooled"], ["flat"], name="flatten", axis=1)
    elif head in ("reshape", "minus_one"):
        shape = [0, channels] if head == "reshape" else [-1, channels]
        b.node("Reshape", ["pooled", b.init("flat_shape", np.asarray(shape, np.int64))], ["flat"], name="flatten")
    else:
        b.node("Shape", ["pooled"], ["shape"], name="shape")
        if opset >= 10:
            b.node("Slice", ["shape", b.init("slice_start", np.asarray([0], np.int64)), b.init("slice_end", np.asarray([1], np.int64)),
                             b.init("slice_axes", np.asarray([0], np.int64))], ["batch"], name="batch")
        else:
            b.node("Slice", ["shape"], ["batch"], name="batch", starts=[0], ends=[1], axes=[0])
        b.node("Cast", [b.init("width32", np.asarray([channels], np.int32))], ["width"], name="width_cast",
               to=onnx.TensorProto.INT64)
        b.node("Concat", ["batch", "width"], ["flat_shape"], name="flat_shape", axis=0)
        b.node("Reshape", ["pooled", "flat_shape"], ["flat"], name="flatten")
    b.node("MatMul", ["flat", b.init("fc_w", b.randn(features, classes, scale=0.5))], ["logits"], name="fc")
    b.node("Add", ["logits", b.init("fc_b", b.randn(classes, scale=0.1))], ["y"], name="fc_bias")
    b.output("y", ["batch", classes])


def resnet_model(opset=13, head="flatten", seed=0, pool=True):
    """stem Conv 3→8 → BN → Relu, two bottleneck blocks (1×1 8→4, Relu, 3×3 4→8, BN, Add with the
    block input, Relu), pooled classifier 8→5. The 8-channel stream is one group: producers
    stem, b1_c2, b2_c2; readers b1_c1, b2_c1, fc."""
    b = Builder(seed=seed)
    x = b.input("x", ["batch", 3, 8, 9])
    stream = _conv(b, "stem", x, 3, 8, kernel=3)
    stream = _bn(b, "stem_bn", stream, 8)
    b.node("Relu", [stream], ["s0"], name="stem_relu")
    stream = "s0"
    for block in ("b1", "b2"):
        h = _conv(b, f"{block}_c1", stream, 8, 4, bias=True)
        b.node("Relu", [h], [f"{block}_r1"], name=f"{block}_relu1")
        h = _conv(b, f"{block}_c2", f"{block}_r1", 4, 8, kernel=3)
        h = _bn(b, f"{block}_bn", h, 8, scale=0.3)
        b.node("Add", [stream, h], [f"{block}_sum"], name=f"{block}_add")
        b.node("Relu", [f"{block}_sum"], [f"{block}_out"], name=f"{block}_relu2")
        stream = f"{block}_out"
    _classifier(b, stream, 8, 5, head, opset, pool)
    return b.model(opset, IR[opset])


def mobilenet_v2_model(opset=13, seed=0):
    """stem Conv 3→8 → BN (linear bottleneck stream), two inverted residual blocks (1×1 8→16,
    ReLU6, depthwise 3×3, ReLU6, squeeze-excitation whose biases are Reshape(b, [1, C, 1, 1]) of
    [C] vectors, 1×1 16→8, BN, Add), a last 1×1 8→12 with hard-swish, pooled classifier 12→4."""
    b = Builder(seed=seed)
    x = b.input("x", ["batch", 3, 8, 9])
    stream = _bn(b, "stem_bn", _conv(b, "stem", x, 3, 8, kernel=3), 8)
    for block in ("b1", "b2"):
        h = _relu6(b, f"{block}_act1", _bn(b, f"{block}_ebn", _conv(b, f"{block}_expand", stream, 8, 16), 16), opset)
        h = _conv(b, f"{block}_dw", h, 16, 16, kernel=3, group=16, bias=True)
        h = _relu6(b, f"{block}_act2", h, opset)
        b.node("GlobalAveragePool", [h], [f"{block}_se_pool"], name=f"{block}_se_pool")
        gate = f"{block}_se_pool"
        for index, (cin, cout) in enumerate(((16, 4), (4, 16))):
            name = f"{block}_se{index}"
            b.node("Conv", [gate, b.init(f"{name}_w", b.randn(cout, cin, 1, 1, scale=0.5))], [f"{name}_conv"],
                   name=name, kernel_shape=[1, 1])
            b.node("Reshape", [b.init(f"{name}_b", b.randn(cout, scale=0.2)),
                               b.init(f"{name}_bshape", np.asarray([1, cout, 1, 1], np.int64))],
                   [f"{name}_bias"], name=f"{name}_bias_view")
            b.node("Add", [f"{name}_conv", f"{name}_bias"], [f"{name}_biased"], name=f"{name}_add")
            act = "Relu" if index == 0 else "HardSigmoid"
            b.node(act, [f"{name}_biased"], [f"{name}_act"], name=f"{name}_act")
            gate = f"{name}_act"
        b.node("Mul", [h, gate], [f"{block}_gated"], name=f"{block}_se_mul")
        h = _bn(b, f"{block}_pbn", _conv(b, f"{block}_project", f"{block}_gated", 16, 8), 8, scale=0.3)
        b.node("Add", [stream, h], [f"{block}_sum"], name=f"{block}_add")
        stream = f"{block}_sum"
    last = _bn(b, "last_bn", _conv(b, "last", stream, 8, 12), 12)
    b.node("HardSigmoid", [last], ["last_gate"], name="last_gate", alpha=1 / 6, beta=0.5)
    b.node("Mul", [last, "last_gate"], ["last_act"], name="last_swish")
    _classifier(b, "last_act", 12, 4, "flatten", opset)
    return b.model(opset, IR[opset])


def feeds(rng, batch=2):
    return {"x": rng.standard_normal((batch, 3, 8, 9)).astype(np.float32)}


def by_name(model):
    groups, blocked = find_channel_groups(import_graph(model))
    return {g.name: g for g in groups}, {b.name: b for b in blocked}


def narrowed(model, kept):
    groups, _ = by_name(model)
    graph = import_graph(model)
    narrow_graph(graph, [GroupPlan(groups[name], np.asarray(k)) for name, k in kept.items()])
    out = export_model(graph, model_template(model))
    onnx.checker.check_model(out)
    return out


@pytest.mark.parametrize("head", HEADS)
def test_residual_chain_is_one_group_through_the_flatten(head):
    groups, blocked = by_name(resnet_model(head=head))
    stream = groups["stem"]
    assert set(stream.producers) == {"stem", "b1_c2", "b2_c2"}
    assert set(stream.consumers) == {"b1_c1", "b2_c1", "fc"}
    assert set(stream.residual_adds) == {"b1_add", "b2_add"}
    assert set(groups) == {"stem", "b1_c1", "b2_c1"} and set(blocked) == {"fc"}
    assert "graph output" in blocked["fc"].reason
    if head != "flatten":  # the C in the flatten's shape is rewritten
        assert [(e.node, e.position) for e in stream.shapes] == [("flat_shape", 0) if head == "shape" else
                                                                 ("flatten", 1)]


@pytest.mark.parametrize("opset,head", [(7, "shape"), (11, "reshape"), (13, "flatten"), (17, "shape"),
                                        (21, "minus_one")])
def test_residual_cut_equals_zeroed_readers_for_every_batch(opset, head):
    model = resnet_model(opset, head)
    kept = {"stem": [0, 3, 4, 6], "b1_c1": [1, 2], "b2_c1": [0, 3]}
    cut = narrowed(model, kept)
    drop = lambda name, c: np.setdiff1d(np.arange(c), kept[name])  # noqa: E731
    reference = zero_inputs(model, {"b1_c1_w": 1, "b2_c1_w": 1, "fc_w": 0}, drop("stem", 8))
    reference = zero_inputs(reference, {"b1_c2_w": 1}, drop("b1_c1", 4))
    reference = zero_inputs(reference, {"b2_c2_w": 1}, drop("b2_c1", 4))
    rng = np.random.default_rng(opset)
    for batch in (1, 3):
        x = feeds(rng, batch)
        np.testing.assert_allclose(run(cut, x)[0], run(reference, x)[0], rtol=1e-5, atol=1e-5)
    assert cut.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    weights = {t.name: numpy_helper.to_array(t) for t in cut.graph.initializer}
    assert weights["stem/lrsd/weight"].shape[0] == 4 and weights["fc/lrsd/weight"].shape == (4, 5)


@pytest.mark.parametrize("opset", [7, 11, 13, 21])
def test_inverted_residual_with_squeeze_excitation_cut_equals_zeroed_readers(opset):
    model = mobilenet_v2_model(opset)
    groups, blocked = by_name(model)
    stream = groups["stem"]
    assert set(stream.producers) == {"stem", "b1_project", "b2_project"}
    assert set(stream.consumers) == {"b1_expand", "b2_expand", "last"}
    expand = groups["b1_expand"]
    assert set(expand.producers) == {"b1_expand", "b1_se1"} and set(expand.consumers) == {"b1_se0", "b1_project"}
    assert expand.depthwise == ("b1_dw",) and ("b1_se1_bias_view", 0, 0) in {(p.node, p.index, p.axis)
                                                                            for p in expand.params}
    assert set(groups) == {"stem", "b1_expand", "b1_se0", "b2_expand", "b2_se0", "last"} and set(blocked) == {"fc"}
    kept = {"stem": [1, 2, 5, 7], "b1_expand": [0, 2, 3, 5, 8, 9, 13], "b1_se0": [1, 2], "last": [0, 4, 5, 11]}
    cut = narrowed(model, kept)
    drop = lambda name, c: np.setdiff1d(np.arange(c), kept[name])  # noqa: E731
    reference = zero_inputs(model, {"b1_expand_w": 1, "b2_expand_w": 1, "last_w": 1}, drop("stem", 8))
    reference = zero_inputs(reference, {"b1_se0_w": 1, "b1_project_w": 1}, drop("b1_expand", 16))
    reference = zero_inputs(reference, {"b1_se1_w": 1}, drop("b1_se0", 4))
    reference = zero_inputs(reference, {"fc_w": 0}, drop("last", 12))
    rng = np.random.default_rng(opset)
    for batch in (1, 4):
        x = feeds(rng, batch)
        np.testing.assert_allclose(run(cut, x)[0], run(reference, x)[0], rtol=1e-5, atol=1e-5)
    dw = next(n for n in cut.graph.node if n.name == "b1_dw")
    assert next(a.i for a in dw.attribute if a.name == "group") == 7
    shapes = {t.name: numpy_helper.to_array(t) for t in cut.graph.initializer if t.name.endswith("lrsd/shape")}
    assert shapes["b1_se1_bias_view/lrsd/shape"].tolist() == [1, 7, 1, 1]


@pytest.mark.parametrize("builder", [resnet_model, mobilenet_v2_model])
def test_joined_groups_refit_beats_cut_and_full_width_round_trips(builder):
    model = builder()
    rng = np.random.default_rng(11)
    calibration = [feeds(rng, 16) for _ in range(6)]
    held_out = feeds(np.random.default_rng(12), 32)
    want = run(model, held_out)[0]
    groups, _ = channel_groups(model)
    stats = group_statistics(model, groups, calibration)
    stream = next(g.name for g in groups if g.residual_adds)

    def error(keep, **options):
        widths = {g.name: g.channels for g in groups}
        widths[stream] = keep
        pruned = prune_model(model, calibration, PruneOptions(**options), stats=stats, widths=widths).model
        return float(np.linalg.norm(run(pruned, held_out)[0] - want) / np.linalg.norm(want))

    for criterion in ("energy", "nystrom", "greedy"):
        assert error(4, criterion=criterion) < error(4, criterion=criterion, refit=False)
    assert error(3) > error(5) > error(7) > 0
    full = prune_model(model, calibration, PruneOptions(keep=1.0), stats=stats).model
    for batch in (1, 5):
        x = feeds(rng, batch)
        np.testing.assert_array_equal(run(full, x)[0], run(model, x)[0])


def test_a_blocked_branch_blocks_the_whole_chain_and_names_the_residual_add():
    model = resnet_model()
    nodes = list(model.graph.node)
    at = next(i for i, n in enumerate(nodes) if n.name == "b2_bn")
    nodes[at].output[0] = "b2_half_in"  # the second block's branch now ends in a Concat of two halves
    b = Builder()
    b.node("Split", ["b2_half_in"], ["b2_h0", "b2_h1"], name="b2_split", axis=1)
    b.node("Concat", ["b2_h1", "b2_h0"], ["b2_bn_out"], name="b2_concat", axis=1)
    del model.graph.node[:]
    model.graph.node.extend(nodes[:at + 1] + b.nodes + nodes[at + 1:])
    onnx.checker.check_model(model)
    groups, blocked = by_name(model)
    assert "stem" not in groups and "b1_c2" not in groups
    assert set(blocked["stem"].producers) == {"stem", "b1_c2"} and "b1_c2" not in blocked  # one entry per chain
    reason = blocked["stem"].reason
    assert reason.startswith("residual Add 'b2_add' joins a branch where") and "Concat 'b2_concat'" in reason


def fpn_model(opset=13, how="scales"):
    """Two 3→6 convs at 8×8 and 4×4 (strided), the coarse one upsampled ×2 (Resize with scales or
    sizes, or Upsample before opset 10) and added to the fine one, read by a 1×1 6→5 conv → y.
    The two convs, joined through the upsample and the Add, are one group."""
    b = Builder(seed=4)
    x = b.input("x", [1 if how == "sizes" else "batch", 3, 8, 8])
    fine = _conv(b, "fine", x, 3, 6, kernel=3)
    b.node("Conv", [x, b.init("coarse_w", b.randn(6, 3, 3, 3, scale=0.4))], ["coarse_out"], name="coarse",
           kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2])
    scales = b.init("scales", np.asarray([1, 1, 2, 2], np.float32))
    if opset < 9:
        b.node("Upsample", ["coarse_out"], ["up"], name="up", scales=[1.0, 1.0, 2.0, 2.0])
    elif opset < 10:
        b.node("Upsample", ["coarse_out", scales], ["up"], name="up")
    elif how == "sizes":
        b.node("Resize", ["coarse_out", "", "", b.init("sizes", np.asarray([1, 6, 8, 8], np.int64))], ["up"], name="up")
    else:
        b.node("Resize", ["coarse_out", b.init("roi", np.zeros(0, np.float32)), scales], ["up"], name="up")
    b.node("Add", [fine, "up"], ["merged"], name="merge")
    b.node("Conv", ["merged", b.init("head_w", b.randn(5, 6, 1, 1, scale=0.5))], ["y"], name="head",
           kernel_shape=[1, 1])
    b.output("y", [1 if how == "sizes" else "batch", 5, 8, 8])
    return b.model(opset, IR.get(opset, 3 if opset < 9 else 4))


@pytest.mark.parametrize("opset,how", [(7, "scales"), (9, "scales"), (13, "scales"), (13, "sizes"),
                                       (21, "scales")])
def test_upsampled_branch_joins_the_group_and_cut_equals_zeroed_reader(opset, how):
    model = fpn_model(opset, how)
    groups, _ = by_name(model)
    assert set(groups["fine"].producers) == {"fine", "coarse"} and groups["fine"].consumers == ("head",)
    assert groups["fine"].residual_adds == ("merge",)
    cut = narrowed(model, {"fine": [0, 2, 5]})
    reference = zero_inputs(model, {"head_w": 1}, np.array([1, 3, 4]))
    x = {"x": np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(run(cut, x)[0], run(reference, x)[0], rtol=1e-5, atol=1e-5)
    if how == "sizes":
        sizes = next(numpy_helper.to_array(t) for t in cut.graph.initializer if t.name.startswith("up/lrsd"))
        assert sizes.tolist() == [1, 3, 8, 8]


def test_a_flatten_with_a_spatial_extent_blocks_the_chain():
    model = resnet_model(pool=False)
    x = feeds(np.random.default_rng(0))
    assert run(model, x)[0].shape == (2, 5)
    groups, blocked = by_name(model)
    assert "stem" not in groups
    assert blocked["stem"].reason == "Flatten 'flatten' flattens channels with a spatial extent"
    assert set(blocked["stem"].producers) == {"stem", "b1_c2", "b2_c2"}


def test_a_refit_bias_shift_lands_in_the_reshaped_bias_that_follows_the_reader():
    """b1_se1 (no bias of its own, followed by Add(Reshape(b, [1, 16, 1, 1]))) gets a refit:
    its shift is added to the vector b (so onnxruntime can still fold the Add into the conv)."""
    model = mobilenet_v2_model()
    groups, _ = by_name(model)
    group = groups["b1_se0"]
    kept = np.array([0, 2, 3])
    rng = np.random.default_rng(5)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    new_w, shift = rng.standard_normal((3, 16)), rng.standard_normal(16)
    graph = import_graph(model)
    narrow_graph(graph, [GroupPlan(group, kept, (ConsumerRefit("b1_se1", new_w, shift),))])
    cut = export_model(graph, model_template(model))
    onnx.checker.check_model(cut)
    assert len(next(n for n in cut.graph.node if n.name == "b1_se1").input) == 2  # no bias input was added
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    for init in reference.graph.initializer:
        if init.name in ("b1_se1_w", "b1_se1_b"):
            w = weights[init.name].copy()
            if init.name == "b1_se1_b":
                w += shift.astype(np.float32)
            else:
                w[:] = 0
                w[:, kept, 0, 0] = new_w.T
            init.CopyFrom(numpy_helper.from_array(w, init.name))
    x = feeds(rng, 3)
    np.testing.assert_allclose(run(cut, x)[0], run(reference, x)[0], rtol=1e-5, atol=1e-5)


def test_inspect_lists_each_groups_residual_adds_and_the_blocked_reasons(tmp_path):
    from click.testing import CliRunner

    from onnx_lrsd.cli import main

    runner = CliRunner()
    joined, blocked = tmp_path / "joined.onnx", tmp_path / "blocked.onnx"
    onnx.save(resnet_model(), str(joined))
    onnx.save(resnet_model(pool=False), str(blocked))
    listed = runner.invoke(main, ["inspect", str(joined)])
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    groups = lines[lines.index("channel groups 3 (narrowed together by prune):") + 1:]
    assert "  stem  8 channels: stem, b1_c2, b2_c2 -> b1_c1, b2_c1, fc  residual Adds b1_add, b2_add" in groups
    assert "  b1_c1  4 channels: b1_c1 -> b1_c2" in groups
    assert "blocked groups 1:" in lines and "  fc  5: 'y' is a graph output" in lines
    as_json = json.loads(runner.invoke(main, ["inspect", str(joined), "--json"]).output)
    assert {g["name"]: g["residual_adds"] for g in as_json["channel_groups"]}["stem"] == ["b1_add", "b2_add"]
    listed = runner.invoke(main, ["inspect", str(blocked)])
    assert listed.exit_code == 0 and \
        "  stem  8: Flatten 'flatten' flattens channels with a spatial extent" in listed.output.splitlines()
