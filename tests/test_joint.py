"""Joint decompositions (JMD): shared factors recover planted shared subspaces, beat separate
fits at equal parameters when the subspace is shared, and count shared parameters once."""
import numpy as np
import pytest

from onnx_lrsd.decompose import data_error, whitened_svd
from onnx_lrsd.decompose.joint import joint_fit, joint_ranks


def grams(k, n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(k):
        x = rng.standard_normal((400, n)) @ rng.standard_normal((n, n)) * rng.uniform(0.5, 3)
        out.append(x.T @ x)
    return out


def relative_errors(fit, ws, gs):
    return [data_error(w, fit.to_dense(i), g) for i, (w, g) in enumerate(zip(ws, gs))]


def test_rjmd_recovers_a_shared_output_subspace_exactly():
    rng = np.random.default_rng(1)
    v0 = rng.standard_normal((6, 20))
    ws = [rng.standard_normal((16, 6)) @ v0 for _ in range(4)]
    gs = grams(4, 16)
    fit = joint_fit(ws, gs, "right", (0, 6), ridge=0.0)
    assert max(relative_errors(fit, ws, gs)) < 1e-10
    assert fit.V.shape == (6, 20) and len(fit.U_own) == 4
    assert fit.n_params == 6 * 20 + 4 * 16 * 6


def test_ljmd_recovers_a_shared_input_subspace_with_different_grams():
    rng = np.random.default_rng(2)
    u0 = rng.standard_normal((16, 5))
    ws = [u0 @ rng.standard_normal((5, 12)) for _ in range(3)]
    gs = grams(3, 16, seed=3)
    fit = joint_fit(ws, gs, "left", (5, 0), ridge=0.0)
    assert max(relative_errors(fit, ws, gs)) < 1e-6
    assert fit.n_params == 16 * 5 + 3 * 5 * 12


@pytest.mark.parametrize("side", ["left", "right"])
def test_joint_beats_separate_fits_at_equal_params_on_a_shared_subspace(side):
    rng = np.random.default_rng(4)
    n = 24
    base_u, base_v = rng.standard_normal((n, 10)), rng.standard_normal((10, n))
    ws = [base_u @ rng.standard_normal((10, 10)) @ base_v + 0.05 * rng.standard_normal((n, n)) for _ in range(6)]
    gs = grams(6, n, seed=5)
    budget = 6 * 6 * (2 * n)  # what separate rank-6 fits cost
    ranks = joint_ranks(side, [w.shape for w in ws], budget)
    fit = joint_fit(ws, gs, side, ranks)
    assert fit.n_params <= budget
    separate = [data_error(w, whitened_svd(w, g, 6).to_dense(), g) for w, g in zip(ws, gs)]
    assert np.mean(relative_errors(fit, ws, gs)) < 0.7 * np.mean(separate)


def test_bjmd_recovers_a_shared_left_plus_shared_right_structure():
    rng = np.random.default_rng(6)
    u0, v0 = rng.standard_normal((16, 3)), rng.standard_normal((3, 14))
    ws = [u0 @ rng.standard_normal((3, 14)) + rng.standard_normal((16, 3)) @ v0 for _ in range(4)]
    gs = grams(4, 16, seed=7)
    fit = joint_fit(ws, gs, "both", (3, 3), ridge=0.0)
    assert max(relative_errors(fit, ws, gs)) < 1e-3
    assert len(fit.terms(0)) == 2


def test_joint_ranks_count_shared_factors_once():
    shapes = [(384, 384)] * 6
    assert joint_ranks("right", shapes, 6 * 384 * 100 + 384 * 100) == (0, 100)
    assert joint_ranks("left", shapes, 384 * 50 + 6 * 50 * 384) == (50, 0)
    r_left, r_right = joint_ranks("both", shapes, 700 * 384 * 7)
    assert r_left == r_right == (700 * 384 * 7 // 2) // (7 * 384)


@pytest.mark.parametrize("ws, side, ranks, message", [
    ([np.ones((4, 3))], "right", (0, 2), "at least two"),
    ([np.ones((4, 3)), np.ones((4, 5))], "right", (0, 2), "output size"),
    ([np.ones((4, 3)), np.ones((4, 3))], "up", (1, 1), "needs positive ranks"),
    ([np.ones((4, 3)), np.ones((4, 3))], "left", (0, 0), "needs positive ranks"),
])
def test_joint_fit_validates(ws, side, ranks, message):
    with pytest.raises(ValueError, match=message):
        joint_fit(ws, None, side, ranks)


# ---------------------------------------------------------------------------------------------
# in the graph: one shared initializer, exact on planted structure, groups found by role


import onnx  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from helpers.graphs import make_model, run  # noqa: E402
from onnx_lrsd.api import compress  # noqa: E402
from onnx_lrsd.config import CompressConfig  # noqa: E402
from onnx_lrsd.plan.cost import count_params  # noqa: E402
from onnx_lrsd.errors import LrsdError  # noqa: E402


def repeated_blocks(structure, n=48, blocks=4, rank=6, seed=0):
    """`blocks` × (MatMul n×n named block{i}/fc, then Tanh); weights share a planted subspace:
    right: Aᵢ·V₀, left: U₀·Bᵢ, both: U₀·Bᵢ + Aᵢ·V₀ (each part of rank `rank`)."""
    rng = np.random.default_rng(seed)
    u0, v0 = rng.standard_normal((n, rank)), rng.standard_normal((rank, n))
    nodes, inits, cur = [], {}, "x"
    for i in range(blocks):
        w = np.zeros((n, n))
        if structure in ("left", "both"):
            w += u0 @ rng.standard_normal((rank, n))
        if structure in ("right", "both"):
            w += rng.standard_normal((n, rank)) @ v0
        inits[f"w{i}"] = (w / (4 * n)).astype(np.float32)
        nodes += [helper.make_node("MatMul", [cur, f"w{i}"], [f"h{i}"], name=f"block{i}/fc"),
                  helper.make_node("Tanh", [f"h{i}"], [f"a{i}"], name=f"block{i}/act")]
        cur = f"a{i}"
    return make_model(nodes, [("x", TensorProto.FLOAT, ["n", n])], [(cur, TensorProto.FLOAT, ["n", n])], inits)


def blocks_calibration(n=48, seed=1):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((32, n)).astype(np.float32)} for _ in range(6)]


