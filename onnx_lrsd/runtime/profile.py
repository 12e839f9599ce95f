"""Per-layer latency from onnxruntime's profiler, mapped back to the model's own node names.

At `ORT_ENABLE_ALL` onnxruntime fuses and renames nodes: Conv + BatchNormalization + Relu run
as one NCHWc Conv named after the Relu's *output tensor* (`r2_nchwc`), MatMul + Add as a Gemm
named `…/MatMulAddFusion`, Reorder nodes appear from nowhere. The profile names only executed
nodes, so the mapping goes through the graph onnxruntime actually ran (saved with
`optimized_model_filepath` by the profiling session itself):

1. every node of the model gets a unique name first (unnamed nodes `{op}_{index}`, as the
   compressor names them), so an executed node that kept its name is found by name;
2. an executed node's *heads* are the model nodes it is derived from: the node of the same
   name, or for `X_nchwc` the producer of tensor X; the producers of its output tensors that
   kept their name (a Conv fused with the Relu after it writes the Relu's output); failing
   both, the longest model node name its name starts with (fusions name nodes
   `{node}/…Fusion`, subgraph nodes `{owner}/…`);
3. each head absorbs the model nodes upstream of it whose outputs no longer exist in the
   executed graph (fused into it), stopping at surviving tensors and constants;
4. the kernel's time goes to the *layer* of its nodes: the node whose op the kernel runs
   (FusedConv → Conv), else the weight op (Conv, Gemm, MatMul), else the most upstream one.
   Layout reorders go to the layer they feed (ReorderInput) or drain (ReorderOutput).

A compressed model's chain nodes `{layer}/lrsd/{role}` belong to `{layer}`, so the original and
the compressed model are compared layer by layer (profiled in one process, runs interleaved).
A kernel's time is its median over the profiled runs; a layer's is the sum over its kernels.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import onnx

from ..errors import LrsdError
from ..model.io import load_model, needs_external_data, save_model, temporary_directory
from ..model.naming import layer_of, name_nodes
from .feeds import random_feeds
from .session import make_session

log = logging.getLogger(__name__)

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_NCHWC_NAME = re.compile(r"^(.*)_nchwc(?:_token_\d+)?$")
_REORDER_OPS = ("ReorderInput", "ReorderOutput")


@dataclass(frozen=True)
class ExecutedNode:
    """A node of the graph onnxruntime ran (after its optimizations)."""

    name: str
    op: str
    inputs: Tuple[str, ...]
    outputs: Tuple[str, ...]


@dataclass(frozen=True)
class KernelMap:
    """Where each executed node's time goes: `layer[executed name]` (a model node name, or the
    executed name itself when nothing in the model matches), the model nodes each executed node
    covers, and the model nodes no kernel runs (constant-folded or removed)."""

    layer: Dict[str, str]
    covered: Dict[str, Tuple[str, ...]]
    unexecuted: Tuple[str, ...]


def map_kernels(model_graph: onnx.GraphProto, executed: Sequence[ExecutedNode]) -> KernelMap:
    """Map the executed nodes to the nodes of `model_graph` (named, see `name_nodes`) by the
    rules of the module docstring."""
    nodes = list(model_graph.node)
    index = {n.name: i for i, n in enumerate(nodes)}
    producer = {out: i for i, n in enumerate(nodes) for out in n.output if out}
    constants = _constant_tensors(model_graph)
    executed_names = {e.name for e in executed}
    live = {t for e in executed for t in (*e.inputs, *e.outputs) if t}
    live |= {m.group(1) for e in executed if (m := _NCHWC_NAME.match(e.name))}
    live |= {i.name for i in model_graph.input} | constants

    owner: Dict[int, str] = {}  # model node index -> executed node name
    heads: Dict[str, List[int]] = {e.name: [] for e in executed}
    for rule in (_named_head, _output_heads, _prefix_head):  # surest evidence first
        for e in executed:
            if rule is _prefix_head and heads[e.name]:
                continue
            for i in rule(e, index, producer, executed_names):
                if i not in owner:
                    owner[i] = e.name
                    heads[e.name].append(i)
    for e in executed:  # absorb the fused nodes upstream of each head
        stack = list(heads[e.name])
        while stack:
            for tensor in nodes[stack.pop()].input:
                source = producer.get(tensor)
                if tensor in live or source is None or source in owner:
                    continue
                owner[source] = e.name
                stack.append(source)
    covered: Dict[str, List[int]] = {e.name: [] for e in executed}
    for i, name in sorted(owner.items()):
        covered[name].append(i)

    layer: Dict[str, str] = {}
    for e in executed:
        if covered[e.name]:
            layer[e.name] = nodes[_anchor(e, covered[e.name], nodes)].name
    _attribute_orphans(executed, layer)
    return KernelMap(layer=layer, covered={k: tuple(nodes[i].name for i in v) for k, v in covered.items()},
                     unexecuted=tuple(n.name for i, n in enumerate(nodes) if i not in owner))


def _constant_tensors(graph: onnx.GraphProto) -> set:
    """Initializers and outputs of nodes fed by constants only (folded at session creation)."""
    constants = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    for node in graph.node:
        if all(not t or t in constants for t in node.input) and not _has_subgraph(node):
            constants.update(node.output)
    return constants


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _named_head(e: ExecutedNode, index: Mapping[str, int], producer: Mapping[str, int], executed_names: set
                ) -> List[int]:
    """The model node of the same name, or of `X_nchwc`: the producer of tensor X."""
    if e.name in index:
        return [index[e.name]]
    match = _NCHWC_NAME.match(e.name)
    return [producer[match.group(1)]] if match and match.group(1) in producer else []


def _output_heads(e: ExecutedNode, index: Mapping[str, int], producer: Mapping[str, int], executed_names: set
                  ) -> List[int]:
    """The producers of the output tensors that kept their name (a Conv fused with the Relu
    after it writes the Relu's output); not for layout reorders, which only convert."""
    return [] if e.op in _REORDER_OPS else [producer[t] for t in e.outputs if t in producer]


def _prefix_head(e: ExecutedNode, index: Mapping[str, int], producer: Mapping[str, int], executed_names: set
                 ) -> List[int]:
    """The longest model node name the executed name starts with (`{node}/…Fusion`,
    subgraph nodes `{owner}/…`), if that node does not run under its own name."""
    if e.op in _REORDER_OPS:
        return []
    prefixes = [name for name in index if e.name.startswith(name) and name not in executed_names]
    return [index[max(prefixes, key=len)]] if prefixes else []


def _anchor(e: ExecutedNode, covered: Sequence[int], nodes: Sequence[onnx.NodeProto]) -> int:
    """The covered node whose time this is: same op as the kernel, else a weight op, else the
    most upstream (covered is in graph order)."""
    base = e.op[len("Fused"):] if e.op.startswith("Fused") else e.op
    for wanted in ((base,), WEIGHT_OPS):
        found = [i for i in covered if nodes[i].op_type in wanted]
        if found:
            return found[0]
    return covered[0]


def _attribute_orphans(executed: Sequence[ExecutedNode], layer: Dict[str, str]) -> None:
    """Executed nodes without a model node (layout reorders, …) take the layer they feed
    (ReorderInput and the like) or, failing that, the one feeding them; repeated until
    nothing changes; what is left keeps its own name."""
    producers = {t: e for e in executed for t in e.outputs if t}
    consumers: Dict[str, List[ExecutedNode]] = {}
    for e in executed:
        for t in e.inputs:
            consumers.setdefault(t, []).append(e)
    changed = True
    while changed:
        changed = False
        for e in executed:
            if e.name in layer:
                continue
            downstream = [c.name for t in e.outputs for c in consumers.get(t, []) if c.name in layer]
            upstream = [producers[t].name for t in e.inputs if t in producers and producers[t].name in layer]
            order = (upstream, downstream) if e.op == "ReorderOutput" else (downstream, upstream)
            for candidates in order:
                if candidates:
                    layer[e.name] = layer[candidates[0]]
                    changed = True
                    break
    for e in executed:
        layer.setdefault(e.name, e.name)


@dataclass(frozen=True)
class LayerTime:
    """One layer's time per run inside the whole model (`share` of the total kernel
    time), the kernels that ran for it and the model nodes they cover."""

    name: str
    op: str
    ms: float
    share: float
    kernels: Tuple[str, ...]
    nodes: Tuple[str, ...]


@dataclass(frozen=True)
class LayerProfile:
    """A model's per-layer profile at `threads` and `batch`.

    A layer's `ms` is the sum of its kernels' medians over the runs; `op_ms` the sum over all
    kernels (the layers' sum), `run_op_ms` the median run's total kernel time (close to
    `op_ms`), `run_ms` the median wall time of a run (kernels plus the executor's own work);
    `arena_peak_bytes`: the largest
    `mem_in_use_peak` onnxruntime's CPU arena reported (activations and workspace);
    `unexecuted`: model nodes no kernel runs (folded into constants or removed)."""

    model: str
    layers: Tuple[LayerTime, ...]
    op_ms: float
    run_op_ms: float
    run_ms: float
    runs: int
    threads: int
    batch: int
    kernels: int
    arena_peak_bytes: int
    unexecuted: Tuple[str, ...]

    def layer(self, name: str) -> Optional[LayerTime]:
        return next((layer for layer in self.layers if layer.name == name), None)

    @property
    def ms_by_op(self) -> Dict[str, float]:
        """Time per run by the layers' op type, largest first."""
        totals: Dict[str, float] = {}
        for layer in self.layers:
            totals[layer.op] = totals.get(layer.op, 0.0) + layer.ms
        return dict(sorted(totals.items(), key=lambda item: -item[1]))

    def to_dict(self) -> dict:
        return dict(dataclasses.asdict(self), ms_by_op=self.ms_by_op)

    def op_text(self, top: int = 6) -> str:
        return ", ".join(f"{op} {ms / self.op_ms:.0%}" for op, ms in list(self.ms_by_op.items())[:top]
                         if self.op_ms)

    def to_text(self, top: int = 15) -> str:
        width = max([len(layer.name) for layer in self.layers[:top]] + [5])
        lines = [f"{self.model}: {len(self.layers)} layers, {self.kernels} kernels, kernel time {self.op_ms:.3f} ms "
                 f"of {self.run_ms:.3f} ms per run ({self.runs} profiled runs, batch {self.batch}, "
                 f"{self.threads} threads)",
                 f"  {'layer':<{width}}  {'op':<8} {'ms':>9} {'share':>7}  kernels"]
        for layer in self.layers[:top]:
            lines.append(f"  {layer.name:<{width}}  {layer.op:<8} {layer.ms:>9.3f} {layer.share:>7.1%}  "
                         + _kernel_text(layer.kernels))
        if len(self.layers) > top:
            rest = self.layers[top:]
            lines.append(f"  … {len(rest)} more layers, {sum(r.ms for r in rest):.3f} ms")
        lines.append(f"  by op: {self.op_text()}")
        return "\n".join(lines)


def _kernel_text(kernels: Sequence[str]) -> str:
    counts: Dict[str, int] = {}
    for k in kernels:
        counts[k] = counts.get(k, 0) + 1
    return " ".join(k if n == 1 else f"{k}×{n}" for k, n in counts.items())


def profile_layers(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], threads: int = 2, runs: int = 10,
                   warmup: int = 3, label: str = "model") -> LayerProfile:
    """Per-layer profile of `model` over `runs` runs after `warmup` (see `profile_models`)."""
    return profile_models([model], feeds, threads, runs, warmup, [label])[0]


