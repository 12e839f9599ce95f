"""Typed reports of `inspect` and `compress`, with JSON and text renderings."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from ..model.layers import SkippedLayer


@dataclass(frozen=True)
class TargetInfo:
    """One factorizable layer as `inspect` lists it (`share`: of the model's parameters)."""

    name: str
    op: str
    weight_shape: Tuple[int, ...]
    params: int
    macs: Optional[int]
    share: float


@dataclass(frozen=True)
class ChannelGroupInfo:
    """A coupled group `prune` can narrow: `channels` (heads for kind "heads", each `block`
    features wide), the layers writing them, the layers reading them through a weight, the
    depthwise convs between, the residual Adds that tie its chains into one group, and the
    channel Concats through which readers see the channels at an offset."""

    name: str
    kind: str
    channels: int
    block: int
    producers: Tuple[str, ...]
    consumers: Tuple[str, ...]
    depthwise: Tuple[str, ...]
    residual_adds: Tuple[str, ...] = ()
    concats: Tuple[str, ...] = ()


@dataclass(frozen=True)
class BlockedGroupInfo:
    """Channels that cannot be narrowed, and why."""

    name: str
    channels: Optional[int]
    reason: str


@dataclass(frozen=True)
class GroupWidth:
    """A channel group as `prune` left it: `kept` of `channels` (heads for kind "heads")."""

    name: str
    kind: str
    channels: int
    kept: int


@dataclass(frozen=True)
class InspectReport:
    """`macs` (model and targets) are None while input dims past the batch axis are unknown
    (`unresolved`, given with ``--dim``): counting them as 1 would print a wrong number."""

    params: int
    macs: Optional[int]
    targets: Tuple[TargetInfo, ...]
    skipped: Tuple[SkippedLayer, ...]
    channel_groups: Tuple[ChannelGroupInfo, ...] = ()
    blocked_groups: Tuple[BlockedGroupInfo, ...] = ()
    unresolved: Tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_text(self) -> str:
        macs = f"{self.macs:,}" if self.macs is not None else "unknown"
        lines = [f"parameters {self.params:,}   MACs {macs}   "
                 f"targets {len(self.targets)} ({sum(t.share for t in self.targets):.1%} of parameters)"]
        if self.unresolved:
            lines.append(f"MACs need the input dims {', '.join(self.unresolved)}: "
                         + " ".join(f"--dim {d}=VALUE" for d in self.unresolved if not d.endswith("]")))
        width = max([len(t.name) for t in self.targets] + [4])
        for t in self.targets:
            target_macs = f"{t.macs:>14,}" if t.macs is not None else f"{'?':>14}"
            lines.append(f"  {t.name:<{width}}  {t.op:<6} {str(list(t.weight_shape)):<20} "
                         f"params {t.params:>11,}  MACs {target_macs}  {t.share:6.1%}")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)}:")
            lines.extend(f"  {s.name}  {s.op}: {s.reason}" for s in self.skipped)
        if self.channel_groups:
            lines.append(f"channel groups {len(self.channel_groups)} (narrowed together by prune):")
            for g in self.channel_groups:
                unit = f"{g.channels} heads of {g.block}" if g.kind == "heads" else f"{g.channels} channels"
                extra = "".join(f"  {label} {', '.join(names)}" for label, names in (
                    ("depthwise", g.depthwise), ("residual Adds", g.residual_adds), ("Concat", g.concats)) if names)
                lines.append(f"  {g.name}  {unit}: {', '.join(g.producers)} -> {', '.join(g.consumers)}{extra}")
        if self.blocked_groups:
            lines.append(f"blocked groups {len(self.blocked_groups)}:")
            lines.extend(f"  {b.name}  {b.channels}: {b.reason}" for b in self.blocked_groups)
        return "\n".join(lines)


@dataclass(frozen=True)
class ModelStats:
    params: int
    macs: int
    file_bytes: int
    ops: int = 0


@dataclass(frozen=True)
class LayerLatency:
    """A layer's median time alone in onnxruntime: dense, as written, and (with a rows
    residual) the plain chain of the same parameter budget."""

    dense_ms: float
    ms: float
    chain_ms: Optional[float] = None

    @property
    def residual_share(self) -> Optional[float]:
        """What the L + S layer costs over the plain chain of its budget (0.1: +10%)."""
        return None if self.chain_ms is None else self.ms / self.chain_ms - 1


