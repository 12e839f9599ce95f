"""One allocation over channel-group widths and low-rank factorizations (`method="prune+lowrank"`):
the greedy allocation on synthetic units, and whole runs on a synthetic two-block FFN checked
against onnxruntime."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from helpers.graphs import Builder
from onnx_lrsd.plan.width_and_rank import (RankUnit, WidthRankAllocation, WidthUnit, allocate_width_and_rank,
                                           layer_cost)

HIDDEN, INNER = 32, 128


def units():
    """Two groups (one fragile), three layers: `up` writes group g1, `down` reads it, `other`
    stands alone; params as costs."""
    widths = tuple(range(16, INNER + 1, 16))
    groups = [WidthUnit("g1", INNER, widths, tuple(0.05 * (1 - k / INNER) ** 2 for k in widths), 1.0),
              WidthUnit("g2", INNER, widths, tuple(5.0 * (1 - k / INNER) for k in widths), 1.0)]
    ranks = (4, 8, 16)
    layers = [RankUnit("up", HIDDEN, INNER, HIDDEN * INNER, tuple(r * (HIDDEN + INNER) for r in ranks),
                       tuple(0.5 / r for r in ranks), out_group="g1"),
              RankUnit("down", INNER, HIDDEN, HIDDEN * INNER, tuple(r * (HIDDEN + INNER) for r in ranks),
                       tuple(0.5 / r for r in ranks), in_group="g1"),
              RankUnit("other", 64, 64, 64 * 64, tuple(r * 128 for r in ranks), tuple(0.001 / r for r in ranks))]
    return groups, layers


def total_cost(groups, layers, found: WidthRankAllocation) -> float:
    """The allocation's cost recomputed from its widths and choices."""
    scale = {g.name: found.widths[g.name] / g.channels for g in groups}
    return (sum(found.widths[g.name] * g.cost_per_channel for g in groups)
            + sum(layer_cost(u, found.choices[u.name], scale.get(u.in_group, 1.0), scale.get(u.out_group, 1.0))
                  for u in layers))


@pytest.mark.parametrize("share", [0.8, 0.6, 0.4])
def test_budget_is_met_and_the_fragile_group_is_spared(share):
    groups, layers = units()
    full = total_cost(groups, layers, WidthRankAllocation({g.name: g.channels for g in groups},
                                                          {u.name: 0 for u in layers}, 0, 0))
    found = allocate_width_and_rank(groups, layers, budget=share * full)
    assert found.reached and found.cost <= share * full + 1e-6
    assert found.cost == pytest.approx(total_cost(groups, layers, found))
    assert found.widths["g2"] == INNER  # 100x more damage per channel than g1
    assert found.choices["other"] != 0  # nearly free to factorize
    damages = sum(g.damages[g.widths.index(found.widths[g.name])] for g in groups) + sum(
        u.damages[found.choices[u.name] - 1] for u in layers if found.choices[u.name])
    assert found.damage == pytest.approx(damages)


def test_a_layer_of_a_narrowed_group_costs_at_its_narrowed_shape():
    unit = RankUnit("down", 100, 50, 5000.0, (8 * 150.0,), (0.1,), in_group="g")
    assert layer_cost(unit, 0, 0.5, 1.0) == 2500.0
    assert layer_cost(unit, 1, 0.5, 1.0) == 8 * (50 + 50)
    assert layer_cost(unit, 1, 0.1, 0.2) == 5000.0 * 0.02  # a chain that no longer saves costs as the dense layer


def test_a_reader_of_a_channel_concat_scales_by_the_share_of_each_part():
    """`head` reads g1 (4 channels) and g2 (5) beside 3 channels of a graph input: narrowing g1
    to 2 leaves 10 of its 12 input channels; the allocation's cost says so."""
    groups = [WidthUnit("g1", 4, (1, 2, 3, 4), (0.4, 0.2, 0.1, 0.0), 1.0),
              WidthUnit("g2", 5, (1, 2, 3, 4, 5), (9.0, 8.0, 7.0, 6.0, 0.0), 1.0)]
    head = RankUnit("head", 12 * 9, 6, 12 * 9 * 6.0, in_parts=(("g1", 4 / 12), ("g2", 5 / 12)))
    assert head.reads == ("g1", "g2") and head.in_scale({"g1": 0.5, "g2": 1.0}.get) == pytest.approx(10 / 12)
    found = allocate_width_and_rank(groups, [head], budget=4 + 5 + 12 * 9 * 6.0 - 2 - 2 * 9 * 6.0)
    assert found.widths == {"g1": 2, "g2": 5}
    assert found.cost == pytest.approx(2 + 5 + 10 * 9 * 6.0)
    with pytest.raises(ValueError, match="in_parts"):
        RankUnit("bad", 12, 6, 72.0, in_group="g1", in_parts=(("g2", 0.5),))


