"""The hostile-input corpus: models and companion files a compressor in a deployment pipeline
may be handed, each with the outcome `onnx-lrsd compress` must give.

Every case is a directory under ``tests/corpus/<name>/`` holding ``model.onnx`` (or the path
in `Case.model`) and its companion files (external data, calibration sets). Outcomes:

- "error": exit `code` (1; 2 for usage errors, 4 for an output error above the limit), one line
  on stderr matching `pattern`, no output file (the Python API, given `api_options`, raises
  `LrsdError` matching it);
- "nothing": exit 3, one line "nothing to compress" matching `pattern`, no output file;
- "skip": exit 0, the weight layer(s) matching `pattern` left dense with that reason in the
  report, every other layer compressed, the written model equivalent in onnxruntime;
- "compress": exit 0, at full rank (`--rank '*=full'`) the written model reproduces the
  original's outputs in onnxruntime.

In every case the input files are left byte-identical and nothing but the output is written.
Rebuild the files with ``python tests/helpers/hostile_corpus.py`` (seeded: the same files each time
with the same onnx version).
"""
from __future__ import annotations

import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CORPUS = Path(__file__).resolve().parents[1] / "corpus"

FLOAT = TensorProto.FLOAT


@dataclass(frozen=True)
class Case:
    name: str
    expect: str  # "error" | "skip" | "compress"
    pattern: str  # regex: the error line, or the reason a layer is skipped
    build: Callable[[Path], None]
    args: Tuple[str, ...] = ()
    model: str = "model.onnx"
    output: str = "out.onnx"
    code: int = 1
    api_options: Tuple[Tuple[str, object], ...] = ()


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _w(*shape, seed: int = 0, dtype=np.float32) -> np.ndarray:
    return (_rng(seed).standard_normal(shape) / np.sqrt(shape[0])).astype(dtype)


def _vi(name, shape, elem=FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _model(nodes, inputs, outputs, inits=(), opset: int = 13, ir_version: int = 8, **graph_kw) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "hostile", inputs, outputs, initializer=list(inits), **graph_kw)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="onnx_lrsd-corpus")
    model.ir_version = ir_version
    return model


def mlp(n_in: int = 32, hidden: int = 48, n_out: int = 16, batch="batch", seed: int = 0) -> onnx.ModelProto:
    """x → fc1 (MatMul) → Relu → fc2 (Gemm, transB): a healthy model the cases corrupt."""
    return _model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2", transB=1)],
        [_vi("x", [batch, n_in])], [_vi("y", [batch, n_out])],
        [numpy_helper.from_array(_w(n_in, hidden, seed=seed), "w1"),
         numpy_helper.from_array(_w(n_out, hidden, seed=seed + 1), "w2"),
         numpy_helper.from_array(_w(n_out, seed=seed + 2), "b2")])


def _save(model: onnx.ModelProto, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())


def _writer(model_fn: Callable[[], onnx.ModelProto]) -> Callable[[Path], None]:
    return lambda d: _save(model_fn(), d / "model.onnx")


def _bytes_writer(data_fn: Callable[[], bytes]) -> Callable[[Path], None]:
    def build(d: Path) -> None:
        d.mkdir(parents=True, exist_ok=True)
        (d / "model.onnx").write_bytes(data_fn())
    return build


