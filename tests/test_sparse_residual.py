"""Low rank + sparse residuals (W ≈ UV + S) end to end: emission in onnxruntime, equal budgets,
the automatic share, a layer where rows pay off, unstructured files, config and CLI.

Emission is checked against x·(UV + S) computed in float64 from hand-built factors, for
every target kind the residual applies to (relative error ≤ 1e-5).
"""
import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from helpers.graphs import conv_model, gemm_model, matmul_model, rel_error, run
from onnx_lrsd.api import compress
from onnx_lrsd.passes.context import new_context
from onnx_lrsd.cli import main
from onnx_lrsd.config import CompressConfig
from onnx_lrsd.plan.cost import count_params
from onnx_lrsd.decompose import LowRankFactors, LowRankSparse, SparseResidual, data_error
from onnx_lrsd.errors import LrsdError
from onnx_lrsd.plan.factorize import LayerFactorization
from onnx_lrsd.model.graph import export_model, import_graph
from onnx_lrsd.passes import FindTargetsPass, NameNodesPass, PassManager
from onnx_lrsd.model.rewrite import rewrite_layers

TOL = 1e-5


# --------------------------------------------------------------------------------------------
# Emission: the graph computes x·(UV + S)
# --------------------------------------------------------------------------------------------
def _fit(n_in, n_out, rank, structure, seed=0):
    rng = np.random.default_rng(seed)
    low = LowRankFactors(rng.standard_normal((n_in, rank)), rng.standard_normal((rank, n_out)))
    if structure == "rows":
        sparse = SparseResidual.from_rows(np.array([1, n_in - 2]), rng.standard_normal((2, n_out)))
    else:
        flat = rng.choice(n_in * n_out, size=7, replace=False)
        sparse = SparseResidual.from_entries(np.stack(np.unravel_index(flat, (n_in, n_out)), 1),
                                             rng.standard_normal(7))
    return LowRankSparse(low, sparse)


def _rewrite(model, fit, method="svd"):
    """`model` with its layer "layer" replaced by `fit`, as `compress` writes it."""
    ctx = new_context(model, CompressConfig())
    graph = PassManager([NameNodesPass(), FindTargetsPass()]).run(import_graph(model), ctx)
    sparse = rewrite_layers(graph, ctx.targets, [LayerFactorization("layer", method, fit)])
    return export_model(graph, ctx.template, sparse)


def _init(model, name):
    return next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def _feeds(shape, seed=1):
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


@pytest.mark.parametrize("structure", ["rows", "unstructured"])
@pytest.mark.parametrize("x_shape", [(4, 12), (2, 3, 12)])
def test_matmul_computes_x_times_low_rank_plus_sparse(structure, x_shape):
    fit = _fit(12, 10, 3, structure)
    out = _rewrite(matmul_model(x_shape, 10), fit)
    feeds = _feeds(x_shape)
    (y,) = run(out, feeds)
    assert rel_error(feeds["x"].astype(np.float64) @ fit.to_dense(), y) <= TOL


@pytest.mark.parametrize("structure", ["rows", "unstructured"])
@pytest.mark.parametrize("trans_a,trans_b,alpha,beta,bias", [
    (0, 0, 1.0, 1.0, "n"), (1, 0, 0.5, 2.0, "mn"), (0, 1, 1.5, 0.0, "n"), (1, 1, 2.0, 0.7, None)])
def test_gemm_computes_alpha_x_times_low_rank_plus_sparse_plus_bias(structure, trans_a, trans_b, alpha, beta,
                                                                     bias):
    model = gemm_model(4, 12, 10, trans_a, trans_b, alpha, beta, bias)
    fit = _fit(12, 10, 3, structure)
    out = _rewrite(model, fit)
    feeds = _feeds((12, 4) if trans_a else (4, 12))
    a = feeds["x"].astype(np.float64)
    expected = alpha * (a.T if trans_a else a) @ fit.to_dense()
    if bias is not None:
        expected = expected + beta * _init(model, "C")
    (y,) = run(out, feeds)
    assert rel_error(expected, y) <= TOL


@pytest.mark.parametrize("structure", ["rows", "unstructured"])
def test_pointwise_conv_computes_the_channel_matmul(structure):
    model = conv_model(cin=12, cout=10, kernel=(1, 1), spatial=(5, 6))
    fit = _fit(12, 10, 3, structure)
    out = _rewrite(model, fit, method="channel")
    feeds = _feeds((1, 12, 5, 6))
    expected = np.einsum("nchw,co->nohw", feeds["x"].astype(np.float64), fit.to_dense())
    expected += _init(model, "B")[None, :, None, None]
    (y,) = run(out, feeds)
    assert rel_error(expected, y) <= TOL


