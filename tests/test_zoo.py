"""onnx's model-zoo graphs with seeded random weights: valid, runnable, well scaled, deterministic."""
import math

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnx_lrsd.runtime.bench import make_session, run_outputs
from onnx_lrsd.errors import LrsdError
from onnx_lrsd.runtime.feeds import random_feeds
from onnx_lrsd.testing.zoo import RESIDUAL_SCALE, ZOO_MODELS, zoo_model, zoo_path


def test_zoo_names_and_paths():
    assert len(ZOO_MODELS) == 9
    for name in ZOO_MODELS:
        assert zoo_path(name).name == f"light_{name}.onnx"
    with pytest.raises(LrsdError, match="unknown zoo model 'resnet18'.*bvlc_alexnet.*zfnet512"):
        zoo_path("resnet18")


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_zoo_model_is_valid_runnable_and_non_degenerate(name):
    original = onnx.load(zoo_path(name), load_external_data=False)
    model = zoo_model(name)

    assert model.ir_version == original.ir_version == 3
    assert [(o.domain, o.version) for o in model.opset_import] == [(o.domain, o.version) for o in original.opset_import]
    assert not [n for n in model.graph.node if n.op_type == "ConstantOfShape"]
    init_names = [t.name for t in model.graph.initializer]
    assert not [n for n in init_names if n.endswith("__SHAPE")]
    input_names = [i.name for i in model.graph.input]
    assert set(init_names) <= set(input_names)  # IR 3: every initializer is listed as an input
    assert len(input_names) == len(init_names) + 1  # ... and nothing else besides the image
    assert [o.name for o in model.graph.output] == [o.name for o in original.graph.output]

    data = model.SerializeToString()
    onnx.checker.check_model(data)
    session = make_session(data, threads=2)
    (y,) = run_outputs(session, random_feeds(model, seed=0))
    (y_other,) = run_outputs(session, random_feeds(model, seed=1))
    y, y_other = y.astype(np.float64), y_other.astype(np.float64)
    assert np.isfinite(y).all() and np.isfinite(y_other).all()
    assert y.std() > 1e-5 * max(np.abs(y).max(), 1e-30)
    assert np.linalg.norm(y - y_other) > 1e-3 * np.linalg.norm(y)  # outputs depend on the input
    if original.graph.node[-1].op_type == "Softmax":
        assert y.sum() == pytest.approx(1.0, abs=1e-4)
        assert y.max() < 0.5, "softmax close to one-hot: logits too spread"
        assert y.max() > 2.0 / y.size, "softmax close to uniform: logits too flat"
    else:  # densenet121 ends in the classifier conv: raw logits
        assert 0.5 < y.std() < 2.0


def test_zoo_model_is_deterministic():
    first = zoo_model("squeezenet", seed=0).SerializeToString()
    assert zoo_model("squeezenet", seed=0).SerializeToString() == first
    assert zoo_model("squeezenet", seed=1).SerializeToString() != first


def _consumer_slots(model):
    slots = {}
    for node in model.graph.node:
        for slot, name in enumerate(node.input):
            slots.setdefault(name, []).append((node.op_type, slot))
    return slots


def test_resnet50_weights_follow_their_roles_and_activations_stay_bounded():
    model = zoo_model("resnet50")
    slots = _consumer_slots(model)
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    assert len(arrays) == 268  # 239 placeholders, 28 real BatchNormalization tensors drawn afresh, 1 unused

    scale_means = []
    for name, w in arrays.items():
        if name not in slots:
            continue  # an unused tensor of the original file
        (op, slot), = slots[name]
        if op == "Conv" and slot == 1:
            fan_in = math.prod(w.shape[1:])
            gain = w.astype(np.float64).var() * fan_in  # He: 2 after a ReLU, 1 otherwise
            assert min(abs(gain - 2.0), abs(gain - 1.0)) < 0.1, (name, gain)
        elif op == "BatchNormalization" and slot == 4:
            assert w.min() >= 0.8 - 1e-6 and w.max() <= 1.2 + 1e-6
        elif op == "BatchNormalization" and slot == 3:
            assert abs(w.mean()) < 0.05 and w.std() < 0.1
        elif op == "BatchNormalization" and slot == 1:
            scale_means.append(float(w.mean()))
        elif op == "BatchNormalization" and slot == 2:
            assert w.std() < 0.05
    # Branch ends: 12 identity blocks get RESIDUAL_SCALE; 4 projection blocks sum two
    # normalised branches, each scaled by 1/√2; all other scales are about 1.
    centres = sorted(min((RESIDUAL_SCALE, 0.5**0.5, 1.0), key=lambda c: abs(c - m)) for m in scale_means)
    assert centres.count(RESIDUAL_SCALE) == 12 and centres.count(0.5**0.5) == 8
    assert len(centres) == 53
    assert all(abs(m - c) < 0.05 * c for m, c in zip(sorted(scale_means), centres))

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    relus = [n.output[0] for n in model.graph.node if n.op_type == "Relu"]
    probe.graph.output.extend(onnx.ValueInfoProto(name=r) for r in relus)
    outputs = run_outputs(make_session(probe, threads=2), random_feeds(model))[1:]
    rms = [float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) for x in outputs]
    assert len(rms) == 49
    assert 0.1 < min(rms) and max(rms) < 10, rms  # without the branch scales: ~3000 at the end