def test_damage_bound_gives_the_cheapest_found_within_it():
    groups, layers = units()
    loose = allocate_width_and_rank(groups, layers, max_damage=0.2)
    tight = allocate_width_and_rank(groups, layers, max_damage=0.01)
    assert tight.damage <= 0.01 and loose.damage <= 0.2
    assert loose.cost < tight.cost


def test_unreachable_budget_returns_the_cheapest_state_unreached():
    groups, layers = units()
    found = allocate_width_and_rank(groups, layers, budget=1.0)
    assert not found.reached and found.cost > 1.0
    assert all(found.widths[g.name] == g.widths[0] for g in groups)


# ------------------------------------------------------------------------------ whole runs
def ffn_stack(seed=0):
    """x [batch, seq, 32] → two FFN blocks (up 32→128, Relu, down 128→32, residual) → y. The
    FFN inner channels are low rank plus noise, so both narrowing and factorizing pay."""
    b = Builder(seed=seed)
    rng = np.random.default_rng(seed)
    x = b.input("x", ["batch", "seq", HIDDEN])
    current = x
    for block in range(2):
        basis = rng.standard_normal((HIDDEN, 12)) @ rng.standard_normal((12, INNER))
        up = (basis + 0.05 * rng.standard_normal((HIDDEN, INNER))) / np.sqrt(HIDDEN)
        down = (rng.standard_normal((INNER, 10)) @ rng.standard_normal((10, HIDDEN))
                + 0.05 * rng.standard_normal((INNER, HIDDEN))) / INNER
        b.node("MatMul", [current, b.init(f"up{block}_w", up.astype(np.float32))], [f"h{block}"], name=f"up{block}")
        b.node("Add", [f"h{block}", b.init(f"up{block}_b", b.randn(INNER, scale=0.1))], [f"hb{block}"],
               name=f"up{block}_bias")
        b.node("Relu", [f"hb{block}"], [f"a{block}"], name=f"relu{block}")
        b.node("MatMul", [f"a{block}", b.init(f"down{block}_w", down.astype(np.float32))], [f"d{block}"],
               name=f"down{block}")
        b.node("Add", [f"d{block}", current], [f"r{block}"], name=f"residual{block}")
        current = f"r{block}"
    b.node("Identity", [current], ["y"], name="out")
    b.output("y", ["batch", "seq", HIDDEN])
    return b.model(17, 8)


def feeds(rng, batch=8, seq=6):
    return {"x": rng.standard_normal((batch, seq, HIDDEN)).astype(np.float32)}


def run(model, inputs):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0].astype(np.float64)