@dataclass(frozen=True)
class LayerReport:
    """What happened to one target (`method` "dense" with a `reason` when left as is).

    `residual`: structure of the sparse residual ("" when none) and `residual_size` its k
    input rows ("rows": k·out params, run as dense ones) or nnz entries ("unstructured":
    counted in `params_after`, but a file-size saving only, onnxruntime densifies them).
    """

    name: str
    op: str
    method: str
    ranks: Tuple[int, ...]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    reason: str = ""
    data_error: Optional[float] = None
    residual: str = ""
    residual_size: int = 0
    latency: Optional[LayerLatency] = None

    @property
    def ranks_text(self) -> str:
        """Ranks, plus the residual: "64+12 rows" or "64+5000 nnz"."""
        ranks = "x".join(map(str, self.ranks)) or "-"
        if self.residual == "rows":
            return f"{ranks}+{self.residual_size} rows"
        if self.residual:
            return f"{ranks}+{self.residual_size} nnz"
        return ranks


@dataclass(frozen=True)
class AllocationSummary:
    """A global allocation: the `target` kind ("params", "macs", "latency", "error") and
    `value` asked for, what the allocation predicted (`predicted`: params or MACs ratio of the
    whole model, speedup, or output error; `predicted_error`: the model's relative output error
    from the layers' error curves and sensitivities), and for latency the speedup measured in
    onnxruntime on the written model (`measured_speedup`, at `batch` and `threads`)."""

    target: str
    value: float
    predicted: float
    predicted_error: float
    layers: int
    factorized: int
    sensitivity: bool
    measured_speedup: Optional[float] = None
    batch: int = 1
    threads: int = 2
    rounds: int = 1
    metric: Optional[float] = None
    metric_original: Optional[float] = None
    capped: bool = False
    joint: Tuple[str, ...] = ()

    def to_text(self) -> str:
        asked = f"speedup {self.value:g}x" if self.target == "latency" else f"{self.target} {self.value:g}"
        predicted = f"{self.predicted:.3f}x" if self.target == "latency" else f"{self.predicted:.3g}"
        line = (f"global allocation for {asked}: {self.factorized} of {self.layers} layers factorized, predicted "
                f"{predicted}, predicted output error {self.predicted_error:.3g}"
                + ("" if self.sensitivity else " (no sensitivity probes)"))
        if self.joint:
            line += f"; joint groups {', '.join(self.joint)}"
        if self.metric is not None:
            line += f"; metric {self.metric:.4g} (original {self.metric_original:.4g})"
        if self.measured_speedup is not None:
            line += (f"; measured speedup {self.measured_speedup:.3f}x at batch {self.batch}, {self.threads} threads"
                     f" ({self.rounds} round{'s' if self.rounds > 1 else ''})")
        return line


def _latency_text(latency: Optional[LayerLatency]) -> str:
    if latency is None:
        return ""
    text = f"{latency.dense_ms:.3f}>{latency.ms:.3f}"
    return text + (f" ({latency.residual_share:+.0%})" if latency.chain_ms is not None else "")


@dataclass(frozen=True)
class JointGroupReport:
    """A group of repeated layers: the `side` chosen ("left", "right", "both" or "separate"),
    its ranks, the group's parameters, and the summed squared held-out relative errors of
    separate fits at the members' plans and of the joint fit."""

    group: str
    members: Tuple[str, ...]
    side: str
    ranks: Tuple[int, ...]
    params: int
    separate_error: float
    joint_error: float


@dataclass(frozen=True)
class StageSummary:
    """One stage of a multi-stage run, measured against the original model."""

    stage: int
    params_ratio: float
    macs_ratio: float
    output_errors: Dict[str, float]
    seconds: float


@dataclass(frozen=True)
class QuantizationSummary:
    """int8 quantization after compression: the mode, the int8 weight elements written and
    their share of all weight elements, the quantized nodes (QDQ pairs and integer kernels),
    and the output errors against the original before and after quantizing."""

    mode: str
    int8_weights: int
    int8_share: float
    integer_nodes: int
    output_errors_before: Dict[str, float] = field(default_factory=dict)
    output_errors: Dict[str, float] = field(default_factory=dict)

    def to_text(self) -> str:
        before = ", ".join(f"{e:.3e}" for e in self.output_errors_before.values())
        after = ", ".join(f"{e:.3e}" for e in self.output_errors.values())
        return (f"int8 ({self.mode}): {self.int8_weights:,} weights int8 ({self.int8_share:.0%} of all), "
                f"{self.integer_nodes} quantized nodes; output error {before} before quantizing, {after} after")


