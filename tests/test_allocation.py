"""Global allocation: the knapsack kernels, the error curves they read, and the targets end to end.

Errors of written models are measured in onnxruntime; budgets are asserted on the report's
counts, which `test_api` checks against the written graph.
"""
import itertools

import numpy as np
import pytest
from onnx import TensorProto, helper

from onnx_lrsd.plan.allocate import Option, allocate_budget, allocate_damage
from onnx_lrsd.api import compress
from onnx_lrsd.config import CompressConfig, LayerOverride
from onnx_lrsd.decompose import data_error, relative_tail_errors, whitened_spectrum, whitened_svd
from onnx_lrsd.plan.candidates import layer_candidates, rank_grid
from onnx_lrsd.errors import LrsdError
from onnx_lrsd.model.graph import import_graph, model_template
from onnx_lrsd.passes import FindTargetsPass, NameNodesPass, PassContext, PassManager

from helpers.graphs import make_model, rel_error, run

F = TensorProto.FLOAT


# ---------------------------------------------------------------------------------------------
# knapsack kernels


def convex_layers(rng, n_layers=5, n_options=6):
    """Options per layer: cost rising, damage falling convexly (diminishing returns)."""
    layers = []
    for _ in range(n_layers):
        costs = np.sort(rng.uniform(1, 10, n_options))
        scale = rng.uniform(0.1, 10)
        layers.append([Option(float(c), float(scale * np.exp(-0.5 * c))) for c in costs])
    return layers


def brute_force(layers, budget):
    best = None
    for choice in itertools.product(*(range(len(layer)) for layer in layers)):
        cost = sum(layer[c].cost for layer, c in zip(layers, choice))
        damage = sum(layer[c].damage for layer, c in zip(layers, choice))
        if cost <= budget and (best is None or damage < best):
            best = damage
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocate_budget_meets_the_budget_and_is_near_the_optimum(seed):
    rng = np.random.default_rng(seed)
    layers = convex_layers(rng)
    cheapest = sum(min(o.cost for o in layer) for layer in layers)
    dearest = sum(max(o.cost for o in layer) for layer in layers)
    budget = cheapest + 0.4 * (dearest - cheapest)
    result = allocate_budget(layers, budget)
    optimum = brute_force(layers, budget)
    assert result.cost <= budget + 1e-9
    largest_step = max(max(o.damage for o in layer) for layer in layers)
    assert optimum <= result.damage <= optimum + 0.25 * largest_step
    # one uniform option index everywhere (the "same ratio for every layer" baseline) is no better
    for index in range(6):
        uniform = sum(layer[index].cost for layer in layers)
        if uniform <= budget:
            assert result.damage <= sum(layer[index].damage for layer in layers) + 1e-12


def test_allocate_budget_puts_the_budget_where_it_saves_most_damage():
    fragile = [Option(10, 0.0), Option(5, 100.0)]
    robust = [Option(10, 0.0), Option(5, 0.01)]
    result = allocate_budget([fragile, robust], 15)
    assert result.choice == (0, 1)
    assert result.cost == 15 and result.damage == pytest.approx(0.01)


def test_allocate_budget_refuses_an_unreachable_budget():
    with pytest.raises(ValueError, match="below the cheapest"):
        allocate_budget([[Option(10, 0.0), Option(5, 1.0)]], 4)


def test_allocate_damage_takes_the_fewest_costs_within_the_damage():
    layers = [[Option(10, 0.0), Option(6, 0.5), Option(2, 3.0)], [Option(10, 0.0), Option(3, 0.2), Option(1, 0.4)]]
    result = allocate_damage(layers, 0.7)
    assert result.damage <= 0.7
    best = min(sum(layer[c].cost for layer, c in zip(layers, choice))
               for choice in itertools.product(range(3), range(3))
               if sum(layer[c].damage for layer, c in zip(layers, choice)) <= 0.7)
    assert result.cost == best == 9


@pytest.mark.parametrize("bad", [[], [[]], [[Option(1.0, -1.0)]], [[Option(float("nan"), 0.0)]]])
def test_allocation_kernels_validate_their_input(bad):
    with pytest.raises(ValueError):
        allocate_budget(bad, 1.0)


