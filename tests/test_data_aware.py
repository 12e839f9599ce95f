"""Data-aware compression end to end: calibration batches through onnxruntime, whitened fits,
bias correction, sequential reconstruction and what the report says about them.

Every error is measured by running the original and the compressed model in onnxruntime on
data the fit did not see, unless the test is about the calibration data itself.
"""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_lrsd.runtime.activations import collect_paired_statistics, collect_statistics
from onnx_lrsd.api import compress
from onnx_lrsd.config import CompressConfig, LayerOverride
from onnx_lrsd.decompose import conv_to_matrix, data_error
from onnx_lrsd.plan.factorize import channel_block_gram, vertical_gram, factorize_data_aware, factorize_data_free
from onnx_lrsd.model.graph import import_graph, model_template
from onnx_lrsd.passes import FindTargetsPass, NameNodesPass, PassContext, PassManager
from onnx_lrsd.passes.reconstruct_feature_maps import dependency_waves
from onnx_lrsd.plan.rank_select import plan_layer
from onnx_lrsd.decompose.stats import im2col

from helpers.graphs import make_model

F = TensorProto.FLOAT


# ---------------------------------------------------------------------------------------------
# builders and measurements


def mlp(widths=(64, 64, 64, 32), seed=0, bias=1.0):
    """MatMul + Add (+ Relu between layers) named fc{i} / add{i}; a positive bias keeps the
    ReLUs mostly active, so hidden activations stay close to the input's subspace."""
    rng = np.random.default_rng(seed)
    nodes, inits, cur, last = [], {}, "x", len(widths) - 2
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        inits[f"w{i}"] = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        inits[f"b{i}"] = (bias + 0.1 * rng.standard_normal(b)).astype(np.float32)
        nodes.append(helper.make_node("MatMul", [cur, f"w{i}"], [f"mm{i}"], name=f"fc{i}"))
        nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], ["y" if i == last else f"z{i}"], name=f"add{i}"))
        if i != last:
            nodes.append(helper.make_node("Relu", [f"z{i}"], [f"a{i}"], name=f"relu{i}"))
            cur = f"a{i}"
    return make_model(nodes, [("x", F, ["n", widths[0]])], [("y", F, ["n", widths[-1]])], inits)