@dataclass(frozen=True)
class ResidualCheck:
    """The written model with its automatic residuals against its L-only twin (the plain chain
    of each residual layer's budget): of the `layers` the fits gave a residual, the best
    `kept_layers` by held-out gain (0: all fell back); mean relative output error of the best
    such model and of the L-only one on the verification batches, the former's time over the
    latter's, and whether it was kept."""

    layers: int
    kept_layers: int
    error: float
    plain_error: float
    latency_ratio: float
    kept: bool

    def to_text(self) -> str:
        verdict = (f"{self.kept_layers} kept" if self.kept
                   else "dropped: every residual layer falls back to its plain chain")
        return (f"residual check ({self.layers} layers): best output error {self.error:.3e} vs L only "
                f"{self.plain_error:.3e}, latency {self.latency_ratio:.3f} of L only; {verdict}")


@dataclass(frozen=True)
class LeftAsFitted:
    """A part of the model recovery did not train, and why (e.g. the op with no gradient rule)."""

    part: str
    reason: str


@dataclass(frozen=True)
class RecoveryReport:
    """Held-out loss and output error (‖y − y_teacher‖ / ‖y_teacher‖) before and after."""

    level: str
    loss: str
    augment: str
    output: str
    trainable_tensors: int
    trainable_params: int
    train_samples: int
    heldout_samples: int
    steps: int
    best_step: int
    stopped_by: str
    seconds: float
    loss_before: float
    loss_after: float
    error_before: float
    error_after: float
    curve: Tuple[Tuple[int, float], ...]
    left_as_fitted: Tuple[LeftAsFitted, ...] = ()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_text(self) -> str:
        text = (f"recovery ({self.level}, {self.loss}, augment {self.augment}): {self.steps} steps in "
                f"{self.seconds:.0f} s "
                f"(best {self.best_step}, stopped by {self.stopped_by}), {self.trainable_params:,} weights trained on "
                f"{self.train_samples} samples; held-out loss {self.loss_before:.4g} -> {self.loss_after:.4g}, "
                f"output error {self.error_before:.3e} -> {self.error_after:.3e}")
        for left in self.left_as_fitted:
            text += f"\n  left as fitted: {left.part} ({left.reason})"
        return text