def test_rows_residual_is_one_second_matmul_and_counts_k_times_out():
    fit = _fit(12, 10, 3, "rows")
    out = _rewrite(matmul_model((4, 12), 10), fit)
    ops = [n.op_type for n in out.graph.node]
    assert sorted(ops) == ["Concat", "Gather", "MatMul", "MatMul"]
    assert count_params(out) == 3 * (12 + 10) + 2 * 10 == fit.n_params


# --------------------------------------------------------------------------------------------
# Compression with calibration data
# --------------------------------------------------------------------------------------------
def _heavy_rows_layer(n_in=48, n_out=40, seed=0):
    """A MatMul whose weight is rank 3 plus 4 heavy input rows (rank 7 together: more than the
    rank 6 of its L-only budget at keep 0.3, while share 0.35 buys rank 3 + 4 rows), with correlated
    (low-dimensional plus noise) calibration data, and held-out test batches."""
    rng = np.random.default_rng(seed)
    model = matmul_model(("batch", n_in), n_out, seed=seed)
    w = rng.standard_normal((n_in, 3)) @ rng.standard_normal((3, n_out)) / 2
    w[[3, 17, 29, 41]] += 4 * rng.standard_normal((4, n_out))
    w += 0.05 * rng.standard_normal((n_in, n_out))
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w.astype(np.float32), "W"))
    mix = rng.standard_normal((8, n_in))

    def batch(i):
        r = np.random.default_rng(100 + i)
        x = r.standard_normal((64, 8)) @ mix + 0.3 * r.standard_normal((64, n_in))
        return {"x": x.astype(np.float32)}

    return model, [batch(i) for i in range(10)], [batch(50 + i) for i in range(4)]


def _test_error(original, compressed, batches):
    return float(np.mean([rel_error(run(original, b)[0], run(compressed, b)[0]) for b in batches]))


OPTIONS = dict(keep=0.3, min_rank=2, calib_batch=64)


def test_rows_residual_beats_low_rank_only_at_equal_params():
    model, calibration, test = _heavy_rows_layer()
    plain = compress(model, calibration=calibration, **OPTIONS)
    mixed = compress(model, calibration=calibration, sparse_share=0.35, **OPTIONS)
    (layer,) = mixed.report.layers
    assert layer.residual == "rows" and layer.residual_size > 0
    assert layer.params_after <= plain.report.layers[0].params_after
    assert count_params(mixed.model) <= count_params(plain.model)
    bias = 40  # the bias-correction Add of a lone MatMul, outside the layer's budget in both
    assert count_params(mixed.model) == layer.params_after + bias == mixed.report.after.params
    assert _test_error(model, mixed.model, test) < 0.7 * _test_error(model, plain.model, test)
    assert "sparse residuals (rows)" in mixed.report.to_text()


def test_auto_share_is_never_worse_than_low_rank_only_on_held_out_data():
    model, calibration, test = _heavy_rows_layer(seed=1)
    plain = compress(model, calibration=calibration, **OPTIONS)
    auto = compress(model, calibration=calibration, sparse_share="auto", **OPTIONS)
    assert auto.report.layers[0].params_after <= plain.report.layers[0].params_after
    assert auto.report.layers[0].data_error <= plain.report.layers[0].data_error * (1 + 1e-9)


def test_auto_share_keeps_a_plain_chain_when_sparsity_does_not_help():
    """A truly low-rank weight: no residual beats the rank it would cost."""
    rng = np.random.default_rng(3)
    model = matmul_model(("batch", 32), 32)
    w = rng.standard_normal((32, 8)) @ rng.standard_normal((8, 32))
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w.astype(np.float32), "W"))
    calibration = [{"x": rng.standard_normal((64, 32)).astype(np.float32)} for _ in range(6)]
    result = compress(model, calibration=calibration, sparse_share="auto", keep=0.5, min_rank=2, calib_batch=64)
    (layer,) = result.report.layers
    assert layer.residual == "" and layer.ranks == (8,)


