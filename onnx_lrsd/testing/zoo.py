"""onnx's bundled model-zoo graphs with seeded random weights.

The onnx wheel ships `onnx/backend/test/data/light/light_*.onnx` (IR 3, opset 9): real
architectures whose weights are `ConstantOfShape` placeholders filled with 0.02. `zoo_model`
replaces every placeholder (and the few small real tensors left beside them) with a seeded random
initializer scaled by the tensor's role, read from the consumer slot it feeds: Conv/Gemm/MatMul
weights with He variance (gain 2 after a ReLU, 1 otherwise), small biases, BatchNormalization
scale/var near 1 and mean near 0, and a small scale on the last BatchNormalization of each
residual branch (else ResNet-50's activations grow ~2000x through depth). One probe run then
rescales the classifier so the logits have a moderate spread. The models are for "loads
anything" and latency tests, not for accuracy.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..runtime.session import make_session
from ..errors import LrsdError
from ..model.io import default_opset
from ..runtime.feeds import random_feeds

log = logging.getLogger(__name__)

ZOO_MODELS: tuple[str, ...] = (
    "bvlc_alexnet",
    "densenet121",
    "inception_v1",
    "inception_v2",
    "resnet50",
    "shufflenet",
    "squeezenet",
    "vgg19",
    "zfnet512",
)

LOGIT_STD = 1.0
"""Target standard deviation of the classifier's logits (met within a factor of √2)."""

RESIDUAL_SCALE = 0.25
"""BatchNormalization scale at the end of a residual branch added to an identity skip (near
zero-γ init keeps depth stable). Branches summed without an identity get 1/√(branches)."""

_BIAS_STD = 0.01
_BN_MEAN_STD = 0.05
_OTHER_STD = 0.02

# Ops through which a tensor keeps its role (its values are only viewed differently).
_VIEW_OPS = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze"}
# Ops through which a ReLU output stays non-negative with the same second moment (roughly).
_PASS_BACK_OPS = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Dropout", "MaxPool"}
# Ops with out(a·x) = a·out(x) for a > 0 in their first input: logits scale through them.
_HOMOGENEOUS_OPS = {
    "Relu", "Dropout", "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
}


@dataclass(frozen=True)
class _Role:
    """What a weight tensor is, judged by the consumer slot it feeds."""

    kind: str  # "weight", "bias", "scale", "mean", "var" or "other"
    fan_in: int = 1
    gain: float = 2.0  # weight variance = gain / fan_in
    scale: float = 1.0  # centre of a "scale" tensor's values


class _GraphIndex:
    """Producers, consumers and initializers of a graph, for judging tensor roles."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.inits = {init.name: init for init in graph.initializer}
        self.opset = default_opset(model) or 1
        self.producers = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in graph.node:
            for slot, name in enumerate(node.input):
                self.consumers.setdefault(name, []).append((node, slot))

    def after_relu(self, name: str) -> bool:
        """Whether `name` is a ReLU output, looking back through views and pooling."""
        node = self.producers.get(name)
        while node is not None and node.op_type in _PASS_BACK_OPS:
            node = self.producers.get(node.input[0])
        return node is not None and node.op_type == "Relu"

    def is_activation(self, name: str) -> bool:
        """Whether `name` depends on the graph's inputs (not a view of a constant or placeholder)."""
        source = _source_tensor(name, self)
        node = self.producers.get(source)
        if node is None:
            return source not in self.inits
        return node.op_type not in ("ConstantOfShape", "Constant")

    def residual_scale(self, name: str) -> float:
        """Scale for a BatchNormalization output `name` that a Sum/Add adds to other activations:
        RESIDUAL_SCALE next to an identity skip, 1/√(branches) when every branch is normalised,
        1 when `name` is not summed."""
        for node, _ in self.consumers.get(name, []):
            if node.op_type not in ("Sum", "Add"):
                continue
            branches = [i for i in node.input if self.is_activation(i)]
            if len(branches) < 2:
                continue
            producers = [self.producers.get(i) for i in branches]
            if all(p is not None and p.op_type == "BatchNormalization" for p in producers):
                return 1.0 / math.sqrt(len(branches))
            return RESIDUAL_SCALE
        return 1.0


def zoo_path(name: str) -> Path:
    """Path of the bundled `light_<name>.onnx` file."""
    if name not in ZOO_MODELS:
        raise LrsdError(f"unknown zoo model '{name}' (choose from {', '.join(ZOO_MODELS)})")
    path = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / f"light_{name}.onnx"
    if not path.is_file():
        raise LrsdError(f"zoo model '{name}' is missing from the installed onnx {onnx.__version__} ({path})")
    return path