def profile_models(models: Sequence[onnx.ModelProto], feeds: Mapping[str, np.ndarray], threads: int = 2,
                   runs: int = 10, warmup: int = 3, labels: Optional[Sequence[str]] = None) -> List[LayerProfile]:
    """Per-layer profiles of models that take the same inputs, each in a profiling session
    (`ORT_ENABLE_ALL`, as `make_session`), all alive at once and run interleaved (the order
    reversed every round) so that load on the machine hits them alike. Models are copied,
    never modified."""
    if runs < 1:
        raise LrsdError(f"profile runs must be >= 1, got {runs}")
    labels = list(labels) if labels is not None else [f"model {i}" for i in range(len(models))]
    feed_dict = dict(feeds)
    with temporary_directory("onnx_lrsd-profile-") as tmp:
        named, sessions = [], []
        for i, model in enumerate(models):
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            name_nodes(copy)
            source: object = copy
            if needs_external_data(copy):
                source = save_model(copy, Path(tmp) / f"model{i}.onnx", external_data=True)
            named.append(copy)
            sessions.append(make_session(source, threads, profile_prefix=str(Path(tmp) / f"profile{i}"),
                                         optimized_path=str(Path(tmp) / f"optimized{i}.onnx")))
        for _ in range(warmup):
            for session in sessions:
                session.run(None, feed_dict)
        for round_index in range(runs):
            for session in sessions if round_index % 2 == 0 else sessions[::-1]:
                session.run(None, feed_dict)
        profiles = []
        for i, session in enumerate(sessions):
            events = json.loads(Path(session.end_profiling()).read_text())
            optimized = Path(tmp) / f"optimized{i}.onnx"
            if optimized.is_file():
                executed = executed_nodes(onnx.load(str(optimized), load_external_data=False).graph)
            else:  # kernels are then matched by name only
                log.warning("onnxruntime did not save the optimized graph; layers matched by kernel names only")
                executed = []
            profiles.append(summarize_profile(named[i].graph, executed, events, warmup, threads, _batch(feeds),
                                              labels[i]))
        del sessions
    return profiles