def relative_error(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def calibration():
    rng = np.random.default_rng(3)
    return [feeds(rng, batch=16) for _ in range(10)]  # calib_batch: as the run batches them


@pytest.mark.parametrize("kind, value", [("params", 0.55), ("macs", 0.5)])
def test_params_and_macs_targets_are_met_with_widths_and_ranks(calibration, kind, value):
    from onnx_lrsd import compress
    from onnx_lrsd.runtime.calibrate import split_holdout

    model = ffn_stack()
    result = compress(model, calibration=calibration, method="prune+lowrank", **{f"target_{kind}": value},
                      min_layer_share=0.0, min_rank=2, ridge=1e-6)
    report = result.report
    ratio = report.params_ratio if kind == "params" else report.macs_ratio
    assert ratio <= value + 0.002
    assert report.allocation.predicted == pytest.approx(ratio, abs=0.01)  # the cost model counts the written model
    assert any(w.kept < w.channels for w in report.widths) or any(l.method != "dense" for l in report.layers)
    rng = np.random.default_rng(11)
    check = feeds(rng)
    error = relative_error(run(result.model, check), run(model, check))
    assert error < 0.2
    held = split_holdout(calibration, 5).held_out
    assert report.verified_on == "held-out calibration batches"
    assert report.output_errors["y"] == pytest.approx(relative_error(
        np.concatenate([run(result.model, c) for c in held]), np.concatenate([run(model, c) for c in held])), rel=1e-3)


def test_full_width_dense_allocation_round_trips_exactly(calibration):
    from onnx_lrsd.config import CompressConfig
    from onnx_lrsd.passes.context import new_context
    from onnx_lrsd.passes.pipeline import prepare
    from onnx_lrsd.passes.width_and_rank import _Run

    model = ffn_stack()
    config = CompressConfig(target_params=0.5, min_layer_share=0.0, min_rank=2)
    ctx = new_context(model, config)
    ctx.calibration = calibration
    run_state = _Run(ctx, prepare(ctx), config)
    problem = run_state.problem("params")
    full = WidthRankAllocation({g.name: g.channels for g in problem.groups}, {u.name: 0 for u in problem.layers},
                               0.0, 0.0)
    same, inner = run_state.execute(full)
    assert inner is None
    check = feeds(np.random.default_rng(5))
    np.testing.assert_allclose(run(same, check), run(model, check), rtol=1e-6, atol=1e-6)
    from onnx_lrsd.plan.cost import count_params
    assert problem.fixed + sum(u.dense for u in problem.layers) + sum(
        g.channels * g.cost_per_channel for g in problem.groups) == pytest.approx(count_params(model))


def test_error_target_and_refusals(calibration):
    from onnx_lrsd import compress
    from onnx_lrsd.errors import LrsdError

    model = ffn_stack()
    result = compress(model, calibration=calibration, method="prune+lowrank", max_error=0.05, min_layer_share=0.0,
                      min_rank=2)
    assert result.report.output_errors["y"] <= 0.05
    assert result.report.params_ratio < 1.0
    with pytest.raises(LrsdError, match="needs a target"):
        compress(model, calibration=calibration, method="prune+lowrank")
    with pytest.raises(LrsdError, match="calibration"):
        compress(model, method="prune+lowrank", target_params=0.5)
    with pytest.raises(LrsdError, match="unreachable"):
        compress(model, calibration=calibration, method="prune+lowrank", target_params=0.01)


def test_prune_alone_takes_an_error_target_through_the_same_allocation(calibration):
    from onnx_lrsd import compress

    model = ffn_stack()
    result = compress(model, calibration=calibration, method="prune", max_error=0.05)
    report = result.report
    assert report.output_errors["y"] <= 0.05 and report.layers == ()
    assert any(w.kept < w.channels for w in report.widths) and report.params_ratio < 1.0
    assert report.allocation.factorized == 0 and report.allocation.target == "error"


def test_cli_takes_the_method_from_the_config(tmp_path, calibration):
    from click.testing import CliRunner

    from onnx_lrsd.cli import main

    path, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(ffn_stack(), str(path))
    np.savez(tmp_path / "calib.npz", x=np.concatenate([c["x"] for c in calibration]))
    done = CliRunner().invoke(main, ["compress", str(path), "-o", str(out), "--method", "prune+lowrank",
                                     "--target-params", "0.6", "--calib", str(tmp_path / "calib.npz")])
    assert done.exit_code == 0, done.output
    assert out.is_file() and "channel groups" in done.output


def conv_head(seed=0):
    """x [batch, 8, h, w] (symbolic h, w) → Conv 8→48 3×3 → Relu → Conv 48→48 3×3 → Relu →
    GlobalAveragePool → Flatten → Gemm 48→256 → Relu → Gemm 256→10. Counted with h = w = 1,
    the convs' MACs vanish next to the Gemms'; at 16×16 they dominate."""
    b = Builder(seed=seed)
    x = b.input("x", ["batch", 8, "h", "w"])
    b.node("Conv", [x, b.init("c1_w", b.randn(48, 8, 3, 3, scale=0.3))], ["c1"], name="conv1", kernel_shape=[3, 3],
           pads=[1, 1, 1, 1])
    b.node("Relu", ["c1"], ["r1"], name="relu1")
    b.node("Conv", ["r1", b.init("c2_w", b.randn(48, 48, 3, 3, scale=0.1))], ["c2"], name="conv2",
           kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    b.node("Relu", ["c2"], ["r2"], name="relu2")
    b.node("GlobalAveragePool", ["r2"], ["p"], name="pool")
    b.node("Flatten", ["p"], ["f"], name="flatten")
    b.node("Gemm", ["f", b.init("g1_w", b.randn(48, 256, scale=0.2))], ["g1"], name="fc1")
    b.node("Relu", ["g1"], ["r3"], name="relu3")
    b.node("Gemm", ["r3", b.init("g2_w", b.randn(256, 10, scale=0.1))], ["y"], name="fc2")
    b.output("y", ["batch", 10])
    return b.model(13)


@pytest.mark.parametrize("method", ["auto", "prune", "prune+lowrank"])
def test_macs_target_is_met_as_the_report_counts_macs(method):
    """The report counts MACs at the calibration data's dims (16×16 here): every method's MACs
    target must hold there, not only with the symbolic dims counted as 1."""
    from onnx_lrsd import compress

    rng = np.random.default_rng(0)
    calibration = [{"x": rng.standard_normal((16, 8, 16, 16)).astype(np.float32)} for _ in range(5)]
    result = compress(conv_head(), calibration=calibration, method=method, target_macs=0.6, min_layer_share=0.0,
                      min_rank=2, conv_rank_multiple=1, max_output_error=None)
    assert result.report.macs_unresolved == ()
    assert result.report.macs_ratio <= 0.6 + 0.002
