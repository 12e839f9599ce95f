"""Measured latency of one layer's candidate shapes (dense or factorized) on this machine.

MACs are not time: small layers and thin products do not run at their FLOP ratio. A
`LatencyModel` builds a one-layer model reproducing the target op at the deployment input
shape, writes each candidate chain exactly as the compressor does (`rewrite_layers`), times
all of them interleaved in onnxruntime and caches the medians on disk, keyed by CPU,
onnxruntime version, threads, layer and candidate.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import platform
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from .bench import time_sessions
from .session import make_session, rewritten_model
from ..plan.candidates import LayerCandidate
from ..plan.cost import full_ranks
from ..decompose import LowRankFactors, LowRankSparse, SparseResidual, Tucker2Factors
from ..plan.factorize import LayerFactorization
from ..model.graph import import_graph, model_template
from ..plan.rank_select import residual_group, sparse_applies
from ..model.layers import LayerTarget, classify

log = logging.getLogger(__name__)

Candidate = Tuple[str, Tuple[int, ...]]
RATIO_BLOCKS = 7
"""Interleaved blocks a residual's time over its plain chain is measured in (the median of the
blocks' ratios): a single microbenchmark of a µs-sized layer is mostly noise."""
KINDS = {"MatMul": ("dense", "svd", "svd+rows"), "Gemm": ("dense", "svd", "svd+rows"),
         "Conv": ("dense", "channel", "spatial", "tucker2", "channel+rows"), "Gather": ("dense", "svd")}
"""Candidate kinds per op; "<kind>+rows" is the chain with a residual of k input rows, ranks (r, k)."""
RESIDUAL = "+rows"
LAYER = "layer"

DEFAULT: object = object()
"""`cache_path` default: `$ONNX_LRSD_CACHE_DIR/latency.json`, else `~/.cache/onnx_lrsd/latency.json`."""


def default_cache_path() -> Path:
    root = os.environ.get("ONNX_LRSD_CACHE_DIR")
    return Path(root) / "latency.json" if root else Path.home() / ".cache" / "onnx_lrsd" / "latency.json"


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU model string (/proc/cpuinfo "model name", else platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@dataclass(frozen=True)
class LatencyKey:
    """Everything a measured time depends on; `text` (JSON) is the cache key."""

    cpu: str
    runtime: str
    threads: int
    op: str
    weight_shape: Tuple[int, ...]
    attrs: Tuple[Tuple[str, object], ...]
    input_shape: Tuple[int, ...]
    kind: str
    ranks: Tuple[int, ...]

    @property
    def text(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))


def layer_attrs(target: LayerTarget) -> Dict[str, object]:
    """The ONNX attributes of the target op (as the one-layer model writes them)."""
    if target.lookup:
        return {"axis": 0}
    if target.gemm is not None:
        g = target.gemm
        return {"alpha": g.alpha, "beta": g.beta, "transA": int(g.trans_a), "transB": int(g.trans_b)}
    if target.conv is not None:
        c = target.conv
        pads = {"auto_pad": c.auto_pad} if c.auto_pad not in ("NOTSET", "") else {"pads": list(c.pads)}
        return {"kernel_shape": list(c.kernel_shape), "strides": list(c.strides), "dilations": list(c.dilations),
                **pads}
    return {}