def test_unstructured_file_is_smaller_than_dense_and_runs(tmp_path):
    model, calibration, test = _heavy_rows_layer()
    result = compress(model, calibration=calibration, sparse_share=0.35, sparse_structure="unstructured",
                      **OPTIONS)
    out = result.model
    (layer,) = result.report.layers
    assert len(out.graph.sparse_initializer) == 1
    nnz = out.graph.sparse_initializer[0].values.dims[0]
    assert layer.residual == "unstructured" and layer.residual_size == nnz > 0
    assert layer.params_after <= 6 * (48 + 40)  # the L-only budget: rank 6
    assert count_params(out) == layer.params_after + 40 == result.report.after.params  # + bias shift
    assert out.ByteSize() < model.ByteSize()
    assert result.report.after.macs == result.report.before.macs  # densified: no speed-up
    onnx.checker.check_model(out)
    assert _test_error(model, out, test) < 0.5
    assert "no speed-up" in result.report.to_text()


@pytest.mark.parametrize("structure", ["rows", "unstructured"])
def test_pointwise_conv_gets_a_residual_from_calibration_data(structure):
    model = conv_model(cin=32, cout=24, kernel=(1, 1), spatial=(6, 6), seed=2)
    rng = np.random.default_rng(0)
    calibration = [{"x": rng.standard_normal((4, 32, 6, 6)).astype(np.float32)} for _ in range(4)]
    options = dict(keep=0.5, min_rank=2, conv_rank_multiple=1, calib_batch=4, bias_correction=False)
    plain = compress(model, calibration=calibration, **options)
    mixed = compress(model, calibration=calibration, sparse_share=0.35, sparse_structure=structure, **options)
    (layer,) = mixed.report.layers
    assert layer.residual == structure and layer.params_after <= plain.report.layers[0].params_after
    assert count_params(mixed.model) == layer.params_after + 24  # + the conv bias
    assert max(mixed.report.output_errors.values()) < 1


def test_data_free_sparse_share_uses_the_weight_error():
    model = matmul_model((4, 24), 20)
    result = compress(model, keep=0.5, min_rank=2, sparse_share=0.3)
    (layer,) = result.report.layers
    assert layer.residual == "rows"
    assert count_params(result.model) == layer.params_after <= 0.5 * 24 * 20


def test_left_weights_and_non_channel_convs_stay_plain_chains():
    for model, method in ((matmul_model((12, 4), 10, side="left"), None),
                          (conv_model(cin=12, cout=16, kernel=(3, 3)), "tucker2")):
        options = dict(keep=0.5, min_rank=1, sparse_share=0.3, conv_rank_multiple=1)
        result = compress(model, method=method or "auto", **options)
        assert all(layer.residual == "" for layer in result.report.layers)


# --------------------------------------------------------------------------------------------
# k×k convs: residuals on whole input channels
# --------------------------------------------------------------------------------------------
def _channel_fit(cin, cout, kernel, rank, channels, seed=0):
    taps = int(np.prod(kernel))
    rng = np.random.default_rng(seed)
    low = LowRankFactors(rng.standard_normal((cin * taps, rank)), rng.standard_normal((rank, cout)))
    rows = (np.asarray(channels)[:, None] * taps + np.arange(taps)).ravel()
    return LowRankSparse(low, SparseResidual.from_rows(rows, rng.standard_normal((rows.size, cout))))


def _conv_reference(x, weight, bias, **attrs):
    """The conv in onnxruntime with the dense weight W′ = L + S (onnxruntime has no float64 Conv)."""
    model = conv_model(cin=weight.shape[1], cout=weight.shape[0], kernel=weight.shape[2:], spatial=x.shape[2:],
                       bias=bias is not None, batch=x.shape[0], **attrs)
    for init in model.graph.initializer:
        value = {"W": weight, "B": bias}[init.name]
        init.CopyFrom(onnx.numpy_helper.from_array(np.asarray(value, np.float32), init.name))
    return run(model, {"x": x})[0]


@pytest.mark.parametrize("kernel,attrs", [
    ((3, 3), {}), ((3, 3), dict(pads=(1, 1, 1, 1))), ((3, 3), dict(strides=(2, 2), pads=(1, 0, 1, 0))),
    ((3, 2), dict(dilations=(2, 1), pads=(2, 0, 1, 1))),
    ((3, 3), dict(strides=(2, 1), auto_pad="SAME_UPPER")), ((5,), dict(pads=(2, 2))), ((1, 1), dict(strides=(2, 2)))])