# -- files that are not (whole) ONNX models ---------------------------------------------------
def _truncated() -> bytes:
    data = mlp().SerializeToString()
    return data[: len(data) // 2]


def _bit_flipped() -> bytes:
    """Every 7th byte of the serialized model inverted: tags and lengths become garbage."""
    data = bytearray(mlp().SerializeToString())
    for i in range(3, len(data), 7):
        data[i] ^= 0xFF
    return bytes(data)


def _png() -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    pixels = zlib.compress(b"\x00\xff\x00\x00" * 1)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def _npz_as_model() -> bytes:
    import io
    buffer = io.BytesIO()
    np.savez(buffer, x=np.zeros((2, 32), np.float32))
    return buffer.getvalue()


def _json_text() -> bytes:
    return b'{"model": "resnet50", "format": "onnx", "ir_version": 8}\n'


def _graph_not_model() -> bytes:
    """A GraphProto serialized where a ModelProto is expected."""
    return mlp().graph.SerializeToString()


def _random_bytes() -> bytes:
    return _rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes()


# -- broken graphs ----------------------------------------------------------------------------
def _no_opset() -> onnx.ModelProto:
    model = mlp()
    del model.opset_import[:]
    return model


def _future_ir() -> onnx.ModelProto:
    model = mlp()
    model.ir_version = 99
    return model


def _cycle() -> onnx.ModelProto:
    """fc1 consumes fc2's output, which consumes fc1's: a cycle."""
    return _model(
        [helper.make_node("Add", ["x", "y2"], ["a"], name="add"),
         helper.make_node("MatMul", ["a", "w1"], ["h"], name="fc1"),
         helper.make_node("MatMul", ["h", "w2"], ["y2"], name="fc2"),
         helper.make_node("Identity", ["h"], ["y"], name="out")],
        [_vi("x", ["batch", 32])], [_vi("y", ["batch", 32])],
        [numpy_helper.from_array(_w(32, 32), "w1"), numpy_helper.from_array(_w(32, 32, seed=1), "w2")])


def _dangling_input() -> onnx.ModelProto:
    model = mlp()
    model.graph.node[1].input[0] = "nobody_makes_this"
    return model


def _dangling_output() -> onnx.ModelProto:
    model = mlp()
    model.graph.output.append(_vi("ghost", ["batch", 16]))
    return model


def _duplicate_outputs() -> onnx.ModelProto:
    """Two nodes write the tensor `h`."""
    model = mlp()
    model.graph.node.insert(1, helper.make_node("Neg", ["x"], ["h"], name="second_writer"))
    return model


def _duplicate_initializer() -> onnx.ModelProto:
    model = mlp()
    model.graph.initializer.append(numpy_helper.from_array(_w(32, 48, seed=9), "w1"))
    return model


def _duplicate_inputs() -> onnx.ModelProto:
    model = mlp()
    model.graph.input.append(_vi("x", ["batch", 32]))
    return model


def _duplicate_node_names() -> onnx.ModelProto:
    """Names are not identifiers in ONNX: every node named the same is a valid model."""
    model = mlp()
    for node in model.graph.node:
        node.name = "layer"
    return model


def _empty_node_names() -> onnx.ModelProto:
    model = mlp()
    for node in model.graph.node:
        node.name = ""
    return model


def _unknown_op() -> onnx.ModelProto:
    model = mlp()
    model.graph.node[1].op_type = "Frobnicate"
    return model


def _shape_mismatch() -> onnx.ModelProto:
    """fc1's weight has 40 rows for a 32-wide input."""
    model = mlp()
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(_w(40, 48), "w1"))
    return model


def _raw_data_short() -> onnx.ModelProto:
    """fc1's weight declares [32, 48] but holds 100 floats."""
    model = mlp()
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:400]
    return model


def _absurd_weight_dims() -> onnx.ModelProto:
    """fc1's weight declares [2^31, 2^31] (2^64 bytes) over 6 KB of data."""
    model = mlp()
    del model.graph.initializer[0].dims[:]
    model.graph.initializer[0].dims.extend([2**31, 2**31])
    return model


def _absurd_input_dims() -> onnx.ModelProto:
    """Declared input [2^20, 2^20, 32]: the model is fine, but random inputs of that shape
    (4 TB) cannot be made for verification."""
    model = mlp()
    del model.graph.input[0].type.tensor_type.shape.dim[:]
    for size in (2**20, 2**20, 32):
        model.graph.input[0].type.tensor_type.shape.dim.add().dim_value = size
    model.graph.output[0].type.tensor_type.shape.Clear()
    return model


def _negative_input_dim() -> onnx.ModelProto:
    model = mlp()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -5
    return model


def _no_nodes() -> onnx.ModelProto:
    return _model([], [_vi("x", [2, 3])], [_vi("x", [2, 3])])


def _no_weights() -> onnx.ModelProto:
    return _model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [_vi("x", ["batch", 8])],
                  [_vi("y", ["batch", 8])])


# -- external data ----------------------------------------------------------------------------
def _external(location: str, data_path: Path, model_dir: Path, offset: int = 0, length=None,
              write: bool = True) -> None:
    """The MLP with w1 stored externally at `location` (relative to the model's directory)."""
    model = mlp()
    tensor = model.graph.initializer[0]
    raw = tensor.raw_data
    if write:
        data_path.parent.mkdir(parents=True, exist_ok=True)
        data_path.write_bytes(raw)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entries = [("location", location), ("offset", str(offset)), ("length", str(len(raw) if length is None else length))]
    for key, value in entries:
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    _save(model, model_dir / "model.onnx")