def cnn(channels=(8, 32, 32), size=8, seed=0, bias=2.0):
    """Conv 3x3 (pads 1) + bias, Relu between, named conv{i}."""
    rng = np.random.default_rng(seed)
    nodes, inits, cur, last = [], {}, "x", len(channels) - 2
    for i, (a, b) in enumerate(zip(channels[:-1], channels[1:])):
        inits[f"w{i}"] = (rng.standard_normal((b, a, 3, 3)) / np.sqrt(9 * a)).astype(np.float32)
        inits[f"b{i}"] = (bias + 0.1 * rng.standard_normal(b)).astype(np.float32)
        out = "y" if i == last else f"c{i}"
        nodes.append(helper.make_node("Conv", [cur, f"w{i}", f"b{i}"], [out], name=f"conv{i}",
                                      kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
        if i != last:
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"], name=f"relu{i}"))
            cur = f"r{i}"
    return make_model(nodes, [("x", F, ["n", channels[0], size, size])], [("y", F, None)], inits)


def low_dim_rows(n, dim, latent, seed, noise=0.01, mean=0.0):
    """Rows Z @ A + noise (+ mean): a `latent`-dimensional subspace of R^dim (A fixed)."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(1234).standard_normal((latent, dim))
    x = rng.standard_normal((n, latent)) @ mixing + noise * rng.standard_normal((n, dim)) + mean
    return x.astype(np.float32)


def low_dim_images(n, channels, latent, seed, size=8, block=4, noise=0.01):
    """Images whose channels mix `latent` sources that are constant over block×block tiles."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(4321).standard_normal((latent, channels))
    z = rng.standard_normal((n, latent, size // block, size // block)).repeat(block, 2).repeat(block, 3)
    x = np.einsum("nlhw,lc->nchw", z, mixing) + noise * rng.standard_normal((n, channels, size, size))
    return x.astype(np.float32)


def session(model):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def outputs(model, batches, names=None):
    """The named tensors (graph outputs by default) over `batches`, concatenated on axis 0."""
    if names is not None:
        extended = onnx.ModelProto()
        extended.CopyFrom(model)
        listed = {o.name for o in extended.graph.output}
        extended.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in listed)
        model = extended
    s = session(model)
    runs = [s.run(names, b) for b in batches]
    return [np.concatenate([r[i] for r in runs]).astype(np.float64) for i in range(len(runs[0]))]


def output_error(original, compressed, batches):
    (y,), (y_hat,) = outputs(original, batches), outputs(compressed, batches)
    return float(np.linalg.norm(y - y_hat) / np.linalg.norm(y))


def initializers(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def find_targets(model):
    ctx = PassContext(config=CompressConfig(verify=False), source=model, template=model_template(model))
    graph = import_graph(model)
    PassManager([NameNodesPass(), FindTargetsPass()]).run(graph, ctx)
    return ctx.targets, graph


def factorized(report):
    return [layer for layer in report.layers if layer.method != "dense"]


# ---------------------------------------------------------------------------------------------
# 5. data-aware beats data-free on correlated inputs; full rank is exact


MLP_CALIBRATION = [{"x": low_dim_rows(16, 64, 4, seed)} for seed in range(10)]
MLP_TEST = [{"x": low_dim_rows(128, 64, 4, 100)}]
CNN_CALIBRATION = [{"x": low_dim_images(16, 8, 2, seed)} for seed in range(6)]
CNN_TEST = [{"x": low_dim_images(32, 8, 2, 100)}]


def test_data_aware_beats_data_free_mlp_svd():
    model = mlp()
    free = compress(model, keep=0.25, min_rank=2)
    aware = compress(model, calibration=MLP_CALIBRATION, keep=0.25, min_rank=2)
    assert [layer.method for layer in aware.report.layers] == ["svd"] * 3
    assert [layer.ranks for layer in aware.report.layers] == [layer.ranks for layer in free.report.layers]
    assert aware.report.params_ratio == pytest.approx(free.report.params_ratio)
    e_free, e_aware = output_error(model, free.model, MLP_TEST), output_error(model, aware.model, MLP_TEST)
    assert e_aware <= 0.5 * e_free, (e_aware, e_free)
    assert e_aware < 0.25  # ~0.15; data-free ~0.65
    # the report's held-out error tells the same story
    assert aware.report.output_errors["y"] <= 0.5 * e_free


@pytest.mark.parametrize("method", ["channel", "spatial", "tucker2"])
def test_data_aware_beats_data_free_cnn(method):
    model = cnn()
    options = dict(keep=0.25, min_rank=2, conv_rank_multiple=1, overrides=(LayerOverride("*", method=method),))
    free = compress(model, **options)
    aware = compress(model, calibration=CNN_CALIBRATION, **options)
    assert [layer.method for layer in aware.report.layers] == [method] * 2
    assert [layer.ranks for layer in aware.report.layers] == [layer.ranks for layer in free.report.layers]
    e_free, e_aware = output_error(model, free.model, CNN_TEST), output_error(model, aware.model, CNN_TEST)
    assert e_aware <= 0.5 * e_free, (method, e_aware, e_free)


@pytest.mark.parametrize("method", ["svd", "channel", "spatial", "tucker2"])
def test_full_rank_data_aware_is_exact(method):
    if method == "svd":
        model, calibration, test = mlp(), MLP_CALIBRATION, MLP_TEST
    else:
        model, calibration, test = cnn(), CNN_CALIBRATION, CNN_TEST
    result = compress(model, calibration=calibration, overrides=(LayerOverride("*", method=method, rank="full"),))
    layers = factorized(result.report)
    assert len(layers) == len(result.report.layers) and all(layer.method == method for layer in layers)
    assert all(layer.data_error is not None and layer.data_error <= 1e-5 for layer in layers)
    assert output_error(model, result.model, test) <= 1e-5
    assert result.report.output_errors["y"] <= 1e-5


def _masked_model(rng, d=64, o=48):
    """y = (x @ w + b) · mask[..., None]: outputs at padded positions are zero."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
             helper.make_node("Add", ["h", "b"], ["z"], name="add"),
             helper.make_node("Cast", ["mask"], ["mf"], name="cast", to=F),
             helper.make_node("Unsqueeze", ["mf", "axes"], ["mu"], name="unsqueeze"),
             helper.make_node("Mul", ["z", "mu"], ["y"], name="mul")]
    return make_model(nodes, [("x", F, ["b", "s", d]), ("mask", TensorProto.INT64, ["b", "s"])], [("y", F, None)],
                      {"w": (rng.standard_normal((d, o)) / 8).astype(np.float32), "b": np.zeros(o, np.float32),
                       "axes": np.array([-1], np.int64)})


def _padded_batch(seed, b=8, s=12, d=64):
    """Real positions lie in a 4-dimensional subspace; padded ones are large isotropic noise."""
    rng = np.random.default_rng(seed)
    mask = (np.arange(s)[None] < rng.integers(2, s + 1, size=b)[:, None]).astype(np.int64)
    real = low_dim_rows(b * s, d, 4, seed).reshape(b, s, d)
    pad = 3 * rng.standard_normal((b, s, d))
    return {"x": np.where(mask[..., None] == 1, real, pad).astype(np.float32), "mask": mask}


def test_mask_input_keeps_padding_out_of_the_fit():
    model = _masked_model(np.random.default_rng(0))
    calibration = [_padded_batch(i) for i in range(10)]
    test = [_padded_batch(100 + i) for i in range(4)]
    options = dict(calibration=calibration, keep=0.2, min_rank=2, calib_batch=8)
    masked = compress(model, mask_input="mask", **options)
    unmasked = compress(model, **options)
    assert [layer.ranks for layer in masked.report.layers] == [(5,)]
    e_masked, e_unmasked = output_error(model, masked.model, test), output_error(model, unmasked.model, test)
    assert e_masked <= 0.1 * e_unmasked, (e_masked, e_unmasked)  # measured 0.004 vs 0.11


# ---------------------------------------------------------------------------------------------
# factorize_data_aware and the conv Gram reductions


def _conv_rows(seed=0, cin=3, k=(3, 2)):
    x = np.random.default_rng(seed).standard_normal((4, cin, 7, 6))
    return im2col(x, k, (1, 1), (1, 1, 1, 0), (1, 1)), cin, k


def test_vertical_gram_is_the_mean_gram_of_vertical_patches():
    rows, cin, (kh, kw) = _conv_rows()
    gram = rows.T @ rows
    patches = rows.reshape(-1, cin, kh, kw)
    expected = sum(p.T @ p for p in (patches[:, :, :, b].reshape(-1, cin * kh) for b in range(kw))) / kw
    np.testing.assert_allclose(vertical_gram(gram, cin, kh, kw), expected, rtol=1e-12)


def test_channel_block_gram_is_the_mean_gram_over_taps():
    rows, cin, k = _conv_rows(1, cin=4, k=(3, 3))
    gram = rows.T @ rows
    taps = rows.reshape(-1, cin, 9)
    expected = sum(taps[:, :, t].T @ taps[:, :, t] for t in range(9)) / 9
    np.testing.assert_allclose(channel_block_gram(gram, cin, 9), expected, rtol=1e-12)


def test_factorize_data_aware_minimises_the_data_error_and_paired_equals_plain():
    """On the same statistics the whitened fit's output error is below the data-free one's;
    sequential statistics with X̂ = X give the same factors and shift as plain ones."""
    model = mlp()
    targets, _ = find_targets(model)
    config = CompressConfig(keep=0.25, min_rank=2)
    plain = collect_statistics(model, list(targets.values()), MLP_CALIBRATION)
    paired = collect_paired_statistics(model, model, list(targets.values()), MLP_CALIBRATION)
    for name, target in targets.items():
        plan = plan_layer(target, config)
        stats = plain[name].fit
        aware = factorize_data_aware(target, plan, stats, ridge=1e-6, correct_bias=True)
        free = factorize_data_free(target, plan)
        gram = np.asarray(stats.gram)
        e_aware = data_error(target.matrix(), aware.factors.to_dense(), gram)
        e_free = data_error(target.matrix(), free.factors.to_dense(), gram)
        assert aware.data_error == pytest.approx(e_aware)
        assert e_aware <= 0.5 * e_free
        approx = aware.factors.to_dense()
        np.testing.assert_allclose(aware.bias_shift, stats.mean @ (target.matrix() - approx), rtol=1e-9, atol=1e-12)
        again = factorize_data_aware(target, plan, paired[name].fit, ridge=1e-6, correct_bias=True)
        np.testing.assert_allclose(again.factors.to_dense(), approx, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(again.bias_shift, aware.bias_shift, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("method", ["channel", "spatial", "tucker2"])
def test_factorize_data_aware_conv_kinds_fit_the_layer_output(method):
    """For each conv kind, the data-aware factors reconstruct the layer's output on the
    calibration rows better than the data-free ones at the same ranks."""
    model = cnn()
    targets, _ = find_targets(model)
    target = targets["conv0"]
    stats = collect_statistics(model, [target], CNN_CALIBRATION)["conv0"].fit
    plan = plan_layer(target, CompressConfig(keep=0.25, min_rank=2, conv_rank_multiple=1, method=method))
    assert plan.method == method
    aware = factorize_data_aware(target, plan, stats, ridge=1e-3, correct_bias=False)
    free = factorize_data_free(target, plan)
    assert aware.bias_shift is None
    conv_weight = {"channel": lambda f: f.to_dense(),
                   "spatial": lambda f: conv_to_matrix(_spatial_to_conv(f.to_dense(), target)),
                   "tucker2": lambda f: conv_to_matrix(f.to_dense())}[method]
    gram = np.asarray(stats.gram)
    e_aware = data_error(target.matrix(), conv_weight(aware.factors), gram)
    e_free = data_error(target.matrix(), conv_weight(free.factors), gram)
    assert aware.data_error == pytest.approx(e_aware, rel=1e-9)
    assert e_aware <= 0.5 * e_free, (e_aware, e_free)


def _spatial_to_conv(matrix, target):
    from onnx_lrsd.decompose import spatial_matrix_to_conv

    cout, cin, kh, kw = target.weight.shape
    return spatial_matrix_to_conv(matrix, cout, cin, kh, kw)


# ---------------------------------------------------------------------------------------------
# 6. bias correction


def _single(kind, rng):
    """(model, sample shape without batch) of one layer of each kind."""
    n, o = 48, 40

    def w(*shape):
        return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]) if len(shape) > 2 else shape[0])).astype(np.float32)

    if kind == "matmul_add":
        return make_model([helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
                           helper.make_node("Add", ["h", "b"], ["y"], name="add")],
                          [("x", F, ["n", n])], [("y", F, ["n", o])], {"w": w(n, o), "b": w(o, 1)[:, 0]}), (n,)
    if kind == "matmul":
        return make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
                          [("x", F, ["n", n])], [("y", F, ["n", o])], {"w": w(n, o)}), (n,)
    if kind == "matmul_left":
        return make_model([helper.make_node("MatMul", ["w", "x"], ["y"], name="fc")],
                          [("x", F, ["n", n, 5])], [("y", F, ["n", o, 5])], {"w": w(o, n)}), (n, 5)
    if kind == "gemm":
        return make_model([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)],
                          [("x", F, ["n", n])], [("y", F, ["n", o])], {"w": w(o, n), "b": w(o, 1)[:, 0]}), (n,)
    if kind == "gemm_alpha":
        return make_model([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", alpha=2.0, beta=0.5)],
                          [("x", F, ["n", n])], [("y", F, ["n", o])], {"w": w(n, o), "b": w(o, 1)[:, 0]}), (n,)
    if kind == "conv":
        return make_model([helper.make_node("Conv", ["x", "w", "b"], ["y"], name="fc", kernel_shape=[3, 3],
                                            pads=[1, 1, 1, 1])],
                          [("x", F, ["n", 16, 6, 6])], [("y", F, None)],
                          {"w": w(32, 16, 3, 3), "b": w(32, 1)[:, 0]}), (16, 6, 6)
    raise ValueError(kind)


def _shifted_batches(shape, count=4, mean=5.0, seed=0):
    """Correlated inputs with a large mean along the feature/channel axis 1."""
    mixing = np.random.default_rng(5).standard_normal((shape[0], shape[0])) / np.sqrt(shape[0])
    batches = []
    for s in range(count):
        x = np.random.default_rng(seed + s).standard_normal((16,) + shape)
        x = np.moveaxis(np.moveaxis(x, 1, -1) @ mixing, -1, 1) + mean
        batches.append({"x": x.astype(np.float32)})
    return batches


def _mean_error(kind, original, compressed, batches):
    """‖mean(y − y′)‖ / ‖mean(y)‖, means over every axis but the output feature axis."""
    (y,), (y_hat,) = outputs(original, batches), outputs(compressed, batches)
    axes = {"conv": (0, 2, 3), "matmul_left": (0, 2)}.get(kind, 0)
    return float(np.linalg.norm((y - y_hat).mean(axis=axes)) / np.linalg.norm(y.mean(axis=axes)))


BIAS_CASES = [("matmul_add", "svd"), ("matmul", "svd"), ("matmul_left", "svd"), ("gemm", "svd"),
              ("conv", "channel"), ("conv", "spatial"), ("conv", "tucker2"),
              ("gemm_alpha", "svd")]


@pytest.mark.parametrize("kind, method", BIAS_CASES)
def test_bias_correction_restores_the_mean_output_on_calibration_data(kind, method):
    model, shape = _single(kind, np.random.default_rng(1))
    batches = _shifted_batches(shape)
    options = dict(calibration=batches, keep=0.3, holdout_every=0, min_rank=2, conv_rank_multiple=1, method=method)
    with_shift = compress(model, bias_correction=True, **options)
    without = compress(model, bias_correction=False, **options)
    assert [layer.method for layer in with_shift.report.layers] == [method]
    e_with = _mean_error(kind, model, with_shift.model, batches)
    e_without = _mean_error(kind, model, without.model, batches)
    assert e_without > 1e-4  # the fit alone leaves a visible mean error...
    assert e_with <= 1e-6 + 0.01 * e_without, (e_with, e_without)  # ...the shift removes it
    # the shift changes nothing else: same total error up to the mean part
    assert output_error(model, with_shift.model, batches) <= output_error(model, without.model, batches) + 1e-6


def _ops(model):
    return [n.op_type for n in model.graph.node]


def test_bias_shift_folds_into_the_following_add():
    model, shape = _single("matmul_add", np.random.default_rng(2))
    batches = _shifted_batches(shape)
    options = dict(calibration=batches, keep=0.3, holdout_every=0, min_rank=2)
    with_shift = compress(model, bias_correction=True, **options).model
    without = compress(model, bias_correction=False, **options).model
    assert _ops(with_shift) == _ops(without) == ["MatMul", "MatMul", "Add"]  # no extra node
    original_bias = initializers(model)["b"]
    adds = [n for n in with_shift.graph.node if n.op_type == "Add"]
    assert adds[0].name == "add" and adds[0].output[0] == "y"
    values = initializers(with_shift)
    folded = next(values[i] for i in adds[0].input if i in values)
    kept = next(initializers(without)[i] for i in next(n for n in without.graph.node if n.op_type == "Add").input
                if i in initializers(without))
    np.testing.assert_array_equal(kept, original_bias)
    assert folded.shape == original_bias.shape and not np.allclose(folded, original_bias, atol=1e-4)


def test_bias_shift_of_a_lone_matmul_gets_an_add_node():
    model, shape = _single("matmul", np.random.default_rng(3))
    batches = _shifted_batches(shape)
    options = dict(calibration=batches, keep=0.3, holdout_every=0, min_rank=2)
    with_shift = compress(model, bias_correction=True, **options).model
    without = compress(model, bias_correction=False, **options).model
    assert _ops(without) == ["MatMul", "MatMul"]
    assert _ops(with_shift) == ["MatMul", "MatMul", "Add"]
    assert with_shift.graph.node[-1].output[0] == "y"


@pytest.mark.parametrize("kind, op", [("gemm", "Gemm"), ("conv", "Conv")])
def test_bias_shift_is_carried_by_gemm_and_conv_biases(kind, op):
    model, shape = _single(kind, np.random.default_rng(4))
    batches = _shifted_batches(shape)
    options = dict(calibration=batches, keep=0.3, holdout_every=0, min_rank=2, conv_rank_multiple=1)
    with_shift = compress(model, bias_correction=True, **options).model
    without = compress(model, bias_correction=False, **options).model
    assert _ops(with_shift) == _ops(without) and "Add" not in _ops(with_shift)
    last = with_shift.graph.node[-1]
    assert last.op_type == op and last.output[0] == "y" and len(last.input) == 3
    original_bias = initializers(model)["b"]
    np.testing.assert_array_equal(initializers(without)[without.graph.node[-1].input[2]], original_bias)
    shifted = initializers(with_shift)[last.input[2]]
    assert shifted.shape == original_bias.shape and not np.allclose(shifted, original_bias, atol=1e-4)


def test_bias_correction_reduces_held_out_mean_error_of_a_conv():
    """Inputs of mean 2 (unit variance): on held-out data too, the corrected conv's mean
    output error is well below the uncorrected one's."""
    model, shape = _single("conv", np.random.default_rng(1))

    def batches(count, seed):
        return [{"x": (np.random.default_rng(seed + s).standard_normal((64,) + shape) + 2.0).astype(np.float32)}
                for s in range(count)]

    options = dict(calibration=batches(20, 0), keep=0.3, holdout_every=0, min_rank=2, conv_rank_multiple=1,
                   calib_batch=64, method="channel")
    test = batches(20, 1000)
    e_with = _mean_error("conv", model, compress(model, bias_correction=True, **options).model, test)
    e_without = _mean_error("conv", model, compress(model, bias_correction=False, **options).model, test)
    assert e_with <= 0.5 * e_without, (e_with, e_without)  # measured 0.0036 vs 0.0195


def test_sequential_bias_correction_restores_the_network_mean():
    """Sequential shifts restore E[x]W of the original network from the inputs each layer
    really receives, so the whole MLP's mean output on the calibration data is exact; without
    correction (or with independent shifts, which ignore the ReLUs' mean drift) it is not."""
    model = mlp(bias=0.0)
    calibration = [{"x": low_dim_rows(32, 64, 16, seed, noise=0.1, mean=3.0)} for seed in range(8)]
    options = dict(calibration=calibration, keep=0.2, min_rank=2, holdout_every=0)
    errors = {(mode, shift): _mean_error("mlp", model, compress(model, mode=mode, bias_correction=shift,
                                                                **options).model, calibration)
              for mode in ("sequential", "independent") for shift in (True, False)}
    assert errors["sequential", True] <= 1e-5
    assert errors["sequential", False] > 1e-3
    assert errors["independent", True] > 1e-2  # the shift of each layer alone cannot see upstream errors


# ---------------------------------------------------------------------------------------------
# 7. sequential vs independent, dependency waves


def test_sequential_beats_independent_at_low_keep():
    model = mlp((64, 64, 64, 64), seed=0, bias=0.1)
    calibration = [{"x": low_dim_rows(64, 64, 64, seed, noise=0.0)} for seed in range(10)]
    test = [{"x": low_dim_rows(256, 64, 64, 100, noise=0.0)}]
    options = dict(calibration=calibration, keep=0.1, min_rank=2, calib_batch=64)
    independent = compress(model, mode="independent", **options)
    sequential = compress(model, mode="sequential", **options)
    assert [layer.ranks for layer in sequential.report.layers] == [(3,)] * 3
    e_ind = output_error(model, independent.model, test)
    e_seq = output_error(model, sequential.model, test)
    assert e_seq <= 0.92 * e_ind, (e_seq, e_ind)  # measured 0.63 vs 0.76
    assert sequential.report.output_errors["y"] <= independent.report.output_errors["y"]
    # the first layer sees the original input in both modes: the same fit
    np.testing.assert_allclose(_product(sequential.model, "fc0"), _product(independent.model, "fc0"), rtol=1e-4, atol=1e-5)
    assert not np.allclose(_product(sequential.model, "fc2"), _product(independent.model, "fc2"), atol=1e-3)


def _product(model, layer):
    values = initializers(model)
    return values[f"{layer}/lrsd/U"].astype(np.float64) @ values[f"{layer}/lrsd/V"]


def _qkv_model(rng, d=16):
    """Q, K, V read the same input; their sum feeds an output projection (a second wave)."""
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="pre"),
             helper.make_node("MatMul", ["h", "wq"], ["q"], name="q"),
             helper.make_node("MatMul", ["h", "wk"], ["k"], name="k"),
             helper.make_node("MatMul", ["h", "wv"], ["v"], name="v"),
             helper.make_node("Add", ["q", "k"], ["qk"], name="add_qk"),
             helper.make_node("Add", ["qk", "v"], ["s"], name="add_v"),
             helper.make_node("MatMul", ["s", "wo"], ["y"], name="o")]
    inits = {n: (rng.standard_normal((d, d)) / 4).astype(np.float32) for n in ("wq", "wk", "wv", "wo")}
    return make_model(nodes, [("x", F, ["b", 4, d])], [("y", F, None)], inits)


def _waves(model):
    targets, graph = find_targets(model)
    return [[t.name for t in wave] for wave in dependency_waves(graph, list(targets.values()))]


def test_dependency_waves_group_parallel_branches():
    assert _waves(_qkv_model(np.random.default_rng(0))) == [["q", "k", "v"], ["o"]]


def test_dependency_waves_of_a_chain_and_of_skips():
    assert _waves(mlp((8, 8, 8, 8))) == [["fc0"], ["fc1"], ["fc2"]]
    rng = np.random.default_rng(1)
    w = {n: rng.standard_normal((8, 8)).astype(np.float32) for n in ("wa", "wb", "wc", "wd")}
    # x -> a -> (b, c in parallel) ; d reads x + c (skip): depth(d) = 2 like b and c
    nodes = [helper.make_node("MatMul", ["x", "wa"], ["a"], name="a"),
             helper.make_node("MatMul", ["a", "wb"], ["b"], name="b"),
             helper.make_node("MatMul", ["a", "wc"], ["c"], name="c"),
             helper.make_node("Add", ["x", "c"], ["xc"], name="skip"),
             helper.make_node("MatMul", ["xc", "wd"], ["d"], name="d"),
             helper.make_node("Add", ["b", "d"], ["y"], name="join")]
    model = make_model(nodes, [("x", F, ["n", 8])], [("y", F, None)], w)
    assert _waves(model) == [["a"], ["b", "c"], ["d"]]


def test_sequential_on_parallel_branches_matches_independent_in_the_first_wave():
    """Q/K/V form one wave fitted on the original input: the same factors as independent."""
    model = _qkv_model(np.random.default_rng(2), d=32)
    calibration = [{"x": np.random.default_rng(s).standard_normal((8, 4, 32)).astype(np.float32)} for s in range(5)]
    options = dict(calibration=calibration, keep=0.25, min_rank=2, holdout_every=0)
    sequential = compress(model, mode="sequential", **options).model
    independent = compress(model, mode="independent", **options).model
    for layer in ("q", "k", "v"):
        np.testing.assert_allclose(_product(sequential, layer), _product(independent, layer), rtol=1e-4, atol=1e-5)
    assert not np.allclose(_product(sequential, "o"), _product(independent, "o"), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# 8. the report: data errors and output errors from held-out batches


def _shifted_holdout_calibration():
    """10 batches; every 5th (indices 4 and 9, held out) is isotropic while the fitted ones lie
    in a 4-dimensional subspace: a fit that is exact on its data is far off on the held-out."""
    batches = []
    for i in range(10):
        if i % 5 == 4:
            batches.append({"x": np.random.default_rng(50 + i).standard_normal((16, 64)).astype(np.float32)})
        else:
            batches.append({"x": low_dim_rows(16, 64, 4, i, noise=0.001)})
    return batches


def _layer_errors(model, compressed, batches, layers=("fc0", "fc1", "fc2"), inputs=("x", "a0", "a1")):
    """‖X(W − UV)‖ / ‖XW‖ per layer with X the original model's inputs on `batches`."""
    xs = outputs(model, batches, list(inputs))
    weights = initializers(model)
    errors = {}
    for i, (layer, x) in enumerate(zip(layers, xs)):
        w = weights[f"w{i}"].astype(np.float64)
        errors[layer] = float(np.linalg.norm(x @ (w - _product(compressed, layer))) / np.linalg.norm(x @ w))
    return errors


def test_report_data_errors_and_output_errors_are_held_out():
    model = mlp()
    batches = _shifted_holdout_calibration()
    fit, held = [b for i, b in enumerate(batches) if i % 5 != 4], [batches[4], batches[9]]
    result = compress(model, calibration=batches, keep=0.25, min_rank=2, holdout_every=5, bias_correction=False)
    layers = {layer.name: layer for layer in result.report.layers}
    expected_held = _layer_errors(model, result.model, held)
    expected_fit = _layer_errors(model, result.model, fit)
    for name, layer in layers.items():
        assert layer.data_error == pytest.approx(expected_held[name], rel=1e-3, abs=1e-6)
    assert expected_fit["fc0"] < 0.05 < 0.3 < expected_held["fc0"]  # the two really differ
    # output errors: exactly the held-out batches' relative error
    on_held, on_fit = output_error(model, result.model, held), output_error(model, result.model, fit)
    assert result.report.output_errors["y"] == pytest.approx(on_held, rel=1e-4)
    assert on_fit < 0.5 * on_held


def test_report_without_holdout_uses_the_fit_data():
    model = mlp()
    result = compress(model, calibration=MLP_CALIBRATION, keep=0.25, min_rank=2, holdout_every=0,
                      bias_correction=False)
    expected = _layer_errors(model, result.model, MLP_CALIBRATION)
    for layer in result.report.layers:
        assert layer.data_error == pytest.approx(expected[layer.name], rel=1e-3, abs=1e-6)
    assert "y" in result.report.output_errors  # measured on seeded random inputs instead


def test_report_sequential_data_error_is_held_out():
    model = mlp()
    batches = _shifted_holdout_calibration()
    held = [batches[4], batches[9]]
    result = compress(model, calibration=batches, keep=0.25, min_rank=2, holdout_every=5, mode="sequential",
                      bias_correction=False)
    # the first layer sees the original input in both modes, so its held-out error is well defined
    expected = _layer_errors(model, result.model, held)["fc0"]
    assert result.report.layers[0].data_error == pytest.approx(expected, rel=1e-3)


def test_report_data_error_only_for_data_aware_layers():
    """Data-free layers, dense layers and layers whose statistics exceed the memory cap (fitted
    without data) have no data error."""
    rng = np.random.default_rng(7)
    nodes = [helper.make_node("MatMul", ["x", "w_big"], ["h"], name="big"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w_small"], ["s"], name="small"),
             helper.make_node("MatMul", ["s", "w_tiny"], ["y"], name="tiny")]
    inits = {"w_big": (rng.standard_normal((512, 64)) / 20).astype(np.float32),
             "w_small": (rng.standard_normal((64, 64)) / 8).astype(np.float32),
             "w_tiny": (rng.standard_normal((64, 2)) / 8).astype(np.float32)}
    model = make_model(nodes, [("x", F, ["n", 512])], [("y", F, None)], inits)
    calibration = [{"x": rng.standard_normal((16, 512)).astype(np.float32)} for _ in range(4)]
    options = dict(keep=0.25, min_rank=2, overrides=(LayerOverride("tiny", skip=True),))
    free = compress(model, **options)
    assert all(layer.data_error is None for layer in free.report.layers)
    # 1 MB holds the 64-wide Gram, not the 512-wide one (2 MB)
    capped = compress(model, calibration=calibration, stats_memory_mb=1, **options)
    layers = {layer.name: layer for layer in capped.report.layers}
    assert layers["big"].method == "svd" and layers["big"].data_error is None
    assert layers["small"].method == "svd" and 0 < layers["small"].data_error < 1
    assert layers["tiny"].method == "dense" and layers["tiny"].data_error is None
    roomy = compress(model, calibration=calibration, stats_memory_mb=64, **options)
    assert {layer.name: layer.data_error is not None for layer in roomy.report.layers} == {
        "big": True, "small": True, "tiny": False}
    # the capped layer falls back to the data-free factors
    np.testing.assert_allclose(_product(capped.model, "big"), _product(free.model, "big"), rtol=1e-4, atol=1e-6)


def test_merged_waves_keep_order_and_cap_the_stage_count():
    from onnx_lrsd.passes.reconstruct_feature_maps import merged_waves

    waves = [[1, 2, 3], [4], [5], [6], [7], [8, 9], [10]]
    for stages in (1, 2, 3, 4, 7, 20):
        merged = merged_waves(waves, stages)
        assert len(merged) == min(stages, len(waves))
        assert [x for m in merged for x in m] == list(range(1, 11))
    assert merged_waves(waves, 3) == [[1, 2, 3], [4, 5, 6], [7, 8, 9, 10]]


def test_data_aware_fit_keeps_the_kind_with_the_lowest_held_out_error():
    """With method auto, every applicable conv kind is fitted and the lowest held-out data
    error wins, whatever its MACs."""
    model = cnn()
    options = dict(calibration=CNN_CALIBRATION, keep=0.5, min_rank=2, conv_rank_multiple=1, holdout_every=3)
    chosen = {layer.name: layer for layer in compress(model, **options).report.layers}
    for method in ("channel", "spatial", "tucker2"):
        forced = compress(model, overrides=(LayerOverride("*", method=method),), **options)
        for layer in forced.report.layers:
            if layer.method == method and chosen[layer.name].data_error is not None:
                assert chosen[layer.name].data_error <= layer.data_error + 1e-12


def test_small_layers_stay_dense_under_min_layer_share():
    model = mlp(widths=(128, 128, 128, 2))
    names = {layer.name: layer for layer in compress(model, keep=0.5, min_rank=1).report.layers}
    tiny = min(names.values(), key=lambda layer: layer.params_before)
    assert tiny.method == "dense" and "factorizable parameters" in tiny.reason
    again = {layer.name: layer for layer in compress(model, keep=0.5, min_rank=1, min_layer_share=0).report.layers}
    assert again[tiny.name].method == "svd"
