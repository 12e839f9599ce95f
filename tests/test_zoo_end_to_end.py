"""onnx's bundled model-zoo graphs (seeded random weights) end to end: each loads, compresses
at keep=0.5 into a valid, smaller model that onnxruntime runs, and at full rank reproduces the
original outputs (relative error <= 1e-4).

Cost (one BLAS thread): the exact SVDs of the big classifier Gemms dominate; AlexNet's
4096×4096 fc7 alone takes over a minute at full rank. The default run therefore gives
AlexNet's two big Gemms (n16 9216→4096, n19 4096→4096) keep=0.02 (randomized SVD) and
leaves them out of its full-rank check; the complete runs of AlexNet, ZFNet-512, VGG-19 and
the mid-sized models are marked slow (`pytest -m slow`).
"""
import functools

import numpy as np
import onnx
import pytest

from onnx_lrsd.api import compress
from onnx_lrsd.runtime.bench import make_session, run_outputs
from onnx_lrsd.config import LayerOverride
from onnx_lrsd.runtime.feeds import random_feeds
from onnx_lrsd.testing.zoo import ZOO_MODELS, zoo_model

FULL_TOL = 1e-4
ALEXNET_BIG_GEMMS = ("n16", "n19")

DEFAULT = ("squeezenet", "shufflenet", "inception_v1", "resnet50")
SLOW = ("densenet121", "inception_v2", "zfnet512", "vgg19")
assert set(DEFAULT + SLOW + ("bvlc_alexnet",)) == set(ZOO_MODELS)


@functools.lru_cache(maxsize=None)
def _model_bytes(name):
    return zoo_model(name, seed=0).SerializeToString()


def _model(name):
    return onnx.load_from_string(_model_bytes(name))


@functools.lru_cache(maxsize=None)
def _reference(name):
    """Seeded inputs (batch 1) and the original model's outputs."""
    model = _model(name)
    feeds = random_feeds(model, seed=7)
    return feeds, run_outputs(make_session(model, threads=2), feeds)


def _errors(name, compressed):
    feeds, reference = _reference(name)
    outputs = run_outputs(make_session(compressed, threads=2), feeds)
    errors = []
    for ref, out in zip(reference, outputs):
        assert ref.shape == out.shape
        ref, out = ref.astype(np.float64), out.astype(np.float64)
        assert np.isfinite(out).all()
        errors.append(float(np.linalg.norm(ref - out) / np.linalg.norm(ref)))
    return errors


def _real_inputs(model):
    inits = {t.name for t in model.graph.initializer}
    return [(i.name, i.type.SerializeToString()) for i in model.graph.input if i.name not in inits]


def _check_interface(source, out):
    assert _real_inputs(out) == _real_inputs(source)
    assert [(o.name, o.type.SerializeToString()) for o in out.graph.output] == \
        [(o.name, o.type.SerializeToString()) for o in source.graph.output]
    assert out.ir_version == source.ir_version == 3
    assert [(o.domain, o.version) for o in out.opset_import] == [(o.domain, o.version) for o in source.opset_import]


def _check_keep_half(name, overrides=(), verify=False):
    model = _model(name)
    result = compress(model, keep=0.5, overrides=overrides, verify=verify)
    out = result.model
    onnx.checker.check_model(out)
    _check_interface(model, out)
    report = result.report
    factorized = [layer for layer in report.layers if layer.method != "dense"]
    assert factorized, "nothing was factorized"
    budgets = {o.pattern: o.keep for o in overrides if o.keep is not None}
    for layer in factorized:
        assert layer.params_after <= budgets.get(layer.name, 0.5) * layer.params_before, layer
        assert layer.macs_after < layer.macs_before, layer
    for layer in report.layers:
        assert layer.method != "dense" or layer.reason, layer
    assert report.after.params < report.before.params
    assert report.after.macs < report.before.macs
    errors = _errors(name, out)
    assert all(0 < e < 10 for e in errors), errors  # the outputs changed but stayed finite
    if verify:
        assert report.output_errors.keys() == {o.name for o in model.graph.output}
        assert all(0 < e < 10 for e in report.output_errors.values()), report.output_errors
    return result


def _check_full_rank(name, skip=()):
    model = _model(name)
    overrides = tuple(LayerOverride(n, skip=True) for n in skip) + (LayerOverride("*", rank="full"),)
    result = compress(model, overrides=overrides, verify=False)
    layers = {layer.name: layer for layer in result.report.layers}
    assert all(layer.method != "dense" for n, layer in layers.items() if n not in skip)
    errors = _errors(name, result.model)
    assert max(errors) <= FULL_TOL, errors
    return result


@pytest.mark.parametrize("name", DEFAULT)
def test_zoo_model_compresses_at_keep_half(name):
    _check_keep_half(name, verify=name in ("squeezenet", "inception_v1"))


@pytest.mark.parametrize("name", DEFAULT)
def test_zoo_model_full_rank_matches(name):
    _check_full_rank(name)


def test_alexnet_compresses_at_keep_half_with_small_big_gemms():
    result = _check_keep_half("bvlc_alexnet", overrides=tuple(LayerOverride(n, keep=0.02)
                                                               for n in ALEXNET_BIG_GEMMS))
    skipped = {s.name: s.reason for s in result.report.skipped}
    assert skipped == {n: "grouped conv (group=2)" for n in ("n4", "n10", "n12")}
    layers = {layer.name: layer for layer in result.report.layers}
    assert layers["n22"].method == "svd"
    # the 11x11 stem conv holds 0.06% of the parameters: left dense by min_layer_share
    assert layers["n0"].method == "dense" and "factorizable parameters" in layers["n0"].reason


def test_alexnet_full_rank_matches_without_its_big_gemms():
    result = _check_full_rank("bvlc_alexnet", skip=ALEXNET_BIG_GEMMS)
    assert {layer.name for layer in result.report.layers if layer.method != "dense"} == {"n0", "n8", "n22"}


@pytest.mark.slow
def test_alexnet_compresses_at_keep_half():
    _check_keep_half("bvlc_alexnet")


@pytest.mark.slow
def test_alexnet_full_rank_matches():
    _check_full_rank("bvlc_alexnet")


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_slow_zoo_model_compresses_at_keep_half(name):
    _check_keep_half(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_slow_zoo_model_full_rank_matches(name):
    _check_full_rank(name)