def _external_ok(d: Path) -> None:
    _external("weights.bin", d / "weights.bin", d)


def _external_traversal(d: Path) -> None:
    _external("../outside.bin", d / "outside.bin", d / "model")


def _external_absolute(d: Path) -> None:
    _external("/etc/passwd", Path("/etc/passwd"), d, write=False)


def _external_missing(d: Path) -> None:
    _external("weights.bin", d / "weights.bin", d, write=False)


def _external_past_end(d: Path) -> None:
    _external("weights.bin", d / "weights.bin", d, offset=4096)


def _external_is_directory(d: Path) -> None:
    _external("weights", d / "weights", d, write=False)
    (d / "weights").mkdir()
    (d / "weights" / ".keep").write_text("")


# -- weight values and dtypes -----------------------------------------------------------------
def _with_weight(values: np.ndarray) -> onnx.ModelProto:
    model = mlp()
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(values, "w1"))
    return model


def _nan_weights() -> onnx.ModelProto:
    w = _w(32, 48)
    w[3, 5] = np.nan
    return _with_weight(w)


def _inf_weights() -> onnx.ModelProto:
    w = _w(32, 48)
    w[0, :4] = np.inf
    return _with_weight(w)


def _huge_weights() -> onnx.ModelProto:
    """Finite float32 values near the top of the range: their squares overflow float32."""
    return _with_weight((_w(32, 48) * 1e36).astype(np.float32))


def _zero_weights() -> onnx.ModelProto:
    return _with_weight(np.zeros((32, 48), np.float32))


def _fp16_model() -> onnx.ModelProto:
    model = mlp()
    for tensor in model.graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
    for value in list(model.graph.input) + list(model.graph.output):
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    return model


def _bf16_weight() -> onnx.ModelProto:
    """fc1's weight stored as bfloat16 and Cast to float: the common way bf16 checkpoints
    reach float32 runtimes."""
    model = mlp()
    w = numpy_helper.to_array(model.graph.initializer[0])
    bits = (w.view(np.uint32) >> 16).astype(np.uint16)
    bf16 = helper.make_tensor("w1_bf16", TensorProto.BFLOAT16, list(w.shape), bits.tobytes(), raw=True)
    model.graph.initializer[0].CopyFrom(bf16)
    model.graph.node.insert(0, helper.make_node("Cast", ["w1_bf16"], ["w1"], name="cast_w1", to=FLOAT))
    return model


def _bf16_matmul() -> onnx.ModelProto:
    """A bfloat16 MatMul end to end (onnxruntime's CPU provider has no bf16 MatMul)."""
    w = _w(32, 48)
    bits = (w.view(np.uint32) >> 16).astype(np.uint16)
    return _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc1")],
                  [_vi("x", ["batch", 32], TensorProto.BFLOAT16)], [_vi("y", ["batch", 48], TensorProto.BFLOAT16)],
                  [helper.make_tensor("w", TensorProto.BFLOAT16, [32, 48], bits.tobytes(), raw=True)])


def _int_weights() -> onnx.ModelProto:
    """An int32 MatMul next to a float one (integer weights are not factorized)."""
    model = mlp()
    model.graph.node.extend([
        helper.make_node("MatMul", ["xi", "wi"], ["yi"], name="int_matmul")])
    model.graph.input.append(_vi("xi", ["batch", 32], TensorProto.INT32))
    model.graph.output.append(_vi("yi", ["batch", 48], TensorProto.INT32))
    model.graph.initializer.append(numpy_helper.from_array(
        _rng(3).integers(-3, 4, (32, 48)).astype(np.int32), "wi"))
    return model


def _qdq() -> onnx.ModelProto:
    """fc1's weight as int8 through DequantizeLinear (a QDQ model); fc2 stays float."""
    model = mlp()
    w = numpy_helper.to_array(model.graph.initializer[0])
    scale = np.float32(np.abs(w).max() / 127)
    q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(q, "w1_q"))
    model.graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), "w1_scale"),
                                    numpy_helper.from_array(np.array(0, np.int8), "w1_zero")])
    model.graph.node.insert(0, helper.make_node("DequantizeLinear", ["w1_q", "w1_scale", "w1_zero"], ["w1"],
                                                name="dq_w1"))
    return model