# ---------------------------------------------------------------------------------------------
# error curves


def test_tail_errors_are_the_whitened_svd_errors_at_every_rank():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 24)) @ rng.standard_normal((24, 24))
    w = rng.standard_normal((24, 16))
    gram = x.T @ x
    errors = relative_tail_errors(whitened_spectrum(w, gram, ridge=0.0))
    assert errors[0] == pytest.approx(1.0) and errors[16] == pytest.approx(0.0, abs=1e-12)
    for rank in (1, 4, 9, 15):
        approx = whitened_svd(w, gram, rank, ridge=0.0).to_dense()
        assert errors[rank] == pytest.approx(data_error(w, approx, gram), rel=1e-9)
    assert np.all(np.diff(errors) <= 1e-15)


def test_rank_grid_spans_the_range_in_conv_blocks():
    assert rank_grid(7, 8, 1) == []
    grid = rank_grid(200, 8, 16)
    assert grid[0] >= 8 and grid[-1] <= 200 and grid == sorted(set(grid))
    assert all(r % 16 == 0 for r in grid if r >= 64)  # rounding to blocks loses at most a quarter
    assert rank_grid(40, 8, 1, points=100) == list(range(8, 41))


def targets_of(model):
    ctx = PassContext(config=CompressConfig(), source=model, template=model_template(model))
    PassManager([NameNodesPass(), FindTargetsPass()]).run(import_graph(model), ctx)
    return ctx.targets


def test_candidates_of_every_conv_kind_save_and_lose_less_with_rank(conv3x3_model):
    (target,) = targets_of(conv3x3_model).values()
    candidates = layer_candidates(target, None, CompressConfig(min_rank=4, conv_rank_multiple=4))
    assert {c.method for c in candidates} == {"channel", "spatial", "tucker2"}
    for kind in ("channel", "spatial", "tucker2"):
        curve = sorted((c for c in candidates if c.method == kind), key=lambda c: c.cost.params)
        assert all(c.cost.params < target.params and c.cost.macs < target.macs for c in curve)
        assert all(0 <= c.error <= 1 for c in curve)
        assert all(a.error >= b.error - 1e-12 for a, b in zip(curve, curve[1:]))


@pytest.fixture
def conv3x3_model():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((48, 32, 3, 3)) / 17).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    return make_model([node], [("x", F, [1, 32, 12, 12])], [("y", F, [1, 48, 12, 12])], {"w": w})


# ---------------------------------------------------------------------------------------------
# targets end to end


def two_layer_model(seed=0):
    """fc0: a 96×96 weight of rank 8 (free to compress to rank 8); fc1: a dense random 96×96."""
    rng = np.random.default_rng(seed)
    low = (rng.standard_normal((96, 8)) @ rng.standard_normal((8, 96)) / 30).astype(np.float32)
    full = (rng.standard_normal((96, 96)) / 10).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"], name="fc0"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w1"], ["y"], name="fc1")]
    return make_model(nodes, [("x", F, ["n", 96])], [("y", F, ["n", 96])], {"w0": low, "w1": full})


def calibration(n_batches=6, batch=32, seed=3):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((batch, 96)).astype(np.float32)} for _ in range(n_batches)]


def output_error(original, compressed, seed=11):
    feeds = {"x": np.random.default_rng(seed).standard_normal((64, 96)).astype(np.float32)}
    return rel_error(run(original, feeds)[0], run(compressed, feeds)[0])


def test_target_params_is_met_and_beats_a_uniform_keep_of_the_same_size():
    model = two_layer_model()
    result = compress(model, calibration=calibration(), target_params=0.4, min_layer_share=0.0)
    report = result.report
    assert report.params_ratio <= 0.4 + 1e-9
    assert report.allocation is not None and report.allocation.target == "params"
    assert report.allocation.predicted == pytest.approx(report.params_ratio, abs=1e-9)  # bias shifts counted
    ranks = {layer.name: layer.ranks for layer in report.layers}
    assert ranks["fc0"] == (8,)  # the rank-8 layer gives up all it can spare, no more
    uniform = compress(model, calibration=calibration(), keep=0.4, min_layer_share=0.0)
    assert uniform.report.params_ratio == pytest.approx(report.params_ratio, abs=0.03)
    assert output_error(model, result.model) < 0.8 * output_error(model, uniform.model)