def layer_model(target: LayerTarget, input_shape: Sequence[int], seed: int = 0) -> onnx.ModelProto:
    """One float32 node like `target` (weight shape, attributes, bias [out] if any) on input `x`
    (a lookup's: int64 indices)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(target.weight.shape) / np.sqrt(target.in_features)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W")]
    inputs = ["W", "x"] if target.weight_side == "left" or target.lookup else ["x", "W"]
    if target.bias_tensor is not None:
        bias = 0.1 * rng.standard_normal(target.out_features)
        inits.append(numpy_helper.from_array(bias.astype(np.float32), "B"))
        inputs.append("B")
    node = helper.make_node(target.op, inputs, ["y"], name=LAYER, **layer_attrs(target))
    x = helper.make_tensor_value_info("x", TensorProto.INT64 if target.lookup else TensorProto.FLOAT, list(input_shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([node], "latency", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _random_factors(t: LayerTarget, kind: str, ranks: Tuple[int, ...], rng: np.random.Generator):
    def randn(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape) / np.sqrt(shape[0])
    if kind == "tucker2":
        r_in, r_out = ranks
        return Tucker2Factors(randn(t.in_channels, r_in), randn(r_out, r_in, *t.conv.kernel_shape),
                              randn(t.out_channels, r_out))
    n, m = t.in_features, t.out_features
    if kind.endswith(RESIDUAL):
        rank, k = ranks
        group = residual_group(t)
        if k % group:
            raise ValueError(f"{t.name}: a residual of {k} rows is not whole input channels of {group} taps")
        blocks = np.sort(rng.choice(n // group, size=k // group, replace=False))
        rows = (blocks[:, None] * group + np.arange(group)).ravel()
        return LowRankSparse(LowRankFactors(randn(n, rank), randn(rank, m)), SparseResidual.from_rows(rows, randn(k, m)))
    if kind == "spatial":
        kh, kw = t.conv.kernel_shape
        n, m = t.in_channels * kh, t.out_channels * kw
    return LowRankFactors(randn(n, ranks[0]), randn(ranks[0], m))


def candidate_model(target: LayerTarget, input_shape: Sequence[int], candidate: Candidate,
                    seed: int = 0) -> onnx.ModelProto:
    """The one-layer model with its layer rewritten as the compressor writes `candidate`
    (random factors): import, `classify`, then `rewritten_model`."""
    dense = layer_model(target, input_shape, seed)
    kind, ranks = candidate
    if kind == "dense":
        return dense
    graph = import_graph(dense)
    layer = classify(next(n for n in graph.nodes if n.name == LAYER), graph)
    if not isinstance(layer, LayerTarget):
        raise ValueError(f"{target.name}: the one-layer model is not a target ({layer})")
    fact = LayerFactorization(LAYER, kind.replace(RESIDUAL, ""), _random_factors(layer, kind, tuple(ranks), np.random.default_rng(seed)))
    return rewritten_model(graph, model_template(dense), {LAYER: layer}, [fact])


def check_request(target: LayerTarget, input_shape: Sequence[int], candidates: Sequence[Candidate]) -> None:
    """ValueError unless `input_shape` fits the target and every candidate applies to it."""
    shape = tuple(input_shape)
    if not shape or any(not isinstance(d, (int, np.integer)) or d < 1 for d in shape):
        raise ValueError(f"{target.name}: input_shape must be positive integers, got {shape}")
    if target.lookup:
        rank, axis, expected = len(shape), None, None  # indices of any shape
    elif target.conv is not None:
        rank, axis, expected = 2 + len(target.conv.kernel_shape), 1, target.in_channels
    elif target.gemm is not None:
        rank, axis, expected = 2, 0 if target.gemm.trans_a else 1, target.in_features
    else:
        rank, axis, expected = None, -2 if target.weight_side == "left" else -1, target.in_features
    if (rank is not None and len(shape) != rank) or (len(shape) < 2 and not target.lookup):
        raise ValueError(f"{target.name}: {target.op} input must have {rank or '>= 2'} dims, got {shape}")
    if axis is not None and shape[axis] != expected:
        raise ValueError(f"{target.name}: input_shape {shape} has {shape[axis]} on axis {axis}, the layer "
                         f"takes {expected} ({'channels' if target.conv is not None else 'features'})")
    if target.conv is not None and not target.conv.auto_pad.startswith("SAME"):
        c, n = target.conv, len(target.conv.kernel_shape)
        pads = c.pads if c.auto_pad in ("NOTSET", "") else (0,) * 2 * n
        if any(shape[2 + i] + pads[i] + pads[i + n] < (c.kernel_shape[i] - 1) * c.dilations[i] + 1 for i in range(n)):
            raise ValueError(f"{target.name}: input_shape {shape} is smaller than the conv's (dilated) kernel")
    for candidate in candidates:
        kind, ranks = candidate if isinstance(candidate, tuple) and len(candidate) == 2 else (candidate, None)
        if kind not in KINDS.get(target.op, ()) or (kind == "spatial" and len(target.conv.kernel_shape) != 2):
            raise ValueError(f"{target.name}: candidate kind {kind!r} does not apply to a {target.op} "
                             f"(choose from {', '.join(KINDS.get(target.op, ()))}; spatial needs a 2-D conv)")
        if kind.endswith(RESIDUAL) and not sparse_applies(target, kind.replace(RESIDUAL, "")):
            raise ValueError(f"{target.name}: a rows residual does not apply to this {target.op}")
        limits = () if kind == "dense" else full_ranks(target, kind.replace(RESIDUAL, "")) + (
            (target.in_features,) if kind.endswith(RESIDUAL) else ())
        if not isinstance(ranks, tuple) or len(ranks) != len(limits) or not all(
                isinstance(r, (int, np.integer)) and not isinstance(r, bool) and 1 <= r <= lim
                for r, lim in zip(ranks, limits)):
            raise ValueError(f"{target.name}: {kind} needs a tuple of {len(limits)} ranks in [1, {limits}], "
                             f"got {ranks!r}")


def layer_input(target: LayerTarget, input_shape: Sequence[int]) -> np.ndarray:
    """A seeded input of `input_shape` for the one-layer models: normal floats, or a lookup's
    uniform indices."""
    rng = np.random.default_rng(0)
    if target.lookup:
        return rng.integers(0, target.in_features, size=tuple(input_shape), dtype=np.int64)
    return rng.standard_normal(tuple(input_shape)).astype(np.float32)


class LatencyModel:
    """Measured median milliseconds of layer candidates at `threads` (onnxruntime CPU),
    cached in memory and, unless `cache_path` is None, in a JSON file."""

    def __init__(self, threads: int = 1, cache_path: Union[Path, str, None, object] = DEFAULT,
                 runs: int = 30, warmup: int = 3):
        for name, value, low in (("threads", threads, 1), ("runs", runs, 1), ("warmup", warmup, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.threads, self.runs, self.warmup = threads, runs, warmup
        path = default_cache_path() if cache_path is DEFAULT else cache_path
        self.cache_path: Optional[Path] = Path(path) if path is not None else None
        self._times: Dict[str, float] = {}
        if self.cache_path is not None:
            try:
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                log.warning("cannot create the latency cache directory %s (%s); running without cache",
                            self.cache_path.parent, exc)
                self.cache_path = None
        if self.cache_path is not None and self.cache_path.exists():
            loaded = self._read()
            if loaded is None:
                log.warning("latency cache %s is unreadable or corrupt; starting empty", self.cache_path)
            self._times.update(loaded or {})

    def key(self, target: LayerTarget, input_shape: Sequence[int], candidate: Candidate) -> LatencyKey:
        attrs = dict(layer_attrs(target), bias=target.bias_tensor is not None, weight_side=target.weight_side)
        return LatencyKey(cpu_model(), ort.__version__, self.threads, target.op, tuple(target.weight.shape),
                          tuple(sorted((k, v) for k, v in attrs.items())), tuple(int(d) for d in input_shape),
                          candidate[0], tuple(int(r) for r in candidate[1]))

    def measure(self, target: LayerTarget, input_shape: Tuple[int, ...],
                candidates: Sequence[Candidate]) -> List[float]:
        """Median milliseconds of each candidate for this layer at input activation shape
        `input_shape` (the layer input at the deployment batch); the candidates not cached yet
        are timed together, their sessions alive and interleaved in one call."""
        check_request(target, input_shape, candidates)
        keys = [self.key(target, input_shape, c).text for c in candidates]
        missing = {k: c for k, c in zip(keys, candidates) if k not in self._times}
        if missing:
            log.info("%s: timing %d candidate(s) at input %s, %d thread(s)", target.name, len(missing),
                     tuple(input_shape), self.threads)
            models = [candidate_model(target, input_shape, c) for c in missing.values()]
            sessions = [make_session(m, self.threads) for m in models]
            x = layer_input(target, input_shape)
            stats = time_sessions(sessions, {"x": x}, runs=self.runs, warmup=self.warmup)
            self._times.update({k: s.median_ms for k, s in zip(missing, stats)})
            self._save()
        return [self._times[k] for k in keys]

    def measure_ratios(self, target: LayerTarget, input_shape: Tuple[int, ...], chain: Candidate,
                       candidates: Sequence[Candidate]) -> Tuple[float, List[float]]:
        """(chain ms, time of each candidate ÷ the chain's): the chain and the candidates not
        cached yet are timed together, interleaved in `RATIO_BLOCKS` blocks of `runs` rounds;
        a ratio is the median over blocks of the block medians' ratio, so the two times of a
        ratio always come from the same moments (a cached time of another run never meets a
        fresh one). Ratios are cached per (candidate, chain) pair."""
        check_request(target, input_shape, [chain, *candidates])
        chain_key = self.key(target, input_shape, chain).text
        keys = [f"ratio|{self.key(target, input_shape, c).text}|{chain_key}" for c in candidates]
        missing = {k: c for k, c in zip(keys, candidates) if k not in self._times}
        if missing or chain_key not in self._times:
            log.info("%s: timing %d candidate(s) against the chain at input %s, %d thread(s)", target.name,
                     len(missing), tuple(input_shape), self.threads)
            models = [candidate_model(target, input_shape, c) for c in (chain, *missing.values())]
            sessions = [make_session(m, self.threads) for m in models]
            x = layer_input(target, input_shape)
            blocks = [time_sessions(sessions, {"x": x}, runs=self.runs, warmup=self.warmup if b == 0 else 1)
                      for b in range(RATIO_BLOCKS)]
            self._times[chain_key] = float(np.median([b[0].median_ms for b in blocks]))
            for i, key in enumerate(missing, 1):
                self._times[key] = float(np.median([b[i].median_ms / b[0].median_ms for b in blocks]))
            self._save()
        return self._times[chain_key], [self._times[k] for k in keys]
    @property
    def times(self) -> Dict[str, float]:
        """Median milliseconds by cache key (`LatencyKey.text`), measured or loaded."""
        return self._times

    def record(self, times: Dict[str, float]) -> None:
        """Add times measured elsewhere (another process of the same run) and save them."""
        new = {k: float(v) for k, v in times.items() if k not in self._times}
        if new:
            self._times.update(new)
            self._save()

    def _read(self) -> Optional[Dict[str, float]]:
        try:
            data = json.loads(self.cache_path.read_text())
            return {str(k): float(v) for k, v in data["times"].items()}
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None

    def _save(self) -> None:
        """Merge with the file's current entries, then replace it atomically."""
        if self.cache_path is None:
            return
        merged = dict(self._read() or {}, **self._times)
        tmp = None
        try:
            with tempfile.NamedTemporaryFile("w", dir=self.cache_path.parent, prefix=".latency.", suffix=".tmp",
                                             delete=False) as f:
                tmp = f.name
                json.dump({"version": 1, "times": merged}, f)
            os.replace(tmp, self.cache_path)
        except OSError as exc:
            log.warning("cannot write the latency cache %s (%s)", self.cache_path, exc)
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)