def _integer_ops() -> onnx.ModelProto:
    """MatMulInteger and ConvInteger (a dynamically quantized model) beside a float Gemm."""
    rng = _rng(4)
    return _model(
        [helper.make_node("MatMulInteger", ["xq", "wq", "xz"], ["mi"], name="matmul_int"),
         helper.make_node("Cast", ["mi"], ["mf"], name="cast", to=FLOAT),
         helper.make_node("Gemm", ["mf", "w2"], ["y"], name="fc2"),
         helper.make_node("ConvInteger", ["img", "kq"], ["ci"], name="conv_int")],
        [_vi("xq", ["batch", 32], TensorProto.UINT8), _vi("img", [1, 4, 8, 8], TensorProto.UINT8)],
        [_vi("y", ["batch", 16]), _vi("ci", [1, 8, 6, 6], TensorProto.INT32)],
        [numpy_helper.from_array(rng.integers(0, 255, (32, 48)).astype(np.uint8), "wq"),
         numpy_helper.from_array(np.array(128, np.uint8), "xz"),
         numpy_helper.from_array(_w(48, 16), "w2"),
         numpy_helper.from_array(rng.integers(0, 255, (8, 4, 3, 3)).astype(np.uint8), "kq")], opset=13)


def _qlinear() -> onnx.ModelProto:
    """QLinearMatMul between QuantizeLinear and DequantizeLinear, then a float MatMul."""
    rng = _rng(5)
    s = lambda name, v: numpy_helper.from_array(np.array(v, np.float32), name)  # noqa: E731
    z = lambda name: numpy_helper.from_array(np.array(0, np.int8), name)  # noqa: E731
    return _model(
        [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="quant"),
         helper.make_node("QLinearMatMul", ["xq", "xs", "xz", "wq", "ws", "wz", "ys", "yz"], ["yq"], name="qmatmul"),
         helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["h"], name="dequant"),
         helper.make_node("MatMul", ["h", "w2"], ["y"], name="fc2")],
        [_vi("x", ["batch", 32])], [_vi("y", ["batch", 16])],
        [s("xs", 0.05), z("xz"), numpy_helper.from_array(rng.integers(-127, 128, (32, 48)).astype(np.int8), "wq"),
         s("ws", 0.01), z("wz"), s("ys", 0.1), z("yz"), numpy_helper.from_array(_w(48, 16), "w2")], opset=13)