def test_target_macs_is_met():
    model = two_layer_model()
    report = compress(model, calibration=calibration(), target_macs=0.3, min_layer_share=0.0).report
    assert report.macs_ratio <= 0.3 + 1e-9


def test_max_error_is_met_on_the_held_out_batches():
    model = two_layer_model()
    report = compress(model, calibration=calibration(), max_error=0.05, min_layer_share=0.0).report
    assert max(report.output_errors.values()) <= 0.05
    assert report.params_ratio < 0.9
    assert report.allocation.rounds >= 1


def test_an_unreachable_target_is_a_clear_error():
    with pytest.raises(LrsdError, match="unreachable"):
        compress(two_layer_model(), calibration=calibration(), target_params=0.01, min_layer_share=0.0)


def test_overridden_layers_keep_their_settings_under_a_target():
    model = two_layer_model()
    config = CompressConfig(target_params=0.6, min_layer_share=0.0, overrides=(LayerOverride("fc1", skip=True),))
    report = compress(model, config, calibration=calibration()).report
    layers = {layer.name: layer for layer in report.layers}
    assert layers["fc1"].method == "dense" and layers["fc0"].method == "svd"
    assert report.allocation.layers == 1


def test_without_calibration_the_allocation_is_data_free_and_unprobed():
    report = compress(two_layer_model(), target_params=0.5, min_layer_share=0.0, dims=(("n", 4),)).report
    assert report.params_ratio <= 0.5 + 1e-9
    assert report.allocation.sensitivity is False


@pytest.mark.parametrize("options, message", [
    (dict(target_params=0.5, max_error=0.1), "choose one target"),
    (dict(target_params=1.5), "target_params"),
    (dict(target_latency=0.9), "speedup"),
    (dict(max_error=0.0), "max_error"),
    (dict(latency_batch=0), "latency_batch"),
])
def test_target_settings_are_validated(options, message):
    with pytest.raises(LrsdError, match=message):
        CompressConfig(**options)


# ---------------------------------------------------------------------------------------------
# chains, stages, EVBMF, metric and sweep


def test_a_compressed_model_is_re_factored_chain_by_chain_without_growing():
    model = two_layer_model()
    first = compress(model, calibration=calibration(), keep=0.5, min_layer_share=0.0)
    again = compress(first.model, calibration=calibration(), keep=0.5, min_layer_share=0.0)
    ops = [n.op_type for n in again.model.graph.node]
    assert ops.count("MatMul") == 4  # two chains of two, not chains of chains
    layers = {layer.name.split("/lrsd/")[0]: layer for layer in again.report.layers}
    assert set(layers) == {"fc0", "fc1"} and len(again.report.layers) == 2
    for before in first.report.layers:
        after = layers[before.name]
        assert after.params_before == before.params_after  # the chain's own params, not the dense layer's
        assert after.ranks[0] <= before.ranks[0] // 2 + 1
    assert all(n.name.startswith(("fc0/lrsd", "fc1/lrsd", "relu")) for n in again.model.graph.node)


def test_a_full_rank_refactoring_of_a_chain_is_exact():
    first = compress(two_layer_model(), keep=0.5, min_layer_share=0.0, dims=(("n", 4),))
    again = compress(first.model, overrides=(LayerOverride("*", rank="full"),), dims=(("n", 4),))
    assert output_error(first.model, again.model) < 1e-5


def test_stages_reach_the_keep_and_report_each_stage_against_the_original():
    model = two_layer_model()
    result = compress(model, calibration=calibration(), keep=0.25, stages=2, min_layer_share=0.0, calib_batch=32)
    report = result.report
    assert [s.stage for s in report.stages] == [1, 2]
    assert report.stages[0].params_ratio > report.stages[1].params_ratio
    assert report.params_ratio == pytest.approx(report.stages[1].params_ratio)
    assert report.before.params == 2 * 96 * 96
    assert report.output_errors["y"] == pytest.approx(output_error_on_holdout(model, result.model), rel=1e-6)