def interpolate_latency(ranks: Sequence[int], times: Sequence[float], rank: int) -> float:
    """Piecewise-linear time at `rank` over measured (rank, time) points; outside them, linear
    extrapolation from the two nearest points; never below 0."""
    if len(ranks) != len(times) or not ranks:
        raise ValueError(f"need as many ranks as times (>= 1), got {len(ranks)} and {len(times)}")
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"ranks must be distinct, got {list(ranks)}")
    order = np.argsort(ranks)
    r, t = np.asarray(ranks, np.float64)[order], np.asarray(times, np.float64)[order]
    if len(r) == 1:
        return max(0.0, float(t[0]))
    i = int(np.clip(np.searchsorted(r, rank) - 1, 0, len(r) - 2))
    value = t[i] + (t[i + 1] - t[i]) * (rank - r[i]) / (r[i + 1] - r[i])
    return max(0.0, float(value))


LATENCY_POINTS = 4
"""Ranks per kind whose latency is measured by `candidate_latencies`; the others are interpolated."""


def shape_key(target: LayerTarget, shape, candidates: Sequence[LayerCandidate]) -> tuple:
    """Layers with equal keys time alike: one measurement serves them all."""
    return (target.op, target.weight.shape, shape, target.weight_side, target.gemm, target.conv,
            target.bias_tensor is not None, tuple((c.method, c.ranks) for c in candidates))


def candidate_latencies(model: LatencyModel, target: LayerTarget, shape, candidates: Sequence[LayerCandidate]):
    """Dense time and every candidate's time: `LATENCY_POINTS` ranks per kind measured (all of
    them, interleaved, in one call), the rest interpolated in the first rank."""
    by_kind: Dict[str, List[int]] = {}
    for index, c in enumerate(candidates):
        by_kind.setdefault(c.method, []).append(index)
    measured = []
    for indices in by_kind.values():
        picks = np.unique(np.linspace(0, len(indices) - 1, num=min(LATENCY_POINTS, len(indices))).round().astype(int))
        measured.extend(indices[i] for i in picks)
    times = model.measure(target, shape, [("dense", ())] + [(candidates[i].method, candidates[i].ranks)
                                                          for i in measured])
    dense_ms, at = times[0], dict(zip(measured, times[1:]))
    out = []
    for index, c in enumerate(candidates):
        points = [i for i in by_kind[c.method] if i in at]
        out.append(at[index] if index in at else interpolate_latency(
            [candidates[i].ranks[0] for i in points], [at[i] for i in points], c.ranks[0]))
    return dense_ms, out