# -- control flow, dims, opsets ---------------------------------------------------------------
def _branch(name: str, seed: int) -> onnx.GraphProto:
    return helper.make_graph(
        [helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_y"], name=f"{name}_fc")], name, [],
        [_vi(f"{name}_y", ["batch", 48])], [numpy_helper.from_array(_w(32, 48, seed=seed), f"{name}_w")])


def _if_subgraph() -> onnx.ModelProto:
    """Weights inside both branches of an If, after a top-level fc."""
    return _model(
        [helper.make_node("MatMul", ["x0", "w0"], ["x"], name="fc0"),
         helper.make_node("If", ["cond"], ["h"], name="branch", then_branch=_branch("then", 1),
                          else_branch=_branch("else", 2))],
        [_vi("x0", ["batch", 32]), _vi("cond", [], TensorProto.BOOL)], [_vi("h", ["batch", 48])],
        [numpy_helper.from_array(_w(32, 32), "w0")])


def _loop_subgraph() -> onnx.ModelProto:
    """A Loop whose body multiplies the carried state by a constant weight."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
         helper.make_node("MatMul", ["state_in", "loop_w"], ["mm"], name="loop_fc"),
         helper.make_node("Tanh", ["mm"], ["state_out"], name="loop_tanh")],
        "body", [_vi("i", [], TensorProto.INT64), _vi("cond_in", [], TensorProto.BOOL), _vi("state_in", ["batch", 32])],
        [_vi("cond_out", [], TensorProto.BOOL), _vi("state_out", ["batch", 32])],
        [numpy_helper.from_array(_w(32, 32, seed=3), "loop_w")])
    return _model(
        [helper.make_node("MatMul", ["x", "w0"], ["s0"], name="fc0"),
         helper.make_node("Loop", ["trips", "cond", "s0"], ["y"], name="loop", body=body)],
        [_vi("x", ["batch", 32])], [_vi("y", ["batch", 32])],
        [numpy_helper.from_array(_w(32, 32), "w0"), numpy_helper.from_array(np.array(3, np.int64), "trips"),
         numpy_helper.from_array(np.array(True), "cond")])


def _dynamic_dims() -> onnx.ModelProto:
    """A token model: [batch, seq, 32] with both dims symbolic, and a seq-length output."""
    return _model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")],
        [_vi("x", ["batch", "seq", 32])], [_vi("y", ["batch", "seq", 16])],
        [numpy_helper.from_array(_w(32, 48), "w1"), numpy_helper.from_array(_w(48, 16, seed=1), "w2")])


def _unnamed_dims() -> onnx.ModelProto:
    """Input dims with neither a value nor a name (dim_param empty)."""
    model = _dynamic_dims()
    for dim in list(model.graph.input[0].type.tensor_type.shape.dim)[:2]:
        dim.Clear()
    return model


def _exporter_unknown_dims() -> onnx.ModelProto:
    """The conv stack as some exporters write it (Paddle2ONNX): batch −1, H and W both named
    '?' (which ONNX would read as one dim shared by both), −1 on the output too."""
    model = _dynamic_hw_conv()
    batch, _, height, width = model.graph.input[0].type.tensor_type.shape.dim
    batch.dim_value = -1
    height.dim_param = width.dim_param = "?"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = -1
    return model


def _dynamic_hw_conv() -> onnx.ModelProto:
    """A detection-style conv stack on [N, 3, H, W] with H and W symbolic (PP-OCR det): its
    MACs are unknown until H and W are given."""
    return _model(
        [helper.make_node("Conv", ["img", "k0"], ["c0"], name="stem", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c0"], ["r0"], name="relu"),
         helper.make_node("Conv", ["r0", "k1"], ["y"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
        [_vi("img", ["N", 3, "H", "W"])], [_vi("y", ["N", 32, "H", "W"])],
        [numpy_helper.from_array(_w(32, 3, 3, 3), "k0"), numpy_helper.from_array(_w(32, 32, 3, 3, seed=1), "k1")])


def _flat_spectrum() -> onnx.ModelProto:
    """Two 256×256 random layers: any rank-25 factorization destroys the output (error ~0.9)."""
    return _model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
         helper.make_node("MatMul", ["h", "w2"], ["y"], name="fc2")],
        [_vi("x", ["batch", 256])], [_vi("y", ["batch", 256])],
        [numpy_helper.from_array(_w(256, 256), "w1"), numpy_helper.from_array(_w(256, 256, seed=1), "w2")])


def _only_quantized() -> onnx.ModelProto:
    """Every weight layer int8 through DequantizeLinear (an int8 model): nothing to compress."""
    model = _qdq()
    w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w2"))
    scale = np.float32(np.abs(w).max() / 127)
    model.graph.initializer.extend([numpy_helper.from_array(np.clip(np.round(w / scale), -127, 127).astype(np.int8),
                                                            "w2_q"),
                                    numpy_helper.from_array(np.array(scale, np.float32), "w2_scale"),
                                    numpy_helper.from_array(np.array(0, np.int8), "w2_zero")])
    kept = [t for t in model.graph.initializer if t.name != "w2"]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    model.graph.node.insert(0, helper.make_node("DequantizeLinear", ["w2_q", "w2_scale", "w2_zero"], ["w2"],
                                                name="dq_w2"))
    return model


def _opset7() -> onnx.ModelProto:
    """Opset 7: Gemm needs its C input; a Conv too."""
    model = _model(
        [helper.make_node("Conv", ["img", "k", "kb"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["r"], name="relu"),
         helper.make_node("Flatten", ["r"], ["f"], name="flatten", axis=1),
         helper.make_node("Gemm", ["f", "w", "b"], ["y"], name="fc", transB=1)],
        [_vi("img", [1, 8, 6, 6])], [_vi("y", [1, 16])],
        [numpy_helper.from_array(_w(24, 8, 3, 3), "k"), numpy_helper.from_array(_w(24), "kb"),
         numpy_helper.from_array(_w(16, 24 * 36), "w"), numpy_helper.from_array(_w(16, seed=1), "b")],
        opset=7, ir_version=3)
    return model


def _newest_opset() -> onnx.ModelProto:
    model = mlp()
    model.opset_import[0].version = onnx.defs.onnx_opset_version()
    model.ir_version = onnx.IR_VERSION
    return model


def _runtime_runs_newest_opset() -> bool:
    """Whether the installed onnxruntime loads a model of the installed onnx's newest opset and
    IR version (onnxruntime 1.31 does not, 1.32 does)."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(_newest_opset().SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:  # onnxruntime raises its own types
        return False
    return True


def _runtime_opset() -> onnx.ModelProto:
    """The newest opset the installed onnx knows that also has an IR version onnxruntime runs
    (IR 10 with opset 21)."""
    model = mlp()
    model.opset_import[0].version = 21
    model.ir_version = 10
    return model


def _conv_stack() -> onnx.ModelProto:
    """A grouped conv, a depthwise conv and a 3-D conv (skipped) after a plain conv."""
    return _model(
        [helper.make_node("Conv", ["img", "k0"], ["c0"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
         helper.make_node("Conv", ["c0", "kg"], ["c1"], name="grouped", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                          group=4),
         helper.make_node("Conv", ["c1", "kd"], ["y"], name="depthwise", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                          group=32),
         helper.make_node("Conv", ["vol", "k3"], ["v"], name="conv3d", kernel_shape=[3, 3, 3])],
        [_vi("img", [1, 16, 8, 8]), _vi("vol", [1, 4, 5, 5, 5])], [_vi("y", [1, 32, 8, 8]), _vi("v", [1, 8, 3, 3, 3])],
        [numpy_helper.from_array(_w(32, 16, 3, 3), "k0"), numpy_helper.from_array(_w(32, 8, 3, 3, seed=1), "kg"),
         numpy_helper.from_array(_w(32, 1, 3, 3, seed=2), "kd"), numpy_helper.from_array(_w(8, 4, 3, 3, 3, seed=3), "k3")])


def _shared_weight() -> onnx.ModelProto:
    """One weight feeding two MatMuls (tied weights)."""
    return _model(
        [helper.make_node("MatMul", ["x", "w"], ["a"], name="fc_a"),
         helper.make_node("MatMul", ["a", "w"], ["y"], name="fc_b")],
        [_vi("x", ["batch", 32])], [_vi("y", ["batch", 32])], [numpy_helper.from_array(_w(32, 32), "w")])


def _weight_is_graph_output() -> onnx.ModelProto:
    model = mlp()
    model.graph.output.append(_vi("w1", [32, 48]))
    return model


def _bad_transpose() -> onnx.ModelProto:
    """fc1's weight through a Transpose whose perm has the wrong length."""
    model = mlp()
    model.graph.initializer[0].name = "w1_t"
    model.graph.node.insert(0, helper.make_node("Transpose", ["w1_t"], ["w1"], name="transpose_w1", perm=[1, 0, 2]))
    return model


def _huge_metadata() -> onnx.ModelProto:
    model = mlp()
    helper.set_model_props(model, {"note": "x" * 50_000, "ünïcödé": "✓"})
    return model


# -- calibration data -------------------------------------------------------------------------
def _with_calibration(arrays_fn: Callable[[], dict]) -> Callable[[Path], None]:
    def build(d: Path) -> None:
        _save(mlp(), d / "model.onnx")
        np.savez(d / "calib.npz", **arrays_fn())  # object arrays are pickled
    return build


def _calib_ok() -> dict:
    return {"x": _rng(1).standard_normal((24, 32)).astype(np.float32)}


def _calib_nan() -> dict:
    x = _calib_ok()["x"]
    x[5, 3] = np.nan
    return {"x": x}


def _calib_wrong_shape() -> dict:
    return {"x": np.zeros((24, 31), np.float32)}


def _calib_wrong_name() -> dict:
    return {"input_ids": np.zeros((24, 32), np.float32)}


def _calib_object() -> dict:
    return {"x": np.array([{"a": 1}, None], dtype=object)}


def _calib_strings() -> dict:
    return {"x": np.array([["a"] * 32] * 4)}


def _calib_empty() -> dict:
    return {"x": np.zeros((0, 32), np.float32)}


def _calib_not_npz(d: Path) -> None:
    _save(mlp(), d / "model.onnx")
    (d / "calib.npz").write_bytes(_png())


CALIB = ("--calib", "calib.npz")

CASES: Tuple[Case, ...] = (
    # files that are not ONNX models
    Case("empty_file", "error", r"empty, not an ONNX model", _bytes_writer(lambda: b"")),
    Case("truncated", "error", r"not an ONNX model", _bytes_writer(_truncated)),
    Case("bit_flipped", "error", r"not an ONNX model|cannot read the graph|invalid", _bytes_writer(_bit_flipped)),
    Case("random_bytes", "error", r"not an ONNX model", _bytes_writer(_random_bytes)),
    Case("png_image", "error", r"not an ONNX model", _bytes_writer(_png)),
    Case("npz_archive", "error", r"not an ONNX model", _bytes_writer(_npz_as_model)),
    Case("json_text", "error", r"not an ONNX model", _bytes_writer(_json_text)),
    Case("graph_proto", "error", r"not an ONNX model", _bytes_writer(_graph_not_model)),
    # broken models
    Case("no_opset_import", "error", r"opset", _writer(_no_opset)),
    Case("future_ir_version", "error", r"IR version 99", _writer(_future_ir)),
    Case("cycle", "error", r"cycle", _writer(_cycle)),
    Case("dangling_input", "error", r"nobody_makes_this", _writer(_dangling_input)),
    Case("dangling_output", "error", r"ghost", _writer(_dangling_output)),
    Case("duplicate_tensor_writers", "error", r"tensor 'h' is defined more than once", _writer(_duplicate_outputs)),
    Case("duplicate_initializer", "error", r"w1", _writer(_duplicate_initializer)),
    Case("duplicate_graph_input", "error", r"'x'", _writer(_duplicate_inputs)),
    Case("duplicate_node_names", "compress", "", _writer(_duplicate_node_names)),
    Case("empty_node_names", "compress", "", _writer(_empty_node_names)),
    Case("unknown_op", "error", r"Frobnicate", _writer(_unknown_op)),
    Case("shape_mismatch", "error", r"fc1|shape|dimension", _writer(_shape_mismatch)),
    Case("transpose_perm_mismatch", "error", r"onnxruntime.*(perm|Transpose)", _writer(_bad_transpose)),
    Case("raw_data_too_short", "error", r"w1", _writer(_raw_data_short)),
    Case("absurd_weight_dims", "error", r"w1", _writer(_absurd_weight_dims)),
    Case("absurd_input_dims", "error", r"input 'x'|too large", _writer(_absurd_input_dims)),
    Case("negative_input_dim", "error", r"'x'", _writer(_negative_input_dim)),
    Case("no_nodes", "nothing", "", _writer(_no_nodes)),
    Case("no_weight_layers", "nothing", "", _writer(_no_weights)),
    # external data
    Case("external_data_ok", "compress", "", _external_ok),
    Case("external_path_traversal", "error", r"outside the model's directory", _external_traversal,
         model="model/model.onnx"),
    Case("external_absolute_path", "error", r"outside the model's directory", _external_absolute),
    Case("external_file_missing", "error", r"is missing", _external_missing),
    Case("external_offset_past_end", "error", r"w1", _external_past_end),
    Case("external_location_is_directory", "error", r"weights", _external_is_directory),
    # weight values and dtypes
    Case("nan_weight", "skip", r"NaN or inf", _writer(_nan_weights)),
    Case("inf_weight", "skip", r"NaN or inf", _writer(_inf_weights)),
    Case("huge_weight_values", "compress", "", _writer(_huge_weights)),
    Case("zero_weight", "compress", "", _writer(_zero_weights)),
    Case("fp16_model", "compress", "", _writer(_fp16_model)),
    Case("bf16_weight_cast", "compress", "", _writer(_bf16_weight)),
    Case("bf16_matmul", "error", r"bfloat16|onnxruntime", _writer(_bf16_matmul)),
    Case("int32_matmul", "skip", r"int32 weights", _writer(_int_weights)),
    Case("int8_qdq_weight", "skip", r"quantized", _writer(_qdq)),
    Case("integer_ops", "skip", r"integer (matmul|conv)", _writer(_integer_ops)),
    Case("qlinear_ops", "skip", r"quantized matmul", _writer(_qlinear)),
    Case("grouped_depthwise_3d_conv", "skip", r"grouped conv|3-D conv", _writer(_conv_stack)),
    Case("shared_weight", "nothing", r"shared", _writer(_shared_weight)),
    Case("weight_is_graph_output", "skip", r"graph output|shared", _writer(_weight_is_graph_output)),
    # control flow, dims, opsets, metadata
    Case("if_subgraph_weights", "skip", r"inside an If", _writer(_if_subgraph)),
    Case("loop_subgraph_weights", "skip", r"inside a Loop", _writer(_loop_subgraph)),
    Case("dynamic_batch_and_seq", "compress", "", _writer(_dynamic_dims), args=("--dim", "seq=7")),
    Case("dynamic_dims_without_values", "error", r"'x_dim1' \(x dim 1\) are unknown: pass --dim x_dim1=VALUE",
         _writer(_unnamed_dims), code=2),
    Case("exporter_unknown_dims", "compress", "", _writer(_exporter_unknown_dims),
         args=("--dim", "img_dim2=20", "--dim", "img_dim3=24")),
    Case("exporter_unknown_dims_named", "error",
         r"'img_dim2' \(img dim 2\), 'img_dim3' \(img dim 3\) are unknown: pass --dim img_dim2=VALUE --dim img_dim3=VALUE",
         _writer(_exporter_unknown_dims), code=2),
    # first contact: shapes, honesty, usage
    Case("dynamic_hw_conv", "compress", "", _writer(_dynamic_hw_conv), args=("--dim", "H=20", "--dim", "W=24")),
    Case("several_unknown_dims", "error", r"'H' \(img dim 2\), 'W' \(img dim 3\) are unknown: pass --dim H=VALUE --dim W=VALUE",
         _writer(_dynamic_hw_conv), code=2),
    Case("catastrophic_output_error", "error", r"relative error [\d.]+ on random inputs is above 0\.5; not "
         r"written \(fit the layers to real inputs with --calib", _writer(_flat_spectrum), args=("--keep", "0.1"),
         code=4, api_options=(("keep", 0.1),)),
    Case("nothing_to_compress", "nothing", r"nothing to compress: no layer was factorized \(skipped: weight is "
         r"quantized", _writer(_only_quantized)),
    Case("usage_keep_2", "error", r"keep must be in \(0, 1\], got 2", _writer(mlp), args=("--keep", "2"), code=2,
         api_options=(("keep", 2.0),)),
    Case("opset7", "compress", "", _writer(_opset7)),
    Case("opset21", "compress", "", _writer(_runtime_opset)),
    Case("newest_opset", "compress", "", _writer(_newest_opset)) if _runtime_runs_newest_opset() else
    Case("newest_opset", "error", r"opset|onnxruntime", _writer(_newest_opset)),
    Case("huge_metadata", "compress", "", _writer(_huge_metadata)),
    # calibration data
    Case("calib_ok", "compress", "", _with_calibration(_calib_ok), args=CALIB),
    Case("calib_nan", "error", r"NaN|non-finite", _with_calibration(_calib_nan), args=CALIB),
    Case("calib_wrong_shape", "error", r"'x'", _with_calibration(_calib_wrong_shape), args=CALIB),
    Case("calib_wrong_name", "error", r"unknown input 'input_ids'", _with_calibration(_calib_wrong_name), args=CALIB),
    Case("calib_pickled_objects", "error", r"calib", _with_calibration(_calib_object), args=CALIB),
    Case("calib_strings", "error", r"'x'", _with_calibration(_calib_strings), args=CALIB),
    Case("calib_empty", "error", r"no samples|empty", _with_calibration(_calib_empty), args=CALIB),
    Case("calib_not_npz", "error", r"not an \.npz file", _calib_not_npz, args=CALIB),
)


def build_corpus(root: Path = CORPUS) -> None:
    """Write every case's files under `root` (replacing what was there)."""
    if root.exists():
        shutil.rmtree(root)
    for case in CASES:
        case.build(root / case.name)


if __name__ == "__main__":
    build_corpus()
    print(f"wrote {len(CASES)} cases to {CORPUS}")