def rel_output_error(a, b, n=48):
    feeds = {"x": np.random.default_rng(9).standard_normal((40, n)).astype(np.float32)}
    ya, yb = run(a, feeds)[0], run(b, feeds)[0]
    return float(np.linalg.norm(ya - yb) / np.linalg.norm(ya))


@pytest.mark.parametrize("side", ["left", "right", "both"])
def test_joint_groups_share_one_initializer_and_are_exact_on_planted_structure(side):
    model = repeated_blocks(side)
    separate_rank = 8 if side == "both" else 4  # the group budget 4·r·96 then gives rank ≥ 6 per shared part
    keep = (separate_rank * 96 + 1) / (48 * 48)
    result = compress(model, calibration=blocks_calibration(), keep=keep, joint=side, min_layer_share=0.0,
                      min_rank=1, calib_batch=32, bias_correction=False, ridge=1e-9)
    (group,) = result.report.joint_groups
    assert group.side == side and len(group.members) == 4
    assert all(r >= 6 for r in group.ranks if r) and group.params <= 4 * separate_rank * 96
    # left / right have closed forms or convex steps; both alternates (a local optimum)
    assert rel_output_error(model, result.model) < (0.05 if side == "both" else 1e-4)
    shared = [t for t in result.model.graph.initializer if "shared" in t.name]
    assert len(shared) == (2 if side == "both" else 1)
    consumers = [sum(t.name in n.input for n in result.model.graph.node) for t in shared]
    assert consumers == [4] * len(shared)
    assert result.report.after.params == count_params(result.model)


def unrelated_blocks() -> onnx.ModelProto:
    """Three MatMul + Tanh blocks with unrelated full-rank 48×48 weights: nothing to share."""
    rng = np.random.default_rng(3)
    nodes, inits, cur = [], {}, "x"
    for i in range(3):
        inits[f"w{i}"] = (rng.standard_normal((48, 48)) / 7).astype(np.float32)
        nodes += [helper.make_node("MatMul", [cur, f"w{i}"], [f"h{i}"], name=f"block{i}/fc"),
                  helper.make_node("Tanh", [f"h{i}"], [f"a{i}"], name=f"block{i}/act")]
        cur = f"a{i}"
    return make_model(nodes, [("x", TensorProto.FLOAT, ["n", 48])], [(cur, TensorProto.FLOAT, ["n", 48])], inits)


def test_auto_keeps_separate_fits_when_they_are_better():
    model = unrelated_blocks()
    report = compress(model, calibration=blocks_calibration(), keep=0.5, joint="auto", min_layer_share=0.0,
                      calib_batch=32).report
    (group,) = report.joint_groups
    assert group.side == "separate" or group.joint_error < group.separate_error


