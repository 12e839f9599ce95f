"""Coupled channel groups, the narrowing rewrite and prune_model on synthetic graphs, checked
against onnxruntime."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from helpers.graphs import Builder
from onnx_lrsd.model.channel_groups import find_channel_groups
from onnx_lrsd.model.graph import export_model, import_graph, model_template
from onnx_lrsd.model.narrow import GroupPlan, narrow_graph
from onnx_lrsd.passes.prune import PruneOptions, channel_groups, group_statistics, prune_model

IR = {7: 4, 11: 6, 13: 7, 17: 8, 21: 10}


def ffn_model(opset=17, seed=0):
    """x [batch, seq, 16] → MatMul → Add → Erf-GELU → MatMul → Add → residual Add → y; a
    query branch that reshapes into heads → q."""
    b = Builder(seed=seed)
    x = b.input("x", ["batch", "seq", 16])
    b.node("MatMul", [x, b.init("W1", b.randn(16, 24, scale=0.5))], ["h0"], name="up")
    b.node("Add", ["h0", b.init("b1", b.randn(24))], ["h1"], name="up_bias")
    b.node("Mul", ["h1", b.init("inv_sqrt2", np.asarray([0.70710677], np.float32))], ["g0"], name="gelu_scale")
    b.node("Erf", ["g0"], ["g1"], name="gelu_erf")
    b.node("Add", ["g1", b.init("one", np.asarray([1.0], np.float32))], ["g2"], name="gelu_one")
    b.node("Mul", ["h1", "g2"], ["g3"], name="gelu_mul")
    b.node("Mul", ["g3", b.init("half", np.asarray(0.5, np.float32))], ["g4"], name="gelu_half")
    b.node("MatMul", ["g4", b.init("W2", b.randn(24, 16, scale=0.3))], ["o0"], name="down")
    b.node("Add", ["o0", b.init("b2", b.randn(16))], ["o1"], name="down_bias")
    b.node("Add", ["o1", x], ["y"], name="residual")
    b.node("MatMul", [x, b.init("Wq", b.randn(16, 16))], ["q0"], name="query")
    b.node("Reshape", ["q0", b.init("heads", np.asarray([0, 0, 2, 8], np.int64))], ["q"], name="split_heads")
    b.output("y", ["batch", "seq", 16])
    b.output("q", ["batch", "seq", 2, 8])
    return b.model(opset, IR[opset], metadata={"note": "kept"})


def mobile_model(opset=13, seed=0):
    """Conv 3→8 (Constant weight) → BN → hard-swish → per-channel scale → depthwise 3×3 →
    Relu → squeeze-excitation (GAP, 1×1 8→4, Relu, 1×1 4→8, HardSigmoid, Mul) → Conv 8→6 3×3
    → Relu → Conv 6→5 1×1 → y."""
    b = Builder(seed=seed)
    x = b.input("x", ["batch", 3, 10, 12])
    b.node("Conv", [x, b.weight("stem_w", b.randn(8, 3, 3, 3, scale=0.4), "constant")], ["s0"], name="stem",
           kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    bn = [b.init(f"bn_{k}", v) for k, v in (("scale", b.randn(8) * 0.2 + 1), ("bias", b.randn(8, scale=0.3)),
                                           ("mean", b.randn(8, scale=0.1)), ("var", np.abs(b.randn(8)) + 0.5))]
    b.node("BatchNormalization", ["s0"] + bn, ["s1"], name="bn")
    b.node("Add", ["s1", b.init("three", np.asarray(3.0, np.float32))], ["hs0"], name="hs_add")
    if opset >= 11:
        b.node("Clip", ["hs0", b.init("zero", np.asarray(0.0, np.float32)), b.init("six", np.asarray(6.0, np.float32))],
               ["hs1"], name="hs_clip")
    else:
        b.node("Clip", ["hs0"], ["hs1"], name="hs_clip", min=0.0, max=6.0)
    b.node("Mul", ["s1", "hs1"], ["hs2"], name="hs_mul")
    b.node("Div", ["hs2", b.init("six_div", np.asarray([6.0], np.float32))], ["hs3"], name="hs_div")
    b.node("Mul", ["hs3", b.init("scale", (b.randn(1, 8, 1, 1) * 0.3 + 1))], ["c0"], name="channel_scale")
    b.node("Conv", ["c0", b.init("dw_w", b.randn(8, 1, 3, 3, scale=0.4)), b.init("dw_b", b.randn(8, scale=0.1))],
           ["d0"], name="depthwise", kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=8)
    b.node("Relu", ["d0"], ["d1"], name="dw_relu")
    b.node("GlobalAveragePool", ["d1"], ["se0"], name="se_pool")
    b.node("Conv", ["se0", b.init("se1_w", b.randn(4, 8, 1, 1, scale=0.5)), b.init("se1_b", b.randn(4, scale=0.1))],
           ["se1"], name="se_reduce", kernel_shape=[1, 1])
    b.node("Relu", ["se1"], ["se2"], name="se_relu")
    b.node("Conv", ["se2", b.init("se2_w", b.randn(8, 4, 1, 1, scale=0.5)), b.init("se2_b", b.randn(8, scale=0.1))],
           ["se3"], name="se_expand", kernel_shape=[1, 1])
    b.node("HardSigmoid", ["se3"], ["se4"], name="se_gate")
    b.node("Mul", ["d1", "se4"], ["e0"], name="se_mul")
    b.node("Conv", ["e0", b.init("mid_w", b.randn(6, 8, 3, 3, scale=0.3))], ["m0"], name="mid",
           kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    b.node("Relu", ["m0"], ["m1"], name="mid_relu")
    b.node("Conv", ["m1", b.init("head_w", b.randn(5, 6, 1, 1, scale=0.5)), b.init("head_b", b.randn(5))], ["y"],
           name="head", kernel_shape=[1, 1])
    b.output("y", ["batch", 5, 10, 12])
    return b.model(opset, IR[opset])


def run(model, feeds):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def ffn_feeds(rng, batch=2, seq=5):
    return {"x": rng.standard_normal((batch, seq, 16)).astype(np.float32)}


def mobile_feeds(rng, batch=2):
    return {"x": rng.standard_normal((batch, 3, 10, 12)).astype(np.float32)}


def groups_by_name(model):
    groups, blocked = find_channel_groups(import_graph(model))
    return {g.name: g for g in groups}, {b.name: b for b in blocked}


def test_ffn_group_and_blocked_reasons():
    groups, blocked = groups_by_name(ffn_model())
    assert set(groups) == {"up"}
    up = groups["up"]
    assert up.channels == 24 and up.producers == ("up",) and up.consumers == ("down",) and not up.channel_first
    assert {(p.node, p.index, p.axis) for p in up.params} == {("up", 1, 1), ("up_bias", 1, 0)}
    assert "LayerNorm" not in blocked["down"].reason and "graph output" in blocked["down"].reason
    assert "Reshape" in blocked["query"].reason


def test_mobile_groups_join_depthwise_and_squeeze_excitation():
    groups, blocked = groups_by_name(mobile_model())
    assert set(groups) == {"stem", "se_reduce", "mid"}
    stem = groups["stem"]
    assert set(stem.producers) == {"stem", "se_expand"} and set(stem.consumers) == {"se_reduce", "mid"}
    assert stem.depthwise == ("depthwise",) and stem.channel_first
    sliced = {(p.node, p.index) for p in stem.params}
    assert {("bn", 1), ("bn", 4), ("channel_scale", 1), ("depthwise", 1), ("depthwise", 2),
            ("se_expand", 1), ("se_expand", 2), ("stem", 1)} <= sliced
    assert groups["se_reduce"].consumers == ("se_expand",)
    assert groups["mid"].consumers == ("head",)
    assert "graph output" in blocked["head"].reason


def zero_inputs(model, weights_and_blocks, dropped):
    """A copy of `model` whose named consumer weights have the `dropped` input channels zeroed."""
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(model)
    for init in zeroed.graph.initializer:
        if init.name in weights_and_blocks:
            w = numpy_helper.to_array(init).copy()
            axis = weights_and_blocks[init.name]
            index = [slice(None)] * w.ndim
            index[axis] = dropped
            w[tuple(index)] = 0
            init.CopyFrom(numpy_helper.from_array(w, init.name))
    return zeroed


@pytest.mark.parametrize("opset", [11, 13, 17, 21])
def test_ffn_cut_equals_zeroed_consumer_and_full_width_is_exact(opset):
    model = ffn_model(opset)
    rng = np.random.default_rng(1)
    kept = np.sort(rng.choice(24, 10, replace=False))
    graph = import_graph(model)
    (group,), _ = find_channel_groups(graph)
    narrow_graph(graph, [GroupPlan(group, kept)])
    narrowed = export_model(graph, model_template(model))
    onnx.checker.check_model(narrowed)
    reference = zero_inputs(model, {"W2": 0}, np.setdiff1d(np.arange(24), kept))
    for batch, seq in ((1, 3), (4, 7)):
        feeds = ffn_feeds(rng, batch, seq)
        for got, want in zip(run(narrowed, feeds), run(reference, feeds)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert narrowed.graph.output[0].type.tensor_type.shape.dim[1].dim_param == "seq"
    assert {p.key: p.value for p in narrowed.metadata_props} == {"note": "kept"}
    assert numpy_helper.to_array(next(t for t in narrowed.graph.initializer if t.name.startswith("down/lrsd"))
                                 ).shape == (10, 16)
    full = prune_model(model, [ffn_feeds(rng)], PruneOptions(keep=1.0))
    feeds = ffn_feeds(rng, 3, 4)
    for got, want in zip(run(full.model, feeds), run(model, feeds)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("opset", [7, 13, 21])
def test_mobile_cut_equals_zeroed_consumers(opset):
    model = mobile_model(opset)
    rng = np.random.default_rng(2)
    groups, _ = groups_by_name(model)
    kept = {"stem": np.array([0, 2, 3, 6, 7]), "se_reduce": np.array([1, 3]), "mid": np.array([0, 1, 4])}
    graph = import_graph(model)
    narrow_graph(graph, [GroupPlan(groups[name], k) for name, k in kept.items()])
    narrowed = export_model(graph, model_template(model))
    onnx.checker.check_model(narrowed)
    dropped = lambda name, c: np.setdiff1d(np.arange(c), kept[name])  # noqa: E731
    reference = zero_inputs(model, {"mid_w": 1, "se1_w": 1}, dropped("stem", 8))
    reference = zero_inputs(reference, {"se2_w": 1}, dropped("se_reduce", 4))
    reference = zero_inputs(reference, {"head_w": 1}, dropped("mid", 6))
    for batch in (1, 3):
        feeds = mobile_feeds(rng, batch)
        np.testing.assert_allclose(run(narrowed, feeds)[0], run(reference, feeds)[0], rtol=1e-5, atol=1e-5)
    depthwise = next(n for n in narrowed.graph.node if n.name == "depthwise")
    assert next(a.i for a in depthwise.attribute if a.name == "group") == 5


def _pruned_error(model, calibration, held_out):
    """error(**PruneOptions): the relative output error on `held_out` of the model pruned with
    those options (group statistics collected once)."""
    want = run(model, held_out)[0]
    groups, _ = channel_groups(model)
    stats = group_statistics(model, groups, calibration)

    def error(**options):
        pruned = prune_model(model, calibration, PruneOptions(**options), stats=stats).model
        return float(np.linalg.norm(run(pruned, held_out)[0] - want) / np.linalg.norm(want))

    return error


@pytest.mark.parametrize("builder,feeds", [(ffn_model, ffn_feeds), (mobile_model, mobile_feeds)])
def test_refit_lowers_the_output_error_and_more_width_lowers_it_further(builder, feeds):
    model = builder()
    rng = np.random.default_rng(3)
    calibration = [feeds(rng, 8) for _ in range(6)]
    held_out = feeds(np.random.default_rng(99), 16)
    error = _pruned_error(model, calibration, held_out)

    for criterion in ("energy", "nystrom", "greedy"):
        cut, refit = error(keep=0.5, criterion=criterion, refit=False), error(keep=0.5, criterion=criterion)
        assert refit < cut
    errors = [error(keep=k) for k in (0.25, 0.5, 0.75)]
    assert errors[0] > errors[1] > errors[2] > 0
    assert error(keep=1.0) == 0.0


def test_allocate_widths_spares_the_sensitive_group():
    from onnx_lrsd.plan.width import GroupCost, GroupCurve, allocate_widths

    widths = np.arange(17)
    curve = GroupCurve("g", np.arange(16), (1 - widths / 16) ** 2)
    curves = {"a": curve, "b": GroupCurve("b", curve.order, curve.errors)}
    costs = {n: GroupCost(n, 16, params_per_channel=10.0, macs_per_channel=1.0) for n in curves}
    even = allocate_widths(curves, costs, saving=160.0, multiple=1)
    assert sum(16 - k for k in even.values()) * 10 >= 160 and abs(even["a"] - even["b"]) <= 1
    skewed = allocate_widths(curves, costs, saving=160.0, sensitivity={"a": 100.0, "b": 1.0}, multiple=1)
    assert skewed["a"] > skewed["b"] and sum(16 - k for k in skewed.values()) * 10 >= 160
    with pytest.raises(ValueError):
        allocate_widths(curves, costs, saving=1e6, multiple=1)


@pytest.mark.parametrize("kind", ["target_params", "target_macs"])
def test_prune_to_a_params_or_macs_target(kind):
    from onnx_lrsd.plan.cost import count_params, model_macs

    model = mobile_model()
    rng = np.random.default_rng(4)
    calibration = [mobile_feeds(rng, 8) for _ in range(4)]
    measure = count_params if kind == "target_params" else model_macs
    result = prune_model(model, calibration, PruneOptions(multiple=1, **{kind: 0.7}))
    ratio = measure(result.model) / measure(model)
    assert 0.6 < ratio <= 0.702
    assert any(p.width < p.group.channels for p in result.plans)


def attention_model(opset=17, seed=0, heads=4, size=4):
    """x [batch, seq, 16], additive mask [batch, 1, 1, seq] → Q/K/V (MatMul + Add) → Reshape
    [0, 0, H, d] → attention → Reshape [0, 0, H·d] → output projection → y."""
    b = Builder(seed=seed)
    width = heads * size
    x = b.input("x", ["batch", "seq", width])
    mask = b.input("mask", ["batch", 1, 1, "seq"])
    split = b.init("split_heads", np.asarray([0, 0, heads, size], np.int64))
    for role, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        b.node("MatMul", [x, b.init(f"W{role}", b.randn(width, width, scale=0.4))], [f"{role}0"], name=role)
        b.node("Add", [f"{role}0", b.init(f"b{role}", b.randn(width, scale=0.1))], [f"{role}1"], name=f"{role}_bias")
        b.node("Reshape", [f"{role}1", split], [f"{role}2"], name=f"{role}_split")
        b.node("Transpose", [f"{role}2"], [f"{role}3"], name=f"{role}_transpose", perm=perm)
    b.node("MatMul", ["q3", "k3"], ["s0"], name="scores")
    b.node("Mul", ["s0", b.init("scale", np.asarray([size ** -0.5], np.float32))], ["s1"], name="scale_scores")
    b.node("Add", ["s1", mask], ["s2"], name="add_mask")
    b.node("Softmax", ["s2"], ["p"], name="softmax", axis=-1)
    b.node("MatMul", ["p", "v3"], ["c0"], name="context")
    b.node("Transpose", ["c0"], ["c1"], name="context_transpose", perm=[0, 2, 1, 3])
    b.node("Reshape", ["c1", b.init("merge_heads", np.asarray([0, 0, width], np.int64))], ["c2"], name="merge")
    b.node("MatMul", ["c2", b.init("Wo", b.randn(width, width, scale=0.4))], ["o0"], name="out")
    b.node("Add", ["o0", b.init("bo", b.randn(width, scale=0.1))], ["y"], name="out_bias")
    b.output("y", ["batch", "seq", width])
    return b.model(opset, IR[opset])


def attention_feeds(rng, batch=2, seq=5):
    mask = np.zeros((batch, 1, 1, seq), np.float32)
    mask[0, ..., -2:] = -10000.0
    return {"x": rng.standard_normal((batch, seq, 16)).astype(np.float32), "mask": mask}


@pytest.mark.parametrize("opset", [13, 21])
def test_attention_heads_group_cut_equals_zeroed_output_rows(opset):
    model = attention_model(opset)
    groups, blocked = channel_groups(model)
    heads = [g for g in groups if g.block > 1]
    assert len(heads) == 1 and not blocked
    group = heads[0]
    assert group.channels == 4 and group.block == 4 and set(group.producers) == {"q", "k", "v"}
    assert group.consumers == ("out",) and {e.node for e in group.shapes} == {"q_split", "k_split", "v_split", "merge"}
    kept = np.array([1, 3])
    graph = import_graph(model)
    narrow_graph(graph, [GroupPlan(group, kept)])
    narrowed = export_model(graph, model_template(model))
    onnx.checker.check_model(narrowed)
    dropped_rows = np.concatenate([np.arange(h * 4, h * 4 + 4) for h in (0, 2)])
    reference = zero_inputs(model, {"Wo": 0}, dropped_rows)
    rng = np.random.default_rng(5)
    for batch, seq in ((1, 3), (3, 6)):
        feeds = attention_feeds(rng, batch, seq)
        np.testing.assert_allclose(run(narrowed, feeds)[0], run(reference, feeds)[0], rtol=1e-5, atol=1e-5)
    shapes = {t.name: numpy_helper.to_array(t) for t in narrowed.graph.initializer if t.name.endswith("lrsd/shape")}
    assert sorted(tuple(v) for v in shapes.values()) == [(0, 0, 2, 4)] * 3 + [(0, 0, 8)]


def test_attention_heads_refit_beats_cut_and_full_width_is_exact():
    model = attention_model()
    rng = np.random.default_rng(6)
    calibration = [attention_feeds(rng, 8, 6) for _ in range(6)]
    held_out = attention_feeds(np.random.default_rng(60), 8, 6)
    error = _pruned_error(model, calibration, held_out)

    assert error(keep=0.5) < error(keep=0.5, refit=False)
    assert error(keep=1.0) == 0.0
    from onnx_lrsd.errors import LrsdError

    with pytest.raises(LrsdError, match="no channel group"):
        prune_model(model, calibration, PruneOptions(keep=0.5, heads=False))


def test_heads_blocked_when_softmax_mixes_heads():
    model = attention_model()
    for node in model.graph.node:
        if node.op_type == "Softmax":
            node.attribute[0].i = 1
    groups, blocked = channel_groups(model)
    assert not [g for g in groups if g.block > 1]
    assert any("Softmax" in b.reason for b in blocked)


def test_compress_method_prune_through_the_api_and_the_cli(tmp_path):
    from click.testing import CliRunner

    from onnx_lrsd import compress, inspect_model
    from onnx_lrsd.cli import main
    from onnx_lrsd.errors import LrsdError

    model = mobile_model()
    rng = np.random.default_rng(7)
    calibration = [mobile_feeds(rng, 16) for _ in range(6)]  # batches of 16: the fifth is held out
    result = compress(model, calibration=calibration, method="prune", keep=0.5)
    report = result.report
    assert report.params_ratio < 0.6 and {w.name: w.kept for w in report.widths} == {"stem": 4, "se_reduce": 2,
                                                                                    "mid": 3}
    assert report.verified_on == "held-out calibration batches" and 0 < report.output_errors["y"] < 1
    feeds = mobile_feeds(rng, 2)
    assert run(result.model, feeds)[0].shape == (2, 5, 10, 12)
    listed = inspect_model(model)
    assert {g.name for g in listed.channel_groups} == {"stem", "se_reduce", "mid"}
    assert [b.name for b in listed.blocked_groups] == ["head"] and "graph output" in listed.blocked_groups[0].reason
    with pytest.raises(LrsdError, match="calibration"):
        compress(model, method="prune")
    with pytest.raises(LrsdError, match="stages work with keep, target_params and target_macs"):
        compress(model, calibration=calibration, method="prune", max_error=0.5, stages=2)

    path, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(path))
    np.savez(tmp_path / "calib.npz", x=np.concatenate([c["x"] for c in calibration]))
    runner = CliRunner()
    done = runner.invoke(main, ["compress", str(path), "-o", str(out), "--method", "prune", "--target-params", "0.6",
                                "--calib", str(tmp_path / "calib.npz"), "--width-criterion", "nystrom"])
    assert done.exit_code == 0, done.output
    assert "channel groups narrowed" in done.output and out.is_file()
    failed = runner.invoke(main, ["compress", str(path), "-o", str(tmp_path / "no.onnx"), "--method", "prune"])
    assert failed.exit_code == 1 and "calibration" in failed.output and not (tmp_path / "no.onnx").exists()
    listed = runner.invoke(main, ["inspect", str(path)])
    assert listed.exit_code == 0 and "blocked groups 1" in listed.output


def test_sequential_narrowing_repairs_earlier_groups():
    model = mobile_model(seed=3)
    rng = np.random.default_rng(9)
    calibration = [mobile_feeds(rng, 8) for _ in range(6)]
    held_out = mobile_feeds(np.random.default_rng(90), 16)
    want = run(model, held_out)[0]

    def error(**options):
        pruned = prune_model(model, calibration, PruneOptions(keep=0.5, **options)).model
        return float(np.linalg.norm(run(pruned, held_out)[0] - want) / np.linalg.norm(want))

    assert error(sequential=True) < error()
    assert prune_model(model, calibration, PruneOptions(keep=1.0, sequential=True)).plans[0].width == 8


@pytest.mark.parametrize("report_name", ["r.md", "r.html"])
def test_a_width_only_summary_says_what_it_narrowed(tmp_path, report_name):
    """`compress --method prune` factorizes nothing: its summary, Markdown and HTML report say
    which groups it narrowed and how many channels it kept, not "0 of 0 layers factorized"."""
    import html

    from click.testing import CliRunner

    from onnx_lrsd.cli import main

    path, out, report = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / report_name
    onnx.save(mobile_model(), str(path))
    rng = np.random.default_rng(7)
    np.savez(tmp_path / "calib.npz", x=np.concatenate([mobile_feeds(rng, 16)["x"] for _ in range(6)]))
    done = CliRunner().invoke(main, ["compress", str(path), "-o", str(out), "--method", "prune", "--keep", "0.5",
                                     "--calib", str(tmp_path / "calib.npz"), "--report", str(report)])
    assert done.exit_code == 0, done.output
    assert "channel groups narrowed 3 of 3, channels kept 9 of 18: stem 4/8, se_reduce 2/4, mid 3/6" in done.output
    assert "factorized" not in done.output
    text = html.unescape(report.read_text())
    assert "3 of 3 channel groups narrowed, 9 of 18 channels kept" in text
    assert "layers factorized" not in text and "0 of 0" not in text
    assert "Layers" not in text and "Channel groups" in text and "se_reduce" in text


def test_width_methods_in_stages_narrow_the_previous_stage_further():
    """`--stages 2`: prune keeps keep^(1/2) of every group twice (widths against the original's
    channels); prune+lowrank reaches target^(k/2) of the original's MACs at stage k; errors
    are against the original."""
    from onnx_lrsd import compress

    model = mobile_model()
    rng = np.random.default_rng(7)
    calibration = [mobile_feeds(rng, 16) for _ in range(6)]
    staged = compress(model, calibration=calibration, method="prune", keep=0.5, stages=2).report
    assert {(w.name, w.channels, w.kept) for w in staged.widths} == {("stem", 8, 4), ("se_reduce", 4, 2),
                                                                      ("mid", 6, 3)}
    assert len(staged.stages) == 2 and staged.stages[0].params_ratio > staged.stages[1].params_ratio
    both = compress(model, calibration=calibration, method="prune+lowrank", target_macs=0.6, stages=2).report
    first, second = (s.macs_ratio for s in both.stages)
    assert first <= 0.6 ** 0.5 + 0.01 and second < first and second <= 0.61
    assert both.macs_ratio <= 0.61 and all(w.channels == {"stem": 8, "se_reduce": 4, "mid": 6}[w.name]
                                           for w in both.widths)
    x = mobile_feeds(rng, 3)
    want = run(model, x)[0]
    got = run(compress(model, calibration=calibration, method="prune+lowrank", target_macs=0.6, stages=2).model, x)[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1.0


@pytest.mark.parametrize("method,target", [("prune", {"keep": 0.5}), ("prune+lowrank", {"target_params": 0.6})])
def test_width_methods_then_quantize(method, target):
    """`then_quantize` after a width method: the narrowed model is quantized (it was ignored by
    prune and refused by prune+lowrank), errors against the original on the held-out batches."""
    from onnx_lrsd import compress

    model = ffn_model()
    rng = np.random.default_rng(5)
    calibration = [ffn_feeds(rng, 8) for _ in range(6)]
    plain = compress(model, calibration=calibration, method=method, **target)
    result = compress(model, calibration=calibration, method=method, then_quantize="dynamic", **target)
    summary = result.report.quantization
    assert summary is not None and summary.mode == "dynamic" and summary.integer_nodes > 0
    assert summary.output_errors_before == plain.report.output_errors
    assert result.report.output_errors == summary.output_errors and set(summary.output_errors) == {"y", "q"}
    assert {n.op_type for n in result.model.graph.node} & {"MatMulInteger", "DynamicQuantizeLinear"}
    assert summary.int8_weights > 0
    x = ffn_feeds(rng, 3, 7)
    want = run(model, x)[0]
    assert np.linalg.norm(run(result.model, x)[0] - want) / np.linalg.norm(want) < 1.0