@dataclass(frozen=True)
class CompressionReport:
    before: ModelStats
    after: ModelStats
    layers: Tuple[LayerReport, ...]
    skipped: Tuple[SkippedLayer, ...]
    output_errors: Dict[str, float]
    seconds: float
    timings: Dict[str, float] = field(default_factory=dict)
    config: Dict[str, object] = field(default_factory=dict)
    allocation: Optional[AllocationSummary] = None
    verified_on: str = ""
    stages: Tuple[StageSummary, ...] = ()
    joint_groups: Tuple[JointGroupReport, ...] = ()
    quantization: Optional[QuantizationSummary] = None
    residual_check: Optional[ResidualCheck] = None
    recovery: Optional[RecoveryReport] = None
    widths: Tuple[GroupWidth, ...] = ()
    macs_unresolved: Tuple[str, ...] = ()

    @property
    def params_ratio(self) -> float:
        return self.after.params / self.before.params if self.before.params else 1.0

    @property
    def macs_ratio(self) -> float:
        return self.after.macs / self.before.macs if self.before.macs else 1.0

    @property
    def size_ratio(self) -> float:
        return self.after.file_bytes / self.before.file_bytes if self.before.file_bytes else 1.0

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.update(params_ratio=self.params_ratio, macs_ratio=self.macs_ratio, size_ratio=self.size_ratio)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_text(self) -> str:
        factorized = [layer for layer in self.layers if layer.method != "dense"]
        lines = [
            f"{'':12}{'before':>16}{'after':>16}{'ratio':>9}",
            f"{'parameters':12}{self.before.params:>16,}{self.after.params:>16,}{self.params_ratio:>9.3f}",
            f"{'MACs':12}{self.before.macs:>16,}{self.after.macs:>16,}{self.macs_ratio:>9.3f}"
            + (f"  (input dims {', '.join(self.macs_unresolved)} counted as 1: give --dim)"
               if self.macs_unresolved else ""),
            f"{'file bytes':12}{self.before.file_bytes:>16,}{self.after.file_bytes:>16,}{self.size_ratio:>9.3f}",
        ]
        if self.before.ops:
            lines.append(f"{'ops':12}{self.before.ops:>16,}{self.after.ops:>16,}{self.after.ops / self.before.ops:>9.3f}"
                         "  (nodes but Constants)")
        if self.layers or not self.widths:  # a width-only run factorizes nothing: it says what it narrowed
            lines.append(f"layers factorized {len(factorized)} of {len(self.layers)} targets; "
                         f"{len(self.skipped)} weight layers skipped")
        lines.extend(self._residual_lines())
        narrowed = [w for w in self.widths if w.kept < w.channels]
        if self.widths:
            kept, channels = sum(w.kept for w in self.widths), sum(w.channels for w in self.widths)
            lines.append(f"channel groups narrowed {len(narrowed)} of {len(self.widths)}, "
                         f"channels kept {kept:,} of {channels:,}: "
                         + ", ".join(f"{w.name} {w.kept}/{w.channels}{' heads' if w.kind == 'heads' else ''}"
                                     for w in narrowed[:12]) + (", …" if len(narrowed) > 12 else ""))
        if self.residual_check is not None:
            lines.append(self.residual_check.to_text())
        if self.allocation is not None:
            lines.append(self.allocation.to_text())
        joint = [g for g in self.joint_groups if g.side != "separate"]
        if self.joint_groups:
            lines.append(f"joint groups: {len(joint)} of {len(self.joint_groups)} fitted jointly ("
                         + ", ".join(f"{g.group} {g.side} {'+'.join(map(str, g.ranks))}" for g in joint) + ")")
        for stage in self.stages:
            errors = ", ".join(f"{e:.3e}" for e in stage.output_errors.values())
            lines.append(f"stage {stage.stage}: params {stage.params_ratio:.3f}, MACs {stage.macs_ratio:.3f}, "
                         f"output error {errors} ({stage.seconds:.1f} s)")
        if self.recovery is not None:
            lines.append(self.recovery.to_text())
        if self.quantization is not None:
            lines.append(self.quantization.to_text())
        where = f" ({self.verified_on})" if self.verified_on else ""
        for name, error in self.output_errors.items():
            lines.append(f"output {name}: relative error {error:.3e}{where}")
        lines.append(f"time {self.seconds:.1f} s")
        return "\n".join(lines)

    def _residual_lines(self) -> list:
        lines = []
        rows = [layer for layer in self.layers if layer.residual == "rows"]
        entries = [layer for layer in self.layers if layer.residual == "unstructured"]
        if rows:
            lines.append(f"sparse residuals (rows): {len(rows)} layers, {sum(r.residual_size for r in rows):,} "
                         f"input rows gathered (into the chains' second matmuls; whole input channels of k×k convs)")
        if entries:
            lines.append(f"sparse residuals (unstructured): {len(entries)} layers, "
                         f"{sum(r.residual_size for r in entries):,} stored values; file size only, no speed-up: "
                         f"onnxruntime densifies sparse initializers and runs these layers dense")
        return lines

    def layer_table(self) -> str:
        width = max([len(layer.name) for layer in self.layers] + [5])
        timed = any(layer.latency is not None for layer in self.layers)
        lines = [f"{'layer':<{width}}  {'op':<6} {'method':<8} {'ranks':<10} {'params':>21} {'MACs':>25}  "
                 + ("ms dense>after (residual)  " if timed else "") + "error"]
        for layer in self.layers:
            error = f"{layer.data_error:.3e}" if layer.data_error is not None else ""
            lines.append(f"{layer.name:<{width}}  {layer.op:<6} {layer.method:<8} {layer.ranks_text:<10} "
                         f"{layer.params_before:>10,}>{layer.params_after:<10,} "
                         f"{layer.macs_before:>12,}>{layer.macs_after:<12,}  "
                         + (f"{_latency_text(layer.latency):<26} " if timed else "") + f"{error or layer.reason}")
        return "\n".join(lines)


@dataclass(frozen=True)
class SweepPoint:
    """One global allocation of a sweep, measured: ratios against the original, speedup in
    onnxruntime, the largest relative output error, and the user's metric when given.
    `pareto`: no other point is both faster and more accurate."""

    target_params: float
    params_ratio: float
    macs_ratio: float
    size_ratio: float
    speedup: float
    output_error: float
    metric: Optional[float] = None
    pareto: bool = False


@dataclass(frozen=True)
class SweepReport:
    """A sweep over `target_params`: one point per value, latency at `batch` and `threads`."""

    points: Tuple[SweepPoint, ...]
    batch: int
    threads: int
    verified_on: str = ""
    metric_original: Optional[float] = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self) -> str:
        metric = self.metric_original is not None
        header = ["target params", "params", "MACs", "file", f"speedup (batch {self.batch}, {self.threads} thr)",
                  "output error"] + (["metric"] if metric else []) + ["Pareto"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * (len(header) - 1) + ":---|"]
        if metric:
            lines.append(f"| original | 1 | 1 | 1 | 1.000 | 0 | {self.metric_original:.4g} | |")
        for p in self.points:
            cells = [f"{p.target_params:.3g}", f"{p.params_ratio:.3f}", f"{p.macs_ratio:.3f}", f"{p.size_ratio:.3f}",
                     f"{p.speedup:.3f}", f"{p.output_error:.3e}"] + ([f"{p.metric:.4g}"] if metric else [])
            lines.append("| " + " | ".join(cells + ["yes" if p.pareto else ""]) + " |")
        return "\n".join(lines)