def output_error_on_holdout(original, compressed):
    from onnx_lrsd.runtime.calibrate import split_holdout
    from onnx_lrsd.runtime.bench import output_errors_on
    return output_errors_on(original, compressed, split_holdout(calibration(), 5)[1], ["y"])["y"]


def test_stages_reach_a_params_target():
    report = compress(two_layer_model(), calibration=calibration(), target_params=0.3, stages=2,
                      min_layer_share=0.0).report
    assert report.params_ratio <= 0.3 + 1e-9 and len(report.stages) == 2


def test_stages_refuse_latency_and_error_targets():
    with pytest.raises(LrsdError, match="stages work with"):
        compress(two_layer_model(), calibration=calibration(), max_error=0.1, stages=2)


def test_evbmf_ranks_find_the_rank_of_a_noisy_low_rank_layer():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((96, 5)) @ rng.standard_normal((5, 96)) + 0.01 * rng.standard_normal((96, 96)))
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")
    model = make_model([node], [("x", F, ["n", 96])], [("y", F, ["n", 96])], {"w": w.astype(np.float32)})
    plain = compress(model, evbmf=1.0, keep=1.0, min_rank=1, min_layer_share=0.0, dims=(("n", 4),)).report
    assert plain.layers[0].ranks == (5,)
    weakened = compress(model, evbmf=0.5, keep=1.0, min_rank=1, min_layer_share=0.0, dims=(("n", 4),)).report
    assert weakened.layers[0].method == "dense"  # R − 0.5·(R − 5) = 50 does not save parameters


def test_metric_target_keeps_the_metric_within_the_drop():
    model = two_layer_model()
    feeds = calibration(n_batches=1, batch=64, seed=21)[0]
    reference = run(model, feeds)[0]

    def agreement(candidate):  # share of rows whose arg-max output is unchanged
        return float(np.mean(run(candidate, feeds)[0].argmax(1) == reference.argmax(1)))

    result = compress(model, calibration=calibration(), metric=agreement, max_metric_drop=0.1, min_layer_share=0.0)
    assert agreement(result.model) >= 0.9
    assert result.report.allocation.metric == pytest.approx(agreement(result.model))
    assert result.report.params_ratio < 0.9
    with pytest.raises(LrsdError, match="go together"):
        compress(model, metric=agreement)


def test_sweep_points_meet_their_targets_and_mark_the_pareto_front():
    from onnx_lrsd.api import sweep
    report = sweep(two_layer_model(), (0.6, 0.3), calibration=calibration(), min_layer_share=0.0)
    assert [p.target_params for p in report.points] == [0.6, 0.3]
    assert all(p.params_ratio <= p.target_params + 1e-9 and p.speedup > 0 for p in report.points)
    assert report.points[0].output_error < report.points[1].output_error
    assert any(p.pareto for p in report.points)


def test_sensitivity_grows_as_measured_between_probes_and_quadratically_below():
    from onnx_lrsd.plan.allocate import UNIT, Sensitivity

    s = Sensitivity.fitted([(0.4, 0.16 * 8), (0.1, 0.01)])  # damage ∝ e^3.5 between the probes
    assert s.error == 0.1 and s.exponent == pytest.approx(np.log(128) / np.log(4))
    assert s.at(0.1) == pytest.approx(0.01) and s.at(0.4) == pytest.approx(1.28)
    assert s.at(0.05) == pytest.approx(0.0025)  # e² below the first probe
    assert Sensitivity.fitted([(0.2, 0.04)]).exponent == 2.0
    assert Sensitivity.fitted([(0.1, 1.0), (0.4, 1e-9)]).exponent == 1.0  # clipped
    assert UNIT.at(0.3) == pytest.approx(0.09)


def test_a_budget_equal_to_the_cheapest_cost_is_met_despite_rounding():
    layers = [[Option(0.1, 0.0), Option(0.2, 1.0)]] * 3 + [[Option(0.7, 0.0)]]
    cheapest = sum(min(o.cost for o in layer) for layer in layers)  # 0.1 + 0.1 + 0.1 + 0.7, in another order
    assert allocate_budget(layers, cheapest).choice == (0, 0, 0, 0)