def zoo_model(name: str, seed: int = 0) -> onnx.ModelProto:
    """Load a zoo model with seeded random weights; the same seed gives identical bytes."""
    model = onnx.load(zoo_path(name))
    feeds = random_feeds(model, seed=seed)
    weights = _random_weights(model, np.random.default_rng(seed))
    _detach_weights(model, weights)
    _calibrate_logits(model, weights, feeds)
    _store_initializers(model, weights)
    return model


def _random_weights(model: onnx.ModelProto, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random values by tensor name for every float ConstantOfShape placeholder with a constant
    shape, then for every float initializer with a known role.

    The files keep a few small tensors (biases, BatchNormalization statistics) whose partner
    weights became placeholders; kept, they no longer match (inception_v2's stem divides by
    √7000 and its outputs barely depend on the input), so they are drawn afresh too.
    """
    index = _GraphIndex(model)
    weights: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        if node.op_type != "ConstantOfShape" or not node.input or node.input[0] not in index.inits:
            continue
        dtype = _fill_dtype(node)
        if dtype.kind != "f":
            continue
        shape = tuple(int(d) for d in numpy_helper.to_array(index.inits[node.input[0]]))
        weights[node.output[0]] = _random_values(_role(node.output[0], shape, index), shape, dtype, rng)
    for init in model.graph.initializer:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type))
        if dtype.kind != "f":
            continue
        role = _role(init.name, tuple(init.dims), index)
        if role.kind != "other":
            weights[init.name] = _random_values(role, tuple(init.dims), dtype, rng)
    return weights


def _detach_weights(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> None:
    """Make `weights` plain graph inputs: drop their placeholder nodes, their initializers and
    shape initializers nothing else uses."""
    graph = model.graph
    removed = [i for i, node in enumerate(graph.node) if node.op_type == "ConstantOfShape" and node.output[0] in weights]
    shapes = {graph.node[i].input[0] for i in removed}
    for i in reversed(removed):
        del graph.node[i]
    still_used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    dropped = (shapes - still_used) | set(weights)
    for i in reversed([i for i, init in enumerate(graph.initializer) if init.name in dropped]):
        del graph.initializer[i]
    for i in reversed([i for i, inp in enumerate(graph.input) if inp.name in dropped]):
        del graph.input[i]
    for name, values in weights.items():
        elem_type = onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
        graph.input.append(onnx.helper.make_tensor_value_info(name, elem_type, list(values.shape)))
    log.debug("drawing %d tensors (%d placeholders), dropped %d shape initializers",
              len(weights), len(removed), len(shapes - still_used))


def _store_initializers(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> None:
    """Write `weights` as initializers; they stay graph inputs only for IR < 4, which needs that."""
    graph = model.graph
    for name, values in weights.items():
        tensor = graph.initializer.add()
        tensor.name = name
        tensor.data_type = onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
        tensor.dims.extend(values.shape)
        tensor.raw_data = values.astype(values.dtype.newbyteorder("<"), copy=False).tobytes()
    if model.ir_version >= 4:
        for i in reversed([i for i, inp in enumerate(graph.input) if inp.name in weights]):
            del graph.input[i]


def _fill_dtype(node: onnx.NodeProto) -> np.dtype:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t).dtype
    return np.dtype(np.float32)


def _role(name: str, shape: tuple[int, ...], index: _GraphIndex) -> _Role:
    """Classify a tensor by its first consumer, looking through view ops (tracking the shape)."""
    uses = index.consumers.get(name, [])
    while uses and uses[0][0].op_type in _VIEW_OPS and uses[0][1] == 0:
        node = uses[0][0]
        viewed = _view_shape(node, shape, index)
        if viewed is None:
            return _Role("other")
        shape = viewed
        uses = index.consumers.get(node.output[0], [])
    if not uses:
        return _Role("other")
    node, slot = uses[0]
    op = node.op_type
    gain = 2.0 if index.after_relu(node.input[0]) else 1.0  # He: ReLU halves the second moment
    if op == "Conv" and slot == 1 and len(shape) >= 2:
        return _Role("weight", math.prod(shape[1:]), gain)
    if op == "Gemm" and slot == 1 and len(shape) == 2:
        return _Role("weight", shape[1] if _attr(node, "transB", 0) else shape[0], gain)
    if op == "MatMul" and slot == 1 and len(shape) >= 2:
        return _Role("weight", shape[-2], gain)
    if (op in ("Conv", "Gemm") and slot == 2) or op in ("Add", "Sum"):
        return _Role("bias")
    if op == "BatchNormalization" and slot == 1:
        return _Role("scale", scale=index.residual_scale(node.output[0]))
    if op == "BatchNormalization" and 2 <= slot <= 4:
        return _Role(("bias", "mean", "var")[slot - 2])
    if op == "Mul":
        return _Role("scale")
    return _Role("other")


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _view_shape(node: onnx.NodeProto, shape: tuple[int, ...], index: _GraphIndex) -> tuple[int, ...] | None:
    """Output shape of a view op applied to `shape`, or None when it is not constant."""
    op, inits = node.op_type, index.inits
    if op == "Identity":
        return shape
    if op == "Flatten":
        axis = int(_attr(node, "axis", 1))
        axis = axis + len(shape) if axis < 0 else axis
        return (math.prod(shape[:axis]), math.prod(shape[axis:]))
    if op == "Reshape":
        if len(node.input) < 2 or node.input[1] not in inits:
            return None
        target = [int(d) for d in numpy_helper.to_array(inits[node.input[1]])]
        out = [shape[i] if d == 0 and not _attr(node, "allowzero", 0) else d for i, d in enumerate(target)]
        if -1 in out:
            known = math.prod(d for d in out if d != -1)
            out[out.index(-1)] = math.prod(shape) // known if known else 0
        return tuple(out)
    if index.opset >= 13 and len(node.input) > 1:
        if node.input[1] not in inits:
            return None
        axes = [int(a) for a in numpy_helper.to_array(inits[node.input[1]])]
    else:
        axes = [int(a) for a in _attr(node, "axes", [])]
    if op == "Unsqueeze":
        rank = len(shape) + len(axes)
        positions = sorted(a + rank if a < 0 else a for a in axes)
        out = list(shape)
        for a in positions:
            out.insert(a, 1)
        return tuple(out)
    # Squeeze
    if not axes:
        return tuple(d for d in shape if d != 1)
    drop = {a + len(shape) if a < 0 else a for a in axes}
    return tuple(d for i, d in enumerate(shape) if i not in drop)


def _random_values(role: _Role, shape: tuple[int, ...], dtype: np.dtype, rng: np.random.Generator) -> np.ndarray:
    """Values for one tensor. Weights are He-uniform: the He-normal variance gain/fan_in,
    drawn 4x faster than normals (VGG-19 has 144M weights); spectra are alike."""
    if role.kind == "weight":
        bound = math.sqrt(3.0 * role.gain / max(role.fan_in, 1))
        values = rng.random(size=shape, dtype=np.float32)
        values *= np.float32(2.0 * bound)
        values -= np.float32(bound)
    elif role.kind in ("scale", "var"):
        values = rng.uniform(0.8, 1.2, size=shape) * role.scale
    else:
        std = {
            "bias": _BIAS_STD,
            "mean": _BN_MEAN_STD,
            "other": _OTHER_STD,
        }[role.kind]
        values = rng.standard_normal(size=shape, dtype=np.float32) * np.float32(std)
    return np.ascontiguousarray(values, dtype=dtype)


def _calibrate_logits(model: onnx.ModelProto, weights: dict[str, np.ndarray], feeds: dict[str, np.ndarray]) -> None:
    """Scale the classifier's weights (by a power of two) so the logits' std is near LOGIT_STD.

    The logits are the input of a final (Log)Softmax, else the first graph output; the scale goes
    to the nearest Gemm/Conv/MatMul above them through positively homogeneous ops. `model` still
    takes `weights` as inputs, so the probe run needs no serialized weights.
    """
    graph = model.graph
    index = _GraphIndex(model)
    logits = graph.output[0].name
    final = index.producers.get(logits)
    if final is not None and final.op_type in ("Softmax", "LogSoftmax"):
        logits = final.input[0]
    layer = index.producers.get(logits)
    while layer is not None and layer.op_type in _HOMOGENEOUS_OPS:
        layer = index.producers.get(layer.input[0])
    if layer is None or layer.op_type not in ("Gemm", "Conv", "MatMul"):
        log.warning("no classifier layer found above '%s'; logits left unscaled", logits)
        return
    params = [_source_tensor(name, index) for name in layer.input[1:3]]
    if params[0] not in weights:
        log.warning("classifier '%s' weight is not a drawn tensor; logits left unscaled", layer.output[0])
        return

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.append(onnx.ValueInfoProto(name=logits))
    session = make_session(probe, threads=1)
    values = session.run(None, {**feeds, **weights})[0]
    std = float(np.std(values.astype(np.float64)))
    if not math.isfinite(std) or std == 0.0:
        log.warning("logits '%s' have std %s; left unscaled", logits, std)
        return
    factor = 2.0 ** round(math.log2(LOGIT_STD / std))
    scaled = [name for name in params if name in weights]
    for name in scaled:
        weights[name] = weights[name] * weights[name].dtype.type(factor)
    log.debug("logits '%s' std %.3g: scaled %s by %g", logits, std, scaled, factor)


def _source_tensor(name: str, index: _GraphIndex) -> str:
    """The tensor that `name` is a view of (through Reshape, Unsqueeze, ...)."""
    node = index.producers.get(name)
    while node is not None and node.op_type in _VIEW_OPS:
        name = node.input[0]
        node = index.producers.get(name)
    return name
