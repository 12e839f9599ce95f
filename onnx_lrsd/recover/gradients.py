"""Loss and gradients of an ONNX model with respect to chosen initializers, run by onnxruntime.

`LossGradient` appends a loss to the model, makes the trainable initializers graph inputs and
builds the adjoint (reverse-mode derivative) as another ONNX model that onnxruntime executes.
The adjoint engine is `onnx_ad` (reverse mode by graph transformation); nothing outside this
module knows that. Losses, with y the model output and t the teacher's:

    mse:  L = mean((y - t)²) / s            (s: a fixed scale, e.g. mean(t²) on the data)
    kl:   L = mean over rows of Σ_c p_c (log p_c − log q_c),   p = teacher, q = student

For `kl` the student's log q is LogSoftmax of the logits (of the Softmax's input when the
output is a Softmax), so no log of a rounded probability is differentiated.
"""
from __future__ import annotations

import logging
import re
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import LrsdError
from ..model.io import default_opset

log = logging.getLogger(__name__)

LOSSES = ("mse", "kl")
MIN_OPSET = 13
"""onnx_ad's Softmax/ReduceSum rules follow opset 13; older models are converted to 17."""
GATHER_MIN_OPSET = 16
"""The adjoint of a Gather is a ScatterND with reduction "add" (opset 16): a model whose trainable
tensor is a Gather's table (a factorized embedding) is converted to 17 below it."""
CONVERT_TO = 17
TARGET = "lrsd_target"
TEACHER_PROB = "lrsd_teacher_prob"
TEACHER_LOGP = "lrsd_teacher_logp"
LOSS = "lrsd_loss"
SEED = "lrsd_adj_loss"
PROB_FLOOR = 1e-12


class UnsupportedOp(LrsdError):
    """The adjoint cannot be built: an op reached by a trainable tensor has no rule (for the
    input positions `inputs`; None: for any of its inputs)."""

    def __init__(self, op_type: str, node: str, detail: str = "", inputs: Optional[Tuple[int, ...]] = None):
        self.op_type, self.node, self.inputs = op_type, node, inputs
        where = f" (node '{node}')" if node else ""
        super().__init__(f"no gradient rule for {op_type}{where}" + (f": {detail}" if detail else ""))


def promote_constants(model: onnx.ModelProto) -> None:
    """Turn `Constant` nodes holding a tensor (`value`) into initializers, in place (PP-OCR
    stores its weights that way; an initializer can become a trainable graph input)."""
    keep = []
    for node in model.graph.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and set(attrs) == {"value"}:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attrs["value"].t)
            tensor.name = node.output[0]
            model.graph.initializer.append(tensor)
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def densify_sparse(model: onnx.ModelProto) -> None:
    """Sparse initializers become dense ones, in place (onnxruntime densifies them anyway)."""
    from onnx.numpy_helper import to_array

    for sparse in model.graph.sparse_initializer:
        dense = np.zeros(tuple(sparse.dims), dtype=onnx.helper.tensor_dtype_to_np_dtype(sparse.values.data_type))
        values = to_array(sparse.values)
        indices = to_array(sparse.indices)
        if indices.ndim == 1:
            dense.reshape(-1)[indices] = values
        else:
            dense[tuple(indices.T)] = values
        model.graph.initializer.append(numpy_helper.from_array(dense, sparse.values.name))
    del model.graph.sparse_initializer[:]