@pytest.mark.parametrize("rank", [3, 0])
def test_kxk_conv_residual_computes_the_conv_of_low_rank_plus_channels(kernel, attrs, rank):
    from onnx_lrsd.decompose import matrix_to_conv

    cin, cout, spatial = 8, 10, (9, 10)[: len(kernel)]
    model = conv_model(cin=cin, cout=cout, kernel=kernel, spatial=spatial, batch=2, **attrs)
    fit = _channel_fit(cin, cout, kernel, rank, [1, 6])
    out = _rewrite(model, fit, method="channel")
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("Gather") == 1 and "Concat" not in ops and ops.count("Conv") == (3 if rank else 1)
    x = _feeds((2, cin, *spatial))["x"]
    expected = _conv_reference(x, matrix_to_conv(fit.to_dense(), cin, kernel), _init(model, "B"), **attrs)
    (y,) = run(out, {"x": x})
    assert rel_error(expected, y) <= TOL


@pytest.mark.parametrize("attrs", [{}, dict(strides=(2, 1), pads=(1, 1, 1, 1))])
def test_kxk_conv_unstructured_residual_computes_the_conv_of_low_rank_plus_entries(attrs):
    from onnx_lrsd.decompose import matrix_to_conv

    model = conv_model(cin=8, cout=10, kernel=(3, 3), spatial=(9, 10), batch=2, **attrs)
    fit = _fit(8 * 9, 10, 3, "unstructured")
    out = _rewrite(model, fit, method="channel")
    x = _feeds((2, 8, 9, 10))["x"]
    expected = _conv_reference(x, matrix_to_conv(fit.to_dense(), 8, (3, 3)), _init(model, "B"), **attrs)
    (y,) = run(out, {"x": x})
    assert rel_error(expected, y) <= TOL


def test_kxk_conv_residual_rejects_rows_that_split_a_channel():
    fit = LowRankSparse(LowRankFactors(np.ones((8 * 9, 2)), np.ones((2, 10))),
                        SparseResidual.from_rows(np.array([9, 10]), np.ones((2, 10))))
    with pytest.raises(ValueError, match="whole input channels"):
        _rewrite(conv_model(cin=8, cout=10, kernel=(3, 3)), fit, method="channel")


def _channel_heavy_conv(cin=16, cout=24, seed=3):
    """A 3×3 conv whose weight is low rank plus three strong input channels."""
    model = conv_model(cin=cin, cout=cout, kernel=(3, 3), spatial=(8, 8), pads=(1, 1, 1, 1), seed=seed, batch=4)
    rng = np.random.default_rng(seed)
    w = np.einsum("or,rk->ok", rng.standard_normal((cout, 3)), rng.standard_normal((3, cin * 9))).reshape(
        cout, cin, 3, 3) * 0.1
    w[:, [2, 7, 11]] += rng.standard_normal((cout, 3, 3, 3))
    for init in model.graph.initializer:
        if init.name == "W":
            init.CopyFrom(onnx.numpy_helper.from_array(w.astype(np.float32), "W"))
    return model


def test_kxk_conv_residual_fits_channels_from_calibration_within_the_budget():
    model = _channel_heavy_conv()
    rng = np.random.default_rng(0)
    calibration = [{"x": rng.standard_normal((4, 16, 8, 8)).astype(np.float32)} for _ in range(6)]
    test = [{"x": rng.standard_normal((4, 16, 8, 8)).astype(np.float32)} for _ in range(2)]
    options = dict(keep=0.4, min_rank=2, conv_rank_multiple=1, calib_batch=4, method="channel")
    plain = compress(model, calibration=calibration, **options)
    mixed = compress(model, calibration=calibration, sparse_share=0.5, **options)
    (layer,) = mixed.report.layers
    assert layer.residual == "rows" and layer.residual_size % 9 == 0
    assert layer.params_after <= plain.report.layers[0].params_after <= 0.4 * 16 * 24 * 9
    assert count_params(mixed.model) == layer.params_after + 24  # + the conv bias
    assert _test_error(model, mixed.model, test) < 0.5 * _test_error(model, plain.model, test)