def executed_nodes(graph: onnx.GraphProto) -> List[ExecutedNode]:
    return [ExecutedNode(n.name, n.op_type, tuple(n.input), tuple(n.output)) for n in graph.node]


def summarize_profile(model_graph: onnx.GraphProto, executed: Sequence[ExecutedNode], events: Sequence[dict],
                      warmup: int, threads: int, batch: int, label: str = "model") -> LayerProfile:
    """Per-layer times from a profiler trace: each kernel's median over the model runs after
    the first `warmup`, summed per layer."""
    run_events = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[warmup:]
    if not run_events:
        raise LrsdError("the profile holds no timed runs")
    kernel_events = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    starts = np.array([e["ts"] for e in run_events])
    ends = starts + np.array([e["dur"] for e in run_events])
    runs = len(run_events)
    per_run: Dict[str, np.ndarray] = {}  # kernel -> µs in each timed run
    ops: Dict[str, str] = {}
    arena_peak = 0
    for e in kernel_events:
        slot = int(np.searchsorted(starts, e["ts"], side="right")) - 1
        if slot < 0 or e["ts"] > ends[slot]:
            continue  # a warm-up run
        name = e["name"][: -len("_kernel_time")]
        per_run.setdefault(name, np.zeros(runs))[slot] += e["dur"]
        ops[name] = e.get("args", {}).get("op_name", "")
        arena_peak = max(arena_peak, int(e.get("args", {}).get("mem_in_use_peak", 0)))
    kernel_ms = {name: float(np.median(values)) / 1e3 for name, values in per_run.items()}
    known = {e.name for e in executed}
    extra = [ExecutedNode(name, ops[name], (), ()) for name in per_run if name not in known]  # subgraph kernels
    mapping = map_kernels(model_graph, list(executed) + extra)
    model_ops = {n.name: n.op_type for n in model_graph.node}
    per_layer: Dict[str, List[str]] = {}
    for name in per_run:
        per_layer.setdefault(layer_of(mapping.layer[name]), []).append(name)
    op_ms = sum(kernel_ms.values())
    layers = []
    for layer, kernels in per_layer.items():
        ms = sum(kernel_ms[k] for k in kernels)
        anchors = [mapping.layer[k] for k in kernels]
        op = model_ops.get(layer) or next((model_ops[a] for a in anchors if a in model_ops), ops[kernels[0]])
        covered = tuple(dict.fromkeys(n for k in kernels for n in mapping.covered.get(k, ())))
        layers.append(LayerTime(name=layer, op=op, ms=ms, share=ms / op_ms if op_ms else 0.0,
                                kernels=tuple(ops[k] for k in kernels), nodes=covered))
    layers.sort(key=lambda layer: -layer.ms)
    log.debug("%s: %d kernels mapped to %d layers, %d nodes not executed", label, len(per_run), len(layers),
              len(mapping.unexecuted))
    run_totals = np.sum(list(per_run.values()), axis=0) if per_run else np.zeros(runs)
    return LayerProfile(model=label, layers=tuple(layers), op_ms=op_ms, run_op_ms=float(np.median(run_totals)) / 1e3,
                        run_ms=float(np.median([e["dur"] for e in run_events])) / 1e3, runs=runs, threads=threads,
                        batch=batch, kernels=len(per_run), arena_peak_bytes=arena_peak, unexecuted=mapping.unexecuted)