def prepared_copy(model: onnx.ModelProto, trainable: Sequence[str] = ()) -> onnx.ModelProto:
    """A copy ready for differentiation: opset ≥ 13 (≥ 16 when a `trainable` tensor is a
    Gather's table), weights as dense initializers."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    promote_constants(copy)
    densify_sparse(copy)
    tables = {n.input[0] for n in copy.graph.node if n.op_type == "Gather" and n.input}
    least = GATHER_MIN_OPSET if tables.intersection(trainable) else MIN_OPSET
    if default_opset(copy) < least:
        from onnx import version_converter

        try:
            copy = version_converter.convert_version(copy, CONVERT_TO)
        except Exception as exc:  # the converter raises its own C++ error types
            raise LrsdError(f"cannot convert the model to opset {CONVERT_TO} for gradients: "
                            f"{' '.join(str(exc).split())}") from None
    return copy


def _producer(model: onnx.ModelProto, name: str) -> Optional[onnx.NodeProto]:
    """The node producing `name`, looking through Identity nodes."""
    by_output = {o: n for n in model.graph.node for o in n.output}
    node = by_output.get(name)
    while node is not None and node.op_type == "Identity":
        node = by_output.get(node.input[0])
    return node


def _softmax_axis(node: onnx.NodeProto) -> int:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), -1)


def _value_info(model: onnx.ModelProto, name: str) -> onnx.ValueInfoProto:
    for value in list(model.graph.output) + list(model.graph.input):
        if value.name == name:
            return value
    raise LrsdError(f"'{name}' is not an output of the model")


def add_loss(model: onnx.ModelProto, output: str, loss: str, output_is_probability: bool,
             mse_scale: float = 1.0) -> Tuple[str, ...]:
    """Append the loss of `output` to `model` in place; its only output becomes `LOSS`.
    Returns the names of the target inputs the loss reads."""
    if loss not in LOSSES:
        raise LrsdError(f"unknown loss '{loss}' (choose from {', '.join(LOSSES)})")
    graph = model.graph
    info = _value_info(model, output)
    elem = info.type.tensor_type.elem_type
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    nodes = []

    def const(name: str, value) -> str:
        graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    if loss == "mse":
        target = helper.make_tensor_value_info(TARGET, elem, None)
        target.type.tensor_type.shape.CopyFrom(info.type.tensor_type.shape)
        nodes += [helper.make_node("Sub", [output, TARGET], ["lrsd_loss/diff"]),
                  helper.make_node("Mul", ["lrsd_loss/diff", "lrsd_loss/diff"], ["lrsd_loss/sq"]),
                  helper.make_node("ReduceMean", ["lrsd_loss/sq"], ["lrsd_loss/mean"], keepdims=0),
                  helper.make_node("Mul", ["lrsd_loss/mean", const("lrsd_loss/scale", 1.0 / mse_scale)], [LOSS])]
        targets = [target]
    else:
        producer = _producer(model, output)
        if producer is not None and producer.op_type == "Softmax":
            logits, axis = producer.input[0], _softmax_axis(producer)
            log_q = [helper.make_node("LogSoftmax", [logits], ["lrsd_loss/logq"], axis=axis)]
        elif output_is_probability:
            axis = -1
            log_q = [helper.make_node("Max", [output, const("lrsd_loss/floor", PROB_FLOOR)], ["lrsd_loss/q"]),
                     helper.make_node("Log", ["lrsd_loss/q"], ["lrsd_loss/logq"])]
        else:
            axis = -1
            log_q = [helper.make_node("LogSoftmax", [output], ["lrsd_loss/logq"], axis=-1)]
        targets = []
        for name in (TEACHER_PROB, TEACHER_LOGP):
            value = helper.make_tensor_value_info(name, elem, None)
            value.type.tensor_type.shape.CopyFrom(info.type.tensor_type.shape)
            targets.append(value)
        axes = numpy_helper.from_array(np.array([axis], np.int64), "lrsd_loss/axis")
        graph.initializer.append(axes)
        nodes += log_q + [
            helper.make_node("Sub", [TEACHER_LOGP, "lrsd_loss/logq"], ["lrsd_loss/ratio"]),
            helper.make_node("Mul", [TEACHER_PROB, "lrsd_loss/ratio"], ["lrsd_loss/terms"]),
            helper.make_node("ReduceSum", ["lrsd_loss/terms", "lrsd_loss/axis"], ["lrsd_loss/rows"], keepdims=0),
            helper.make_node("ReduceMean", ["lrsd_loss/rows"], [LOSS], keepdims=0)]
    graph.node.extend(nodes)
    graph.input.extend(targets)
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(LOSS, elem, []))
    return tuple(t.name for t in targets)


def _make_trainable_inputs(model: onnx.ModelProto, trainable: Sequence[str]) -> Dict[str, np.ndarray]:
    """Move the `trainable` initializers to graph inputs, in place; returns their values."""
    by_name = {t.name: t for t in model.graph.initializer}
    missing = [n for n in trainable if n not in by_name]
    if missing:
        raise LrsdError(f"not an initializer of the model: {missing[0]}")
    values = {}
    keep = [t for t in model.graph.initializer if t.name not in set(trainable)]
    for name in trainable:
        tensor = by_name[name]
        if tensor.data_type not in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16):
            raise LrsdError(f"trainable tensor '{name}' is not floating point")
        values[name] = numpy_helper.to_array(tensor).copy()
        model.graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return values


def fix_input_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> None:
    """Declare static shapes for the named inputs and re-run shape inference, in place
    (the Conv adjoint needs declared shapes)."""
    for value in model.graph.input:
        if value.name in shapes:
            dims = value.type.tensor_type.shape.dim
            shape = list(shapes[value.name])
            if len(dims) != len(shape):
                raise LrsdError(f"input '{value.name}' has rank {len(dims)}, the data has rank {len(shape)}")
            for dim, size in zip(dims, shape):
                dim.Clear()
                dim.dim_value = int(size)
    del model.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    model.graph.value_info.extend(inferred.graph.value_info)
    for out, inf in zip(model.graph.output, inferred.graph.output):
        out.type.CopyFrom(inf.type)


def _session(model: onnx.ModelProto, threads: int):
    """A CPU session as `runtime.bench.make_session` makes them (no spinning), quiet about the
    initializers the loss graph leaves unused."""
    import onnxruntime as ort

    from ..model.io import serialize_for_runtime

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(serialize_for_runtime(model), options, providers=["CPUExecutionProvider"])


_OP_IN_MESSAGE = re.compile(r"for (\w+) \(node '([^']*)'\)")
_WEIGHT_ONLY = "with respect to its weight"
"""onnx_ad's words for a rule that lacks only the weight's adjoint (a grouped Conv: input 1)."""


def _unsupported(exc: Exception, model: onnx.ModelProto) -> UnsupportedOp:
    """The op named by onnx_ad's message ("no reverse rule for Op (node 'n')", or an op type
    of the model named in the text, e.g. "a grouped Conv is not differentiated ...")."""
    text = " ".join(str(exc).split())
    found = _OP_IN_MESSAGE.search(text)
    if found:
        return UnsupportedOp(found.group(1), found.group(2))
    if "is unknown" in text:  # a shape onnx cannot infer: blame the first op that loses it
        known = {v.name for v in list(model.graph.input) + list(model.graph.value_info)} | \
            {t.name for t in model.graph.initializer}
        for node in model.graph.node:
            if all(not i or i in known for i in node.input) and any(o not in known for o in node.output):
                return UnsupportedOp(node.op_type, node.name, "its output shape cannot be inferred")
    words = set(re.findall(r"\w+", text))
    op = next((n.op_type for n in model.graph.node if n.op_type in words), "?")
    return UnsupportedOp(op, "", text, inputs=(1,) if _WEIGHT_ONLY in text else None)


class LossGradient:
    """L(params; feeds, targets) and ∂L/∂params for a fixed input shape, in onnxruntime.

    `trainable` names float initializers (after `Constant` promotion). `loss_only` evaluates
    L on any batch size; `__call__` returns (L, gradients) for inputs of `input_shapes` (the
    adjoint's onnxruntime session is made on the first call).
    """

    def __init__(self, model: onnx.ModelProto, trainable: Sequence[str], input_shapes: Mapping[str, Sequence[int]],
                 loss: str = "mse", output: Optional[str] = None, output_is_probability: bool = False,
                 mse_scale: float = 1.0, threads: int = 2):
        from onnx_ad import UnsupportedOperator, reverse

        if not trainable:
            raise LrsdError("nothing to train: no trainable tensors")
        base = prepared_copy(model, trainable)
        self.output = output or base.graph.output[0].name
        self.trainable = tuple(trainable)
        self.loss = loss
        self.targets = add_loss(base, self.output, loss, output_is_probability, mse_scale)
        self.initial = _make_trainable_inputs(base, self.trainable)
        fixed = onnx.ModelProto()
        fixed.CopyFrom(base)
        fixed.graph.output[0].type.tensor_type.shape.Clear()
        fixed.graph.output[0].type.tensor_type.shape.SetInParent()
        fix_input_shapes(fixed, input_shapes)
        try:
            adjoint = reverse(fixed, inputs=list(self.trainable), outputs=[LOSS], prefix="lrsd_adj_", layout="onnx")
        except UnsupportedOperator as exc:
            raise _unsupported(exc, fixed) from None
        except ValueError as exc:
            raise LrsdError(f"cannot differentiate the model: {' '.join(str(exc).split())}") from None
        self._seed_name = "lrsd_adj_" + LOSS
        self._grad_names = ["lrsd_adj_" + name for name in self.trainable]
        self._dtype = helper.tensor_dtype_to_np_dtype(base.graph.output[0].type.tensor_type.elem_type)
        self._loss_session = _session(base, threads)
        self._adjoint, self._adjoint_session, self._threads = adjoint, None, threads
        self.input_shapes = {k: tuple(v) for k, v in input_shapes.items()}

    def _feeds(self, feeds: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray],
               params: Mapping[str, np.ndarray]) -> dict:
        out = dict(feeds)
        out.update(targets)
        for name in self.trainable:
            out[name] = np.asarray(params[name], dtype=self.initial[name].dtype)
        return out

    def loss_only(self, feeds, targets, params) -> float:
        return float(self._loss_session.run([LOSS], self._feeds(feeds, targets, params))[0])

    def __call__(self, feeds, targets, params) -> Tuple[float, Dict[str, np.ndarray]]:
        run_feeds = self._feeds(feeds, targets, params)
        run_feeds[self._seed_name] = np.ones([1], dtype=self._dtype)
        if self._adjoint_session is None:  # made on first use: a parent whose shards run elsewhere never runs it
            self._adjoint_session, self._adjoint = _session(self._adjoint, self._threads), None
        results = self._adjoint_session.run([LOSS] + self._grad_names, run_feeds)
        grads = {name: g[..., 0] for name, g in zip(self.trainable, results[1:])}
        return float(results[0]), grads