def test_kxk_conv_takes_an_unstructured_residual_entry_by_entry():
    model = _channel_heavy_conv()
    rng = np.random.default_rng(0)
    calibration = [{"x": rng.standard_normal((4, 16, 8, 8)).astype(np.float32)} for _ in range(6)]
    result = compress(model, calibration=calibration, keep=0.4, min_rank=2, conv_rank_multiple=1, calib_batch=4,
                      method="channel", sparse_share=0.3, sparse_structure="unstructured")
    (layer,) = result.report.layers
    assert layer.residual == "unstructured" and layer.residual_size > 0
    assert layer.params_after <= 0.4 * 16 * 24 * 9
    assert len(result.model.graph.sparse_initializer) == 1
    assert max(result.report.output_errors.values()) < 0.5


def test_grouped_rows_recover_planted_channels():
    from onnx_lrsd.decompose import lrsd_fit

    rng = np.random.default_rng(0)
    cin, taps, cout = 24, 9, 32
    x = rng.standard_normal((3000, cin * taps))
    low = rng.standard_normal((cin * taps, 4)) @ rng.standard_normal((4, cout))
    sparse = np.zeros_like(low)
    for c in (3, 10, 19):
        sparse[c * taps:(c + 1) * taps] = 3 * rng.standard_normal((taps, cout))
    fit = lrsd_fit(low + sparse, x.T @ x, 4, 3 * taps * cout, group=taps)
    assert sorted(set(fit.sparse.rows // taps)) == [3, 10, 19]
    assert data_error(low + sparse, fit.to_dense(), x.T @ x) < 1e-8
    assert list(fit.history) == sorted(fit.history, reverse=True)


# --------------------------------------------------------------------------------------------
# Configuration and CLI
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [dict(sparse_share=1.0), dict(sparse_share=-0.1), dict(sparse_share="most"),
                                     dict(sparse_share=True), dict(sparse_structure="columns")])
def test_config_refuses_bad_sparse_options_in_one_line(options):
    with pytest.raises(LrsdError) as info:
        CompressConfig(**options)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("args,share,structure", [
    (["--sparse-share", "0.2"], 0.2, "rows"),
    (["--sparse-share", "auto", "--sparse-structure", "unstructured"], "auto", "unstructured")])
def test_cli_passes_sparse_options(tmp_path, args, share, structure):
    source, out, report = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(matmul_model((4, 96), 80), source)
    result = CliRunner().invoke(main, ["compress", str(source), "-o", str(out), "--keep", "0.5", "--accept-error",
                                       "--report", str(report), *args])
    assert result.exit_code == 0, result.output
    import json

    config = json.loads(report.read_text())["config"]
    assert (config["sparse_share"], config["sparse_structure"]) == (share, structure)


@pytest.mark.parametrize("args", [["--sparse-share", "1.5"], ["--sparse-share", "many"],
                                  ["--sparse-structure", "columns"]])
def test_cli_rejects_bad_sparse_options_as_usage_errors(tmp_path, args):
    source = tmp_path / "m.onnx"
    onnx.save(matmul_model((4, 24), 20), source)
    result = CliRunner().invoke(main, ["compress", str(source), "-o", str(tmp_path / "o.onnx"), *args])
    assert result.exit_code == 2
    assert "sparse" in result.output


# --------------------------------------------------------------------------------------------
# What a residual costs in time: the automatic share's latency check and the per-layer report
# --------------------------------------------------------------------------------------------
def _calibration(n_in, batches=3, rows=32, seed=5):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((rows, n_in)).astype(np.float32)} for _ in range(batches)]


def _fake_ratios(chain_ms, ratio_per_row):
    """A `LatencyModel.measure_ratios` whose chain takes `chain_ms` and a residual of k rows
    costs 1 + k·`ratio_per_row` of it."""
    def measure_ratios(self, target, shape, chain, candidates):
        return chain_ms, [1.0 + (ranks[1] * ratio_per_row if kind.endswith("+rows") else 0.0)
                          for kind, ranks in candidates]
    return measure_ratios


def test_auto_share_keeps_only_residuals_within_the_latency_limit(monkeypatch):
    from onnx_lrsd.runtime import latency

    monkeypatch.setattr(latency.LatencyModel, "measure_ratios", _fake_ratios(1.0, 0.25))
    model = matmul_model(x_shape=("n", 24), n=16)
    report = compress(model, calibration=_calibration(24), keep=0.5, sparse_share="auto", min_layer_share=0.0,
                      calib_batch=32, residual_model_tolerance=10.0).report
    (layer,) = report.layers
    assert layer.residual == "" or layer.residual_size <= 1  # a residual of 1 row costs +25%, 2 rows +50%


