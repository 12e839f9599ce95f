"""Parameters and MACs of a layer, dense or factorized (batch 1; symbolic dims count as 1 unless
`model_macs` is given their values).

Chains, for a layer with ``in`` = n, ``out`` = m and `rows` activation rows:
- svd / channel: rank r, params r·(n + m), MACs rows·r·(n + m); for Conv, n = Cin·k and the
  second factor is a 1×1 conv, both at the output resolution.
- a lookup table (Gather, n = V rows of m = d): dense 0 MACs; Gather(A, ids)·B at rank r, params
  r·(V + d), MACs rows·r·d (the Gather reads, only the MatMul multiplies). It pays when it cuts
  params alone: r < V·d / (V + d).
- spatial (2-D conv): k_h×1 Cin→r then 1×k_w r→Cout: params r·(Cin·k_h + Cout·k_w); the first
  conv runs on H_out × W_in positions, the second on H_out × W_out.
- svd / channel with a sparse residual (W ≈ UV + S): "rows" (k input rows, [x·U, x[:, P]]·[V; S_P])
  adds k·m params and rows·k·m MACs; "unstructured" (nnz entries) adds nnz params, but
  onnxruntime densifies it, so its MACs are the dense layer's.
- tucker2: 1×1 Cin→r_in, k×k r_in→r_out, 1×1 r_out→Cout: params Cin·r_in + r_in·r_out·k +
  r_out·Cout; the first 1×1 runs at the input resolution.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np

from ..model.layers import LayerTarget

METHOD_KINDS = ("svd", "channel", "spatial", "tucker2")


@dataclass(frozen=True)
class Cost:
    params: int
    macs: int


def dense_cost(target: LayerTarget) -> Cost:
    return Cost(params=target.params, macs=target.macs)


def factorized_cost(target: LayerTarget, method: str, ranks: Tuple[int, ...]) -> Cost:
    """Params and MACs of `target` factorized by `method` at `ranks`."""
    if method in ("svd", "channel"):
        (r,) = ranks
        multiplied = target.out_features if target.lookup else target.in_features + target.out_features
        return Cost(params=r * (target.in_features + target.out_features), macs=target.rows * r * multiplied)
    conv = target.conv
    if conv is None:
        raise ValueError(f"{method} applies to Conv layers only")
    cin, cout, k = target.in_channels, target.out_channels, int(np.prod(conv.kernel_shape))
    if method == "spatial":
        (r,) = ranks
        kh, kw = conv.kernel_shape
        if conv.out_spatial and conv.in_spatial:
            mid_positions = conv.out_spatial[0] * conv.in_spatial[1]
        else:
            mid_positions = conv.out_positions
        return Cost(params=r * (cin * kh + cout * kw),
                    macs=mid_positions * r * cin * kh + conv.out_positions * r * cout * kw)
    if method == "tucker2":
        r_in, r_out = ranks
        in_positions = conv.in_positions if conv.in_spatial else conv.out_positions
        return Cost(params=cin * r_in + r_in * r_out * k + r_out * cout,
                    macs=in_positions * cin * r_in + conv.out_positions * (r_in * r_out * k + r_out * cout))
    raise ValueError(f"unknown method {method!r}")


def pays(target: LayerTarget, cost: Cost) -> bool:
    """A factorization pays when it cuts params and MACs; a lookup's, which adds MACs to a
    layer that had none, when it cuts params."""
    dense = dense_cost(target)
    return cost.params < dense.params and (target.lookup or cost.macs < dense.macs)


def residual_cost(target: LayerTarget, rank: int, structure: str, size: int) -> Cost:
    """Params and MACs of a rank-`rank` chain plus a residual of `size` rows or entries."""
    chain = factorized_cost(target, "svd", (rank,))
    if structure == "rows":
        extra = size * target.out_features
        return Cost(params=chain.params + extra, macs=chain.macs + target.rows * extra)
    return Cost(params=chain.params + size, macs=target.macs)


def applicable_methods(target: LayerTarget) -> Tuple[str, ...]:
    """Factorization kinds that fit the layer."""
    if target.conv is None:
        return ("svd",)
    if all(k == 1 for k in target.conv.kernel_shape) or target.chain_rank is not None:
        return ("channel",)  # a 1×1 conv is a matmul over channels; a chain is re-factored as it is
    if len(target.conv.kernel_shape) == 2:
        return ("channel", "spatial", "tucker2")
    return ("channel", "tucker2")


def full_ranks(target: LayerTarget, method: str) -> Tuple[int, ...]:
    """Ranks at which the factorization is exact (a chain's: its inner width)."""
    if method in ("svd", "channel"):
        return (min(target.in_features, target.out_features, target.chain_rank or target.in_features),)
    if method == "spatial":
        kh, kw = target.conv.kernel_shape
        return (min(target.in_channels * kh, target.out_channels * kw),)
    if method == "tucker2":
        return (target.in_channels, target.out_channels)
    raise ValueError(f"unknown method {method!r}")


def _dims(value_info) -> Tuple:
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim)