def _batch(feeds: Mapping[str, np.ndarray]) -> int:
    first = next(iter(feeds.values()), None)
    return int(first.shape[0]) if first is not None and np.ndim(first) > 0 else 1


@dataclass(frozen=True)
class LayerDelta:
    """One layer in two models: time in each (None where it has no kernel) and after / before."""

    name: str
    op: str
    baseline_ms: Optional[float]
    candidate_ms: Optional[float]
    candidate_kernels: Tuple[str, ...]

    @property
    def ratio(self) -> Optional[float]:
        if not self.baseline_ms or self.candidate_ms is None:
            return None
        return self.candidate_ms / self.baseline_ms


def compare_profiles(baseline: LayerProfile, candidate: LayerProfile) -> List[LayerDelta]:
    """The layers of both profiles joined by name, the baseline's slowest first (then layers
    only the candidate has)."""
    rows = []
    for layer in baseline.layers:
        other = candidate.layer(layer.name)
        rows.append(LayerDelta(layer.name, layer.op, layer.ms, other.ms if other else None,
                               other.kernels if other else ()))
    names = {layer.name for layer in baseline.layers}
    rows += [LayerDelta(layer.name, layer.op, None, layer.ms, layer.kernels)
             for layer in candidate.layers if layer.name not in names]
    return rows