def test_a_layer_too_fast_for_a_residual_keeps_its_plain_chain(monkeypatch):
    from onnx_lrsd.runtime import latency

    model, calibration, _ = _heavy_rows_layer()
    for chain_ms, wanted in ((0.01, ""), (1.0, "rows")):
        monkeypatch.setattr(latency.LatencyModel, "measure_ratios", _fake_ratios(chain_ms, 0.0))
        result = compress(model, calibration=calibration, sparse_share="auto", residual_model_tolerance=10.0,
                          residual_min_chain_ms=0.05, **OPTIONS)
        assert result.report.layers[0].residual == wanted


@pytest.mark.parametrize("ratio,kept", [(1.0, True), (1.5, False)])
def test_written_model_keeps_residuals_only_if_they_pay(monkeypatch, ratio, kept):
    from onnx_lrsd.runtime import latency
    from onnx_lrsd.passes import CheckResidualModelPass

    monkeypatch.setattr(latency.LatencyModel, "measure_ratios", _fake_ratios(1.0, 0.0))
    monkeypatch.setattr(CheckResidualModelPass, "_latency_ratio", staticmethod(lambda models, feed, threads: ratio))
    model, calibration, test = _heavy_rows_layer()
    plain = compress(model, calibration=calibration, **OPTIONS)
    auto = compress(model, calibration=calibration, sparse_share="auto", **OPTIONS)
    check = auto.report.residual_check
    assert check is not None and check.kept is kept and check.latency_ratio == ratio
    assert check.kept_layers == (1 if kept else 0) and check.layers == 1
    assert check.error < 0.7 * check.plain_error  # the residuals pay in error; only the time decides
    (layer,) = auto.report.layers
    assert (layer.residual == "rows") is kept
    if not kept:  # the L-only model, exactly: the plain chain of the same budget
        assert layer.ranks == plain.report.layers[0].ranks
        for batch in test:
            assert rel_error(run(plain.model, batch)[0], run(auto.model, batch)[0]) <= TOL
    assert ("residual check" in auto.report.to_text())


def test_written_model_drops_residuals_that_do_not_lower_its_output_error(monkeypatch):
    from onnx_lrsd.runtime import latency
    from onnx_lrsd.passes import CheckResidualModelPass

    monkeypatch.setattr(latency.LatencyModel, "measure_ratios", _fake_ratios(1.0, 0.0))
    monkeypatch.setattr(CheckResidualModelPass, "_errors",
                        staticmethod(lambda ctx, models, batches: [0.1] * len(models)))
    model, calibration, _ = _heavy_rows_layer()
    auto = compress(model, calibration=calibration, sparse_share="auto", **OPTIONS)
    assert not auto.report.residual_check.kept and auto.report.layers[0].residual == ""


def test_auto_share_needs_a_real_held_out_gain():
    from onnx_lrsd.decompose import best_split

    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 30))
    w = rng.standard_normal((30, 3)) @ rng.standard_normal((3, 20)) + 0.3 * rng.standard_normal((30, 20))
    w[[4, 9]] += 3 * rng.standard_normal((2, 20))
    budget = 6 * 50
    free = best_split(w, x.T @ x, budget)
    plain_error = data_error(w, free.plain.to_dense(), x.T @ x)
    assert free.share > 0 and free.error < plain_error  # a residual helps here
    strict = best_split(w, x.T @ x, budget, min_gain=1 - free.error / plain_error + 1e-3)
    assert strict.share == 0 and strict.fit.sparse.nnz == 0


def test_latency_model_times_residual_ratios_interleaved_and_caches_them(tmp_path, monkeypatch):
    from onnx_lrsd.runtime import latency
    from onnx_lrsd.runtime.latency import LatencyModel

    model = matmul_model(x_shape=(8, 24), n=16)
    ctx = new_context(model, CompressConfig())
    PassManager([NameNodesPass(), FindTargetsPass()]).run(import_graph(model), ctx)
    (target,) = ctx.targets.values()
    timer = LatencyModel(cache_path=tmp_path / "latency.json", runs=3, warmup=1)
    chain_ms, ratios = timer.measure_ratios(target, (8, 24), ("svd", (6,)), [("svd+rows", (4, 3)), ("svd", (5,))])
    assert chain_ms > 0 and len(ratios) == 2 and all(r > 0 for r in ratios)
    monkeypatch.setattr(latency, "time_sessions", None)  # a cached pair is never timed again
    again = LatencyModel(cache_path=tmp_path / "latency.json")
    assert again.measure_ratios(target, (8, 24), ("svd", (6,)), [("svd", (5,))]) == (chain_ms, ratios[1:])