def _size(dims) -> int:
    """Product of the known dims; symbolic or unknown dims (batch, sequence) count as 1."""
    return int(np.prod([d for d in dims if d])) if dims else 1


def _elements(dims) -> int:
    return int(np.prod(dims, dtype=np.int64))


def unresolved_dims(model, dims=()) -> Tuple[str, ...]:
    """The graph inputs' unknown dims past the batch axis that `dims` does not name: symbolic
    names, or ``input[axis]`` for unnamed ones. MACs counted without them are wrong."""
    given = dict(dims)
    initializers = {t.name for t in model.graph.initializer}
    missing = []
    for inp in model.graph.input:
        if inp.name in initializers or not inp.type.HasField("tensor_type"):
            continue
        for index, dim in enumerate(inp.type.tensor_type.shape.dim):
            if index == 0 or (dim.HasField("dim_value") and dim.dim_value > 0) or dim.dim_param in given:
                continue
            name = dim.dim_param or f"{inp.name}[{index}]"
            if name not in missing:
                missing.append(name)
    return tuple(missing)


def node_macs(model, dims=None) -> Dict[str, int]:
    """Multiply-accumulates of one inference (batch 1) of every Conv, Gemm and MatMul (by node
    name) whose shapes shape inference can tell (nodes of constants only are folded away: not
    counted). With `dims` (name -> value pairs) shapes are inferred from inputs with those dims
    and batch 1 (`fix_input_dims`), so chains and reshapes downstream get concrete shapes; any
    dim left unknown (`unresolved_dims`) counts as 1."""
    from ..model.graph import infer_shapes

    graph = infer_shapes(model, None if dims is None else dict(dims)).graph
    shapes = {vi.name: _dims(vi) for vi in list(graph.input) + list(graph.value_info) + list(graph.output)}
    shapes.update({t.name: tuple(t.dims) for t in graph.initializer})
    constants = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    macs: Dict[str, int] = {}
    for index, node in enumerate(graph.node):
        if all(name in constants for name in node.input):
            continue  # a constant subgraph (U·V of an unstructured residual): folded at session creation
        out = shapes.get(node.output[0]) if node.output else None
        if out is None or len(node.input) < 2:
            continue
        a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
        count = None
        if node.op_type == "Conv" and b:
            count = _size(out[1:]) * _size(b[1:])
        elif node.op_type == "MatMul" and a:
            count = _size(out) * (a[-1] or 1)
        elif node.op_type == "Gemm" and b and len(b) == 2:
            trans_b = any(attr.name == "transB" and attr.i for attr in node.attribute)
            count = _size(out) * (b[1] if trans_b else b[0])
        if count is not None:
            macs[node.name or f"#{index}"] = count
    return macs


def model_macs(model, dims=None) -> int:
    """The sum of `node_macs`."""
    return sum(node_macs(model, dims).values())


def count_params(model) -> int:
    """Elements of every floating-point or 8-bit integer (quantized weight) constant:
    initializers, the stored values of sparse initializers and Constant nodes (subgraphs
    included). Wider integer constants are shapes and indices, not parameters."""
    from onnx import TensorProto

    weight_types = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16,
                   TensorProto.INT8, TensorProto.UINT8}
    total = 0

    def visit(graph) -> None:
        nonlocal total
        total += sum(_elements(t.dims) for t in graph.initializer if t.data_type in weight_types)
        total += sum(_elements(s.values.dims) for s in graph.sparse_initializer
                     if s.values.data_type in weight_types)  # stored values, not the dense size
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t") and attr.t.data_type in weight_types:
                    total += _elements(attr.t.dims)
                if attr.HasField("g"):
                    visit(attr.g)
                for sub in attr.graphs:
                    visit(sub)

    visit(model.graph)
    return total