def test_explicit_groups_and_their_errors():
    model = repeated_blocks("right")
    report = compress(model, calibration=blocks_calibration(), keep=0.4, joint="right", calib_batch=32,
                      joint_groups=("block[01]/fc",), min_layer_share=0.0).report
    assert [g.members for g in report.joint_groups] == [("block0/fc", "block1/fc")]
    with pytest.raises(LrsdError, match="mode independent"):
        CompressConfig(joint="left", mode="sequential")
    with pytest.raises(LrsdError, match="unknown joint"):
        CompressConfig(joint="sideways")


# --------------------------------------------------------------------------------------------
# The global allocation: a group is one decision (all dense, separate, or joint at a rank)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["left", "right"])
def test_joint_error_curves_match_the_fits(side):
    from onnx_lrsd.decompose.joint import joint_error_curves

    rng = np.random.default_rng(4)
    base = rng.standard_normal((20, 6))
    ws = [base @ rng.standard_normal((6, 12)) + 0.3 * rng.standard_normal((20, 12)) for _ in range(3)]
    gs = grams(3, 20, seed=5)
    same = [gs[0]] * 3  # one shared Gram: the left curve is exact too
    curves = joint_error_curves(ws, gs if side == "right" else same, side, 10, ridge=0.0)
    assert curves.shape == (3, 11) and np.all(curves[:, 0] == 1.0)
    assert np.all(np.diff(curves, axis=1) <= 1e-12)  # errors fall with the rank
    for rank in (2, 5, 9):
        fit = joint_fit(ws, gs if side == "right" else same, side, (rank, 0) if side == "left" else (0, rank), 0.0)
        np.testing.assert_allclose(curves[:, rank], relative_errors(fit, ws, gs if side == "right" else same),
                                   rtol=1e-6, atol=1e-9)


def test_compound_frontier_is_the_pareto_front_of_the_members_sums():
    import itertools

    from onnx_lrsd.plan.allocate import Option, compound_frontier

    rng = np.random.default_rng(6)
    members = [[Option(float(c), float(d)) for c, d in zip(rng.integers(1, 30, 5), rng.uniform(0, 5, 5))]
               for _ in range(3)]
    front = compound_frontier(members)
    combos = [(sum(m[i].cost for m, i in zip(members, choice)), sum(m[i].damage for m, i in zip(members, choice)))
              for choice in itertools.product(range(5), repeat=3)]
    for option, choice in front:
        assert (option.cost, option.damage) == pytest.approx(combos[np.ravel_multi_index(choice, (5,) * 3)])
        assert not any(c <= option.cost and d < option.damage - 1e-12 for c, d in combos)  # nothing dominates it
    for cost, damage in combos:  # and every combination is matched or beaten by the front
        assert any(o.cost <= cost and o.damage <= damage + 1e-12 for o, _ in front)


@pytest.mark.parametrize("structure, chosen", [("left", "left"), ("right", "right")])
def test_the_allocation_takes_a_group_jointly_when_it_predicts_less_damage(structure, chosen):
    model = repeated_blocks(structure, rank=10)
    options = dict(calibration=blocks_calibration(), target_params=0.35, min_layer_share=0.0, calib_batch=32,
                   min_rank=2)
    separate = compress(model, **options)
    joint = compress(model, joint="auto", **options)
    assert joint.report.allocation.joint and joint.report.allocation.joint[0].split()[1] == chosen
    assert joint.report.params_ratio <= 0.35 and separate.report.params_ratio <= 0.35
    assert joint.report.allocation.predicted_error < 0.5 * separate.report.allocation.predicted_error
    assert rel_output_error(model, joint.model) < 0.5 * rel_output_error(model, separate.model)
    assert joint.report.after.params == count_params(joint.model)
    (group,) = joint.report.joint_groups
    assert group.side == chosen and group.joint_error < group.separate_error


def test_the_allocation_keeps_separate_fits_when_nothing_is_shared():
    model = unrelated_blocks()
    options = dict(calibration=blocks_calibration(), target_params=0.5, min_layer_share=0.0, calib_batch=32)
    separate = compress(model, **options).report
    joint = compress(model, joint="auto", **options).report
    assert joint.allocation.joint == () and joint.joint_groups == ()
    assert [l.ranks for l in joint.layers] == [l.ranks for l in separate.layers]


def test_joint_targets_that_are_not_supported_are_errors():
    with pytest.raises(LrsdError, match="not latency"):
        CompressConfig(joint="left", target_latency=1.5)
    with pytest.raises(LrsdError, match="joint 'both' works with keep"):
        CompressConfig(joint="both", target_params=0.5)