def test_layer_latency_is_reported_for_chains_and_residuals():
    model = matmul_model(x_shape=("n", 48), n=40)
    report = compress(model, calibration=_calibration(48), keep=0.6, sparse_share=0.3, min_layer_share=0.0,
                      calib_batch=32, layer_latency=True).report
    (layer,) = report.layers
    assert layer.residual == "rows" and layer.latency is not None
    assert layer.latency.dense_ms > 0 and layer.latency.ms > 0 and layer.latency.chain_ms > 0
    assert "ms dense>after" in report.layer_table()


def test_latency_model_times_the_residual_chain_as_written():
    from onnx_lrsd.runtime.latency import LatencyModel, candidate_model

    model = matmul_model(x_shape=(8, 24), n=16)
    ctx = new_context(model, CompressConfig())
    PassManager([NameNodesPass(), FindTargetsPass()]).run(import_graph(model), ctx)
    (target,) = ctx.targets.values()
    written = candidate_model(target, (8, 24), ("svd+rows", (4, 3)))
    assert [n.op_type for n in written.graph.node] == ["MatMul", "Gather", "Concat", "MatMul"]
    with pytest.raises(ValueError, match="ranks"):  # 30 rows of a 24-row weight
        LatencyModel(cache_path=None).measure(target, (8, 24), [("svd+rows", (4, 30))])


@pytest.mark.parametrize("per_row,wanted", [(0.0, "rows"), (1.0, "")])
def test_auto_share_gives_a_kxk_conv_a_channel_residual_only_within_the_latency_limit(monkeypatch, per_row, wanted):
    from onnx_lrsd.runtime import latency

    monkeypatch.setattr(latency.LatencyModel, "measure_ratios", _fake_ratios(1.0, per_row))
    model = _channel_heavy_conv()
    rng = np.random.default_rng(0)
    calibration = [{"x": rng.standard_normal((4, 16, 8, 8)).astype(np.float32)} for _ in range(6)]
    result = compress(model, calibration=calibration, keep=0.4, min_rank=2, conv_rank_multiple=1, calib_batch=4,
                      sparse_share="auto", residual_model_tolerance=10.0, latency_batch=4)
    (layer,) = result.report.layers
    assert layer.residual == wanted
    if wanted:  # the channel chain with whole input channels beats every plain kind on this weight
        assert layer.method == "channel" and layer.residual_size % 9 == 0
        assert result.report.residual_check.kept


def test_written_model_keeps_the_best_prefix_of_residual_layers(monkeypatch):
    from helpers.graphs import mlp_model
    from onnx_lrsd.runtime import latency
    from onnx_lrsd.passes import CheckResidualModelPass

    seen = []

    def errors(ctx, models, batches):  # L only, best 1, best 2 layers: one residual helps, two hurt
        seen.append(len(models))
        return [0.5, 0.3, 0.4]

    monkeypatch.setattr(latency.LatencyModel, "measure_ratios", _fake_ratios(1.0, 0.0))
    monkeypatch.setattr(CheckResidualModelPass, "_errors", staticmethod(errors))
    monkeypatch.setattr(CheckResidualModelPass, "_latency_ratio", staticmethod(lambda models, feed, threads: 1.0))
    model = mlp_model(sizes=(48, 48, 40), names=("fc1", "fc2"))
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:  # low rank plus a few strong input rows: residuals pay
        if init.name.endswith(".weight"):
            w = rng.standard_normal((48, 3)) @ rng.standard_normal((3, init.dims[1])) * 0.1
            w[[5, 17, 30]] += 3 * rng.standard_normal((3, init.dims[1]))
            init.CopyFrom(onnx.numpy_helper.from_array(w.astype(np.float32), init.name))
    calibration = [{"x": rng.standard_normal((32, 48)).astype(np.float32)} for _ in range(6)]
    result = compress(model, calibration=calibration, keep=0.15, min_rank=1, min_layer_share=0.0, calib_batch=32,
                      sparse_share="auto")
    check = result.report.residual_check
    assert check is not None and check.layers == 2
    assert seen == [3] and check.kept and check.kept_layers == 1
    assert sum(1 for layer in result.report.layers if layer.residual) == 1