def comparison_text(baseline: LayerProfile, candidate: LayerProfile, top: int = 15) -> str:
    rows = compare_profiles(baseline, candidate)
    width = max([len(r.name) for r in rows[:top]] + [5])

    def ms(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = [f"per-layer kernel time (ms per run, kernels' medians; baseline {baseline.op_ms:.3f} ms, candidate "
             f"{candidate.op_ms:.3f} ms in {baseline.kernels} and {candidate.kernels} kernels)",
             f"  {'layer':<{width}}  {'op':<8} {'baseline':>9} {'candidate':>9} {'ratio':>6}  candidate kernels"]
    for r in rows[:top]:
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}"
        lines.append(f"  {r.name:<{width}}  {r.op:<8} {ms(r.baseline_ms):>9} {ms(r.candidate_ms):>9} {ratio:>6}  "
                     + _kernel_text(r.candidate_kernels))
    if len(rows) > top:
        rest = rows[top:]
        lines.append(f"  … {len(rest)} more layers: {sum(r.baseline_ms or 0 for r in rest):.3f} ms / "
                     f"{sum(r.candidate_ms or 0 for r in rest):.3f} ms")
    lines += [f"  by op, baseline: {baseline.op_text()}", f"  by op, candidate: {candidate.op_text()}"]
    return "\n".join(lines)


def profile_pair(original: Union[str, os.PathLike], compressed, batch: int = 1, threads: int = 2,
                 dims: Sequence[Tuple[str, int]] = (), seed: int = 0, runs: int = 10
                 ) -> Tuple[Optional[Tuple[LayerProfile, LayerProfile]], str]:
    """In-network per-layer profiles of the original model file and the compressed model on the
    same seeded random inputs, or (None, why not) when the inputs cannot be built or a model
    does not run."""
    try:
        source = load_model(original)
        compressed = load_model(compressed)
        feeds = random_feeds(source, batch=batch, dims=dict(dims), seed=seed)
        return tuple(profile_models([source, compressed], feeds, threads, runs=runs,
                                    labels=["original", "compressed"])), ""
    except LrsdError as exc:
        return None, str(exc)
