"""Typed configuration of a compression run, and its loading from JSON/YAML files."""
from __future__ import annotations

import dataclasses
import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Tuple, Union

from .errors import UsageError

METHODS = ("auto", "svd", "channel", "spatial", "tucker2")
"""Factorization kinds: `svd` for Gemm/MatMul (and 1×1 convs), the others for Conv; `auto`
picks the kind with the fewest MACs at the layer's parameter budget."""

PRUNE = "prune"
PRUNE_AND_LOW_RANK = "prune+lowrank"
RUN_METHODS = METHODS + (PRUNE, PRUNE_AND_LOW_RANK)
"""`method` of a whole run: a factorization kind, `prune`: structured width reduction (whole
channels, FFN neurons and attention heads removed, readers refitted; `onnx_lrsd.passes.prune`),
or `prune+lowrank`: both in one global allocation, a group narrowed and/or its layers factorized
(`onnx_lrsd.passes.width_and_rank`)."""

WIDTH_CRITERIA = ("greedy", "nystrom", "energy")
"""How `prune` chooses the channels kept (`onnx_lrsd.decompose.channels`)."""

MODES = ("independent", "sequential")

JOINT = ("off", "left", "right", "both", "auto")
"""Joint decomposition of repeated layers (JMD): shared input-side factor (left), output-side
factor (right), both (MatMul groups), or per group the best of left, right and separate fits
(auto)."""

SPARSE_STRUCTURES = ("rows", "unstructured")

SVD_SOLVERS = ("auto", "exact", "gram")
"""Solvers of the truncated SVD (`onnx_lrsd.decompose.svd`, which may not import this module;
tests/test_svd_solvers.py checks the two lists agree)."""

EXECUTORS = ("local", "ray")
"""Where the independent work runs (`onnx_lrsd.parallel.executor`)."""

RECOVER_LEVELS = ("end-to-end", "blocks", "blocks+end-to-end")
"""Levels of recovery (`onnx_lrsd.recover.blockwise.recover_at_level`): end-to-end distillation
on the model output, block-wise reconstruction, or blocks on half the budget then end-to-end."""

RECOVER_LEVEL = "blocks+end-to-end"
"""The default order of the issue: block-wise reconstruction, then end-to-end distillation (on
PP-OCRv4 rec at keep 0.5 it recovered 0.994 / 0.863 where end-to-end alone gave 0.981 / 0.834:
`benchmarks/results/recovery_blocks.md`)."""
RECOVER_BLOCK_SIZE = 6
"""Block-wise reconstruction: nodes reading trained weights per block."""
RECOVER_WARMUP = 0
"""Steps over which recovery's Adam step size rises linearly to its value. None by default: at
the default step size (1e-4) a warm-up changed no recovered metric (digit CNN keep 0.05, PP-OCR
rec width 0.7; `python -m benchmarks recovery_warmup`); it shrinks the held-out loss's early rise
where the step size is large for the model (digit CNN keep 0.05 at 1e-3) and slows models far
from the original (digit CNN keep 0.02 at 1e-3)."""

RECOVER_STEP_SCALES = ("absolute", "relative")
"""How far recovery's Adam step moves a tensor (`onnx_lrsd.recover.distill`): by about lr in
every weight whatever the tensor's scale ("absolute", plain Adam), or by about lr times the
tensor's RMS at the start ("relative", as Adafactor / LAMB)."""
RECOVER_STEP_SCALE = "absolute"
"""The default `RECOVER_STEP_SCALES` entry. Relative steps did not remove the held-out loss's
early rise, they move where it starts on the lr axis: on the digit CNN at keep 0.05 relative
3e-3 follows about the curve of absolute 1e-4; on PP-OCRv4 rec narrowed to width 0.7
(block-wise) relative 1e-3 rose 4.6× over its first 20 steps where absolute 1e-4 rose 1.7× and
absolute 3e-5 1.09×; no recovered task metric was better (`python -m benchmarks recovery_step`)."""

QUANTIZE_MODES = ("dynamic", "dynamic-matmul", "static")
"""int8 quantization after compression (see `onnx_lrsd.runtime.quantize`)."""

AUTO_SHARE = "auto"

AUTO_SHARES = (0.0, 0.1, 0.2, 0.35, 0.5)
"""Shares of a layer's parameter budget tried for the sparse part when ``sparse_share="auto"``
(0 always among them, so L + S is never worse than L alone on the data it is judged on)."""

TARGETS = {"params": "target_params", "macs": "target_macs", "latency": "target_latency", "error": "max_error"}
"""Global targets: kind -> the `CompressConfig` field holding its value."""

FULL_RANK = "full"

SWEEP_POINTS = (0.9, 0.75, 0.6, 0.5, 0.4, 0.3, 0.2)
"""Default `target_params` values of a sweep."""

Rank = Union[int, str]

JOINT_SHORT = (("l", "left"), ("r", "right"), ("b", "both"))
"""The command line's short names of the `JOINT` kinds."""


def parse_dim(text: str) -> Tuple[str, int]:
    """``name=size`` -> (name, size) of a symbolic input dim; ValueError if malformed."""
    name, sep, size = text.partition("=")
    if not sep or not name or not size.isdigit() or int(size) < 1:
        raise ValueError(f"expected name=positive-integer, got {text!r}")
    return name, int(size)


def parse_sparse_share(text: str) -> Union[float, str]:
    """A share in [0, 1) or 'auto'; ValueError otherwise."""
    if text == AUTO_SHARE:
        return text
    try:
        share = float(text)
    except ValueError:
        share = -1.0
    if not 0 <= share < 1:
        raise ValueError(f"expected a number in [0, 1) or 'auto', got {text!r}")
    return share


METRIC_PLACEHOLDER = "{model}"
"""Where a metric command (`CompressConfig.metric_command`) takes the candidate model's path."""
def parse_recover(text: str) -> Union[int, str]:
    """'auto' or a number of steps (ValueError otherwise)."""
    if text == "auto":
        return text
    if not text.isdigit():
        raise ValueError(f"expected 'auto' or a number of steps, got {text!r}")
    return int(text)


def parse_duration(text: str) -> float:
    """Seconds from "90", "90s", "10m" or "1h" (ValueError otherwise)."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    value = str(text).strip().lower()
    scale = units.get(value[-1:], None)
    number = value[:-1] if scale is not None else value
    try:
        seconds = float(number) * (scale or 1.0)
    except ValueError:
        raise ValueError(f"not a duration: {text!r} (e.g. 90s, 10m, 1h)") from None
    if not seconds > 0:
        raise ValueError(f"a duration must be > 0, got {text!r}")
    return seconds


COMPRESS, SWEEP, RECOVER = "compress", "sweep", "recover"
"""The commands that take `CompressConfig` fields as options (`recover`: the executor's)."""


@dataclass(frozen=True)
class CliOption:
    """How a `CompressConfig` field appears on the command line; `onnx_lrsd.cli` builds the
    click option from it, the field's type and its default (appended to `help`).

    flag: the option's name (``--field-name`` if None); choices: the allowed values, with
    `aliases` (short name, value) shown in their place; minimum: the smallest integer;
    parse: text -> value (ValueError with the message if malformed); multiple: repeatable, the
    field holds the tuple of parsed values; flag_value: the value of the option given without
    one. A bool field whose default is on also gets a ``--no-`` form; one whose default is off
    is a plain switch.
    """

    help: str
    commands: Tuple[str, ...] = (COMPRESS,)
    flag: Optional[str] = None
    choices: Optional[Tuple[str, ...]] = None
    aliases: Tuple[Tuple[str, str], ...] = ()
    metavar: Optional[str] = None
    minimum: Optional[int] = None
    parse: Optional[Callable[[str], Any]] = None
    multiple: bool = False
    flag_value: Optional[str] = None


def option(default, help: str, **cli) -> Any:
    """A `CompressConfig` field with a command-line option (see `CliOption`)."""
    return dataclasses.field(default=default, metadata={"cli": CliOption(help, **cli)})


BOTH = (COMPRESS, SWEEP)
EXECUTION = (COMPRESS, SWEEP, RECOVER)


@dataclass(frozen=True)
class LayerOverride:
    """Per-layer settings for the nodes whose name matches `pattern` (exact name or glob).

    `rank` forces a factorization at that rank (``"full"`` keeps every singular value) even
    when it does not save anything; `keep` and `method` replace the global ones; `skip`
    leaves the layer dense.
    """

    pattern: str
    keep: Optional[float] = None
    energy: Optional[float] = None
    rank: Optional[Rank] = None
    method: Optional[str] = None
    skip: bool = False

    def matches(self, name: str) -> bool:
        return name == self.pattern or fnmatch.fnmatchcase(name, self.pattern)

    def validate(self) -> None:
        where = f"layer override '{self.pattern}'"
        if self.keep is not None:
            check_keep(self.keep, where)
        if self.energy is not None:
            check_energy(self.energy, where)
        if self.rank is not None and self.rank != FULL_RANK:
            if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
                raise UsageError(f"{where}: rank must be a non-negative integer or 'full', got {self.rank!r}")
        if self.method is not None and self.method not in METHODS:
            raise UsageError(f"{where}: unknown method {self.method!r} (choose from {', '.join(METHODS)})")


@dataclass(frozen=True)
class CompressConfig:
    """Everything that decides how a model is compressed.

    keep: fraction of each layer's weight parameters kept, in (0, 1].
    energy: if set, each layer keeps the smallest rank holding this share of the squared
        singular values (still capped by the `keep` budget).
    method: factorization kind, one of `METHODS`, `prune` (structured width reduction) or
        `prune+lowrank` (widths and factorizations in one allocation; `RUN_METHODS`).
    width_criterion: with `prune` / `prune+lowrank`, how the kept channels are chosen (`WIDTH_CRITERIA`).
    overrides: per-layer settings; the first matching override wins.
    lookup_ridge: an embedding table's (Gather) fit weighs token v by c_v + λ·mean(c), c its
        calibration counts; every row is then fitted on the chosen basis whatever its weight, so λ
        only decides how much the tokens calibration rarely or never saw shape the basis. 0.1 had
        the best cosine and MRR on MiniLM's search split at rank 128 (`benchmarks/embedding_table`).
    conv_rank_multiple: conv ranks are rounded down to multiples of this (onnxruntime's NCHWc
        blocks) when that gives up at most a quarter of the rank.
    min_rank: a layer whose budget allows a smaller rank stays dense (tiny ranks of small
        layers, e.g. a 1→32 stem conv, cost more accuracy than they save).
    min_layer_share: a layer holding less than this share of all target parameters stays
        dense: it saves little, and small layers are often the most fragile (PP-OCR keep 0.5:
        character accuracy 0.80 with them factorized, 0.98 without, at the same size).
    verify: run original and compressed models in onnxruntime and report output errors.
    verify_batch: batch size of the verification inputs; `dims` fixes other symbolic dims.
    seed: seed of every random choice (verification inputs, randomized solvers).
    external_data: always save weights as external data (always done above 2 GB).
    map_weights_above_mb: a model file whose external data exceeds this many MiB keeps its
        weights on disk, read through memory maps one layer at a time (`onnx_lrsd.model.mapped`);
        the output is then written with external data.
    sparse_share: share of each layer's parameter budget given to a sparse residual S (W ≈
        L + S, LRSD / CMD), in [0, 1); ``"auto"`` picks per layer among `AUTO_SHARES` by the
        lowest held-out data error (a share > 0 must beat the plain chain's by
        `residual_min_gain`, relative). Applies to Gemm, MatMul with the weight on the right
        and convs factorized by svd / channel.
    sparse_structure: ``"rows"`` (whole input rows, concatenated into the chain's second
        matmul: runs at about the cost of dense parameters; for a k×k conv whole input
        channels, a Gather and a k×k conv on them added to the chain) or ``"unstructured"`` (stored as a
        sparse initializer, which onnxruntime densifies: the layer runs dense, and the file is larger
        than low rank alone at equal params, since every entry carries its index).
    target_params / target_macs: the whole model's params / MACs after ÷ before, in (0, 1];
        target_latency: the wanted speedup over the original in onnxruntime (> 1, measured at
        `latency_batch` and `latency_threads`); max_error: the largest relative output error.
        At most one; with one, every layer's kind and rank come from a global allocation
        (least predicted output error for the budget, or least params for `max_error`) and
        `keep` / `energy` apply only to layer overrides.
    sensitivity: weight each layer's predicted error by how much of it reaches the model's
        outputs, measured in onnxruntime by compressing that layer alone (needs calibration).
    evbmf: if set, each layer's rank comes from EVBMF (MUSCO) weakened by this factor in
        [0, 1]: r = R − evbmf·(R − r_EVBMF) (0 keeps the full rank R, 1 is plain EVBMF),
        still capped by the `keep` budget.
    layer_latency: measure each factorized layer in onnxruntime (dense, as written and, with a
        residual, its chain alone) at `latency_batch` and `latency_threads` for the report.
        With ``sparse_share="auto"`` the shares whose residual would add more than
        `residual_latency_limit` to the chain's time are not tried (chain and residual timed
        interleaved, the median ratio of several blocks); a layer whose plain chain runs in
        under `residual_min_chain_ms` gets none (the few µs of the extra nodes cannot pay), and
        the written model is checked against its L-only twin (`CheckResidualModelPass`): the
        residuals of the layers with the largest held-out gains are kept only as far as they
        lower the model's held-out output error, and only while the model stays within
        `residual_model_tolerance` of the L-only model's latency.
    joint: decompose groups of same-shaped layers in the same role jointly with a shared factor
        (one of `JOINT`; JMD), at the parameters their separate plans would use. Groups are
        found automatically (same op, weight shape and attributes, and the same name once
        digits are ignored: the query projection of every transformer layer) unless
        `joint_groups` lists glob patterns, one group per pattern. Independent mode only.
    stages: compress in this many stages (MUSCO), each cutting further and refitting on the
        current compressed model; the target or keep is reached at the last stage.
    metric_command / max_metric_drop: a task metric as the target: the smallest params ratio
        whose model scores at most `max_metric_drop` below the original (`compress`'s `metric`
        callable, or this shell command with ``{model}`` replaced by the candidate's path, its
        last output line the score; `onnx_lrsd.runtime.command_metric`).
    best_effort: a latency, error or metric target that no round reaches is an error (with the
        nearest model's numbers) unless this is set; then that nearest model is returned.
    recover, recover_time: after compressing, fine-tune the compressed model against the
        original on the calibration batches the fits use (`onnx_lrsd.recover`, end-to-end
        distillation): "auto" or a number of Adam steps, and/or a time budget in seconds; with
        `stages`, after every stage against the original, the budget split evenly.
    recover_level, recover_block_size, recover_warmup, recover_step_scale: the recovery's level
        (`RECOVER_LEVELS`), block size, step-size warm-up and step scale (`RECOVER_STEP_SCALES`;
        `onnx_lrsd.recover.RecoverConfig` level, block_size, warmup, step_scale); its gradient
        shards run on the run's executor.
    then_quantize: quantize the compressed model to int8 with onnxruntime's quantizer as the
        last step (one of `onnx_lrsd.runtime.quantize.QUANTIZE_MODES`; ``static`` calibrates on the
        same calibration batches). Targets apply to the low-rank model; the report gives the
        output errors before and after quantization.
    blas_threads: BLAS threads of the numpy/scipy fits (None: the library's default). One is
        the default because OpenBLAS threads that wait by spinning slow a busy 2-core machine
        by an order of magnitude (PP-OCR data-free: 58 s with 2 threads under load, 3.4 s with 1).
    svd_solver: how truncated SVDs are computed (`onnx_lrsd.decompose.svd`): "auto" (the
        leading eigenvectors of the small side's Gram for large matrices, LAPACK's SVD for
        small or badly conditioned ones), "exact" (LAPACK's full SVD, the older path) or "gram".
    max_output_error: a compressed model whose verified relative output error exceeds this is
        not written (`OutputErrorTooLarge`, exit 4) unless `accept_error`; None never refuses.
    accept_error: write the model even when its verified output error exceeds `max_output_error`.
    executor: where calibration shards, per-layer fits, error curves, sensitivity probes,
        latency microbenchmarks and recovery's gradient shards run (`onnx_lrsd.parallel.executor`): "local" (this process, or a process
        pool of `workers` > 1) or "ray" (the cluster at `ray_address`, else a local Ray).
        The result does not depend on it (up to float rounding of summed statistics).
    """

    keep: float = option(0.5, "Fraction of each layer's parameters kept, in (0, 1].")
    energy: Optional[float] = option(
        None, "Keep the smallest rank holding this share of the squared singular values (capped by --keep).")
    method: str = option("auto", "Factorization kind (auto: fewest MACs at the layer's budget); prune: remove "
                                 "whole channels, FFN neurons and attention heads (needs --calib); prune+lowrank: "
                                 "widths and low-rank factors chosen in one allocation for the target (needs --calib).",
                         choices=RUN_METHODS)
    width_criterion: str = option("greedy", "--method prune(+lowrank): channels kept by greedy reconstruction of the next "
                                            "layer's output, a Nyström column subset, or activation energy.",
                                  choices=WIDTH_CRITERIA)
    overrides: Tuple[LayerOverride, ...] = ()
    conv_rank_multiple: int = 16
    min_rank: int = 8
    min_layer_share: float = 0.01
    verify: bool = option(True, "Compare outputs with the original in onnxruntime.")
    verify_batch: int = 1
    dims: Tuple[Tuple[str, int], ...] = option((), "Value of a symbolic input dim.", commands=BOTH, flag="--dim",
                                               metavar="NAME=VALUE", parse=parse_dim, multiple=True)
    seed: int = option(0, "Seed of every random choice.")
    external_data: bool = option(False, "Save weights to OUTPUT.data.")
    map_weights_above_mb: float = 1024.0
    blas_threads: Optional[int] = 1
    svd_solver: str = option("auto", "Truncated SVD: auto (Gram eigenvectors of the small side for large layers), "
                                     "exact (LAPACK's full SVD) or gram.", choices=SVD_SOLVERS)
    max_output_error: Optional[float] = option(
        0.5, "Refuse to write a model whose verified relative output error exceeds E.", metavar="E")
    accept_error: bool = option(False, "Write the model even when its output error exceeds --max-output-error.")
    mode: str = option("independent", "Fit each layer on original inputs, or on the compressed network's inputs "
                                      "in dependency order.", choices=MODES)
    sequential_stages: int = 12
    ridge: float = option(1e-3, "Relative ridge of the whitening.")
    lookup_ridge: float = option(
        0.1, "Relative ridge of an embedding table's fit (Gather): each token weighs its calibration count plus "
             "this times the mean count, so tokens calibration never saw are kept.")
    bias_correction: bool = option(True, "Restore each layer's mean output.")
    fuse_elementwise: bool = option(True, "Write hard swishes spelled out in elementwise ops as one op and fold "
                                          "constant scales and shifts into the neighbouring convs: the same "
                                          "function in fewer kernels.")
    mask_input: Optional[str] = option(None, "Input whose zeros mark padding positions (dropped from the "
                                             "statistics).", commands=BOTH, metavar="NAME")
    calib_samples: Optional[int] = option(None, "Use at most N calibration samples.", commands=BOTH, minimum=1)
    calib_batch: int = option(16, "Samples per onnxruntime run.", commands=BOTH, minimum=1)
    conv_positions: int = 4096
    holdout_every: int = 5
    stats_memory_mb: int = 4096
    sparse_share: Union[float, str] = option(
        0.0, "Share of each layer's parameter budget given to a sparse residual (W ≈ L + S); 'auto' picks it per "
             "layer by held-out error.", metavar="FLOAT|auto", parse=parse_sparse_share)
    sparse_structure: str = option("rows", "Residual of whole input rows (runs fast), or unstructured entries "
                                           "(accuracy at equal params; runs dense, larger file).",
                                   choices=SPARSE_STRUCTURES)
    target_params: Optional[float] = option(
        None, "Global allocation: the whole model keeps this fraction of its parameters.", metavar="R")
    target_macs: Optional[float] = option(
        None, "Global allocation: the whole model keeps this fraction of its MACs.", metavar="R")
    target_latency: Optional[float] = option(
        None, "Global allocation: this speedup over the original, measured in onnxruntime.", metavar="S")
    max_error: Optional[float] = option(
        None, "Global allocation: fewest parameters with relative output error at most E.", metavar="E")
    latency_batch: int = option(1, "Batch at which latency is measured (--target-latency, sweep points).",
                                commands=BOTH, minimum=1)
    latency_threads: int = option(2, "onnxruntime threads for latency measurements and sensitivity probes.",
                                  commands=BOTH, minimum=1)
    sensitivity: bool = option(True, "Weight layer errors by their measured effect on the outputs "
                                     "(global allocation).")
    evbmf: Optional[float] = option(None, "Ranks from EVBMF weakened by W in [0, 1] (1: plain EVBMF), capped by "
                                          "--keep.", metavar="W")
    stages: int = option(1, "Compress in N stages, each refitting on the previous stage's model (MUSCO).",
                         minimum=1)
    layer_latency: bool = option(False, "Time every factorized layer in onnxruntime (dense, as written) for the "
                                        "report.")
    joint: str = option("off", "Decompose repeated layers jointly with a shared input-side (l), output-side (r) or "
                               "both (b) factors; auto picks per group, or keeps separate fits.",
                        choices=JOINT, aliases=JOINT_SHORT)
    joint_groups: Tuple[str, ...] = ()
    residual_latency_limit: float = 0.25
    residual_min_chain_ms: float = 0.05
    residual_min_gain: float = 0.01
    residual_model_tolerance: float = 0.03
    metric_command: Optional[str] = option(
        None, "Search the smallest model whose score stays within --max-drop of the original's: a shell command "
              "with {model} where the candidate's path goes, printing the score (higher is better) as its last "
              "line. Score on data you do not report on.", flag="--metric", metavar="CMD")
    max_metric_drop: Optional[float] = option(
        None, "With --metric (or a metric in Python): the largest drop of the score below the original's.",
        flag="--max-drop", metavar="D")
    best_effort: bool = option(False, "When a latency, error or metric target is unreachable, write the model "
                                      "nearest to it (with a warning) instead of failing.")
    recover: Optional[Union[int, str]] = option(
        None, "Then fine-tune the compressed model to reproduce the original on the calibration data "
              "(distillation with onnxruntime gradients): 'auto' or a number of steps; with --stages, after every "
              "stage (MUSCO).", metavar="[auto|STEPS]", parse=parse_recover, flag_value="auto")
    recover_time: Optional[float] = option(None, "Time budget of the recovery (all stages), e.g. 10m, 600s, 1h.",
                                           metavar="DURATION", parse=parse_duration)
    recover_level: str = option(RECOVER_LEVEL, "Recovery: end-to-end distillation on the output, block-wise "
                                               "reconstruction, or blocks on half the budget then end-to-end.",
                                choices=RECOVER_LEVELS)
    recover_block_size: int = option(RECOVER_BLOCK_SIZE, "Block-wise recovery: nodes reading trained weights per "
                                                         "block.", minimum=1)
    recover_warmup: int = option(RECOVER_WARMUP, "Recovery: steps over which Adam's step size rises linearly to "
                                                 "its value.", minimum=0)
    recover_step_scale: str = option(RECOVER_STEP_SCALE, "Recovery: Adam moves every weight by about the step size "
                                                         "(absolute) or by the step size times its tensor's RMS "
                                                         "(relative).", choices=RECOVER_STEP_SCALES)
    then_quantize: Optional[str] = option(
        None, "Quantize the compressed model to int8 with onnxruntime's quantizer: dynamic (all ops), "
              "dynamic-matmul (MatMul only) or static (QDQ, calibrated on --calib).", choices=QUANTIZE_MODES)
    executor: str = option("local", "Where calibration shards, per-layer work and recovery's gradient shards "
                                    "run: this machine or a Ray cluster.", commands=EXECUTION, choices=EXECUTORS)
    workers: int = option(1, "Local executor: processes (1: this process).", commands=EXECUTION, minimum=1)
    ray_address: Optional[str] = option(None, "Ray executor: the cluster to join (host:port, auto, ray://...); "
                                              "default: a local Ray.", commands=EXECUTION, metavar="ADDR")

    @property
    def recovers(self) -> bool:
        """Whether recovery follows compression (`recover` or `recover_time` given)."""
        return self.recover is not None or self.recover_time is not None

    @property
    def target(self) -> Optional[Tuple[str, float]]:
        """The global target as (kind, value), kind one of `TARGETS`, or None."""
        chosen = [(kind, getattr(self, field)) for kind, field in TARGETS.items() if getattr(self, field) is not None]
        return chosen[0] if chosen else None

    def __post_init__(self) -> None:
        check_keep(self.keep, "keep")
        if self.energy is not None:
            check_energy(self.energy, "energy")
        if self.method not in RUN_METHODS:
            raise UsageError(f"unknown method {self.method!r} (choose from {', '.join(RUN_METHODS)})")
        if self.width_criterion not in WIDTH_CRITERIA:
            raise UsageError(f"unknown width criterion {self.width_criterion!r} (choose from {', '.join(WIDTH_CRITERIA)})")
        if not isinstance(self.min_rank, int) or self.min_rank < 1:
            raise UsageError(f"min_rank must be a positive integer, got {self.min_rank!r}")
        if not isinstance(self.min_layer_share, (int, float)) or not 0 <= self.min_layer_share < 1:
            raise UsageError(f"min_layer_share must be in [0, 1), got {self.min_layer_share!r}")
        if self.conv_rank_multiple < 1:
            raise UsageError(f"conv_rank_multiple must be >= 1, got {self.conv_rank_multiple}")
        if self.verify_batch < 1:
            raise UsageError(f"verify_batch must be >= 1, got {self.verify_batch}")
        for override in self.overrides:
            override.validate()
        if self.blas_threads is not None and (not isinstance(self.blas_threads, int) or self.blas_threads < 1):
            raise UsageError(f"blas_threads must be a positive integer, got {self.blas_threads!r}")
        if self.svd_solver not in SVD_SOLVERS:
            raise UsageError(f"unknown svd_solver {self.svd_solver!r} (choose from {', '.join(SVD_SOLVERS)})")
        if self.max_output_error is not None and (isinstance(self.max_output_error, bool) or not isinstance(
                self.max_output_error, (int, float)) or not self.max_output_error > 0):
            raise UsageError(f"max_output_error must be > 0, got {self.max_output_error!r}")
        if self.mode not in MODES:
            raise UsageError(f"unknown mode {self.mode!r} (choose from {', '.join(MODES)})")
        for name in ("ridge", "lookup_ridge"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise UsageError(f"{name} must be >= 0, got {value!r}")
        for name in ("calib_batch", "conv_positions", "stats_memory_mb", "sequential_stages"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UsageError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.calib_samples is not None and (not isinstance(self.calib_samples, int) or self.calib_samples < 1):
            raise UsageError(f"calib_samples must be a positive integer, got {self.calib_samples!r}")
        if not isinstance(self.holdout_every, int) or self.holdout_every < 0 or self.holdout_every == 1:
            raise UsageError(f"holdout_every must be 0 (none) or >= 2, got {self.holdout_every!r}")
        check_sparse_share(self.sparse_share)
        check_executor(self.executor, self.workers, self.ray_address)
        if self.sparse_structure not in SPARSE_STRUCTURES:
            raise UsageError(f"unknown sparse_structure {self.sparse_structure!r} "
                            f"(choose from {', '.join(SPARSE_STRUCTURES)})")
        self._check_targets()
        for name, size in self.dims:
            if not isinstance(size, int) or size < 1:
                raise UsageError(f"dim {name} must be a positive integer, got {size!r}")

    def _check_targets(self) -> None:
        chosen = [field for field in TARGETS.values() if getattr(self, field) is not None]
        if len(chosen) > 1:
            raise UsageError(f"choose one target, got {' and '.join(chosen)}")
        for field in ("target_params", "target_macs"):
            value = getattr(self, field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 < value <= 1):
                raise UsageError(f"{field} must be in (0, 1], got {value!r}")
        if self.target_latency is not None and (isinstance(self.target_latency, bool) or
                                                not isinstance(self.target_latency, (int, float))
                                                or not self.target_latency > 1):
            raise UsageError(f"target_latency is a speedup and must be > 1, got {self.target_latency!r}")
        if self.max_error is not None and (isinstance(self.max_error, bool) or not isinstance(self.max_error, (int, float))
                                           or not self.max_error > 0):
            raise UsageError(f"max_error must be > 0, got {self.max_error!r}")
        for name in ("latency_batch", "latency_threads", "stages"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UsageError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not (isinstance(self.residual_latency_limit, (int, float)) and self.residual_latency_limit >= 0):
            raise UsageError(f"residual_latency_limit must be >= 0, got {self.residual_latency_limit!r}")
        for name in ("residual_min_chain_ms", "residual_model_tolerance", "residual_min_gain"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < (
                    1 if name == "residual_min_gain" else float("inf")):
                raise UsageError(f"{name} must be >= 0{' and < 1' if name == 'residual_min_gain' else ''}, got {value!r}")
        if self.joint not in JOINT:
            raise UsageError(f"unknown joint {self.joint!r} (choose from {', '.join(JOINT)})")
        if self.joint != "off" and self.mode != "independent":
            raise UsageError("joint decomposition works with mode independent")
        if self.joint != "off" and self.target_latency is not None:
            raise UsageError("joint decomposition works with keep, params, MACs and error targets, not latency")
        if self.joint == "both" and self.target is not None:
            raise UsageError("joint 'both' works with keep; with a target use left, right or auto")
        if self.recover is not None and self.recover != "auto" and (
                isinstance(self.recover, bool) or not isinstance(self.recover, int) or self.recover < 0):
            raise UsageError(f"recover must be 'auto' or a number of steps >= 0, got {self.recover!r}")
        if self.recover_time is not None and not (isinstance(self.recover_time, (int, float)) and self.recover_time > 0):
            raise UsageError(f"recover_time must be > 0 seconds, got {self.recover_time!r}")
        if self.recover_level not in RECOVER_LEVELS:
            raise UsageError(f"unknown recover_level {self.recover_level!r} (choose from {', '.join(RECOVER_LEVELS)})")
        if self.recover_step_scale not in RECOVER_STEP_SCALES:
            raise UsageError(f"unknown recover_step_scale {self.recover_step_scale!r} (choose from "
                             f"{', '.join(RECOVER_STEP_SCALES)})")
        for name, least in (("recover_block_size", 1), ("recover_warmup", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise UsageError(f"{name} must be an integer >= {least}, got {value!r}")
        if self.then_quantize is not None and self.then_quantize not in QUANTIZE_MODES:
            raise UsageError(f"unknown then_quantize {self.then_quantize!r} (choose from {', '.join(QUANTIZE_MODES)})")
        if self.metric_command is not None and (not isinstance(self.metric_command, str)
                                                or METRIC_PLACEHOLDER not in self.metric_command):
            raise UsageError(f"the metric command must contain {METRIC_PLACEHOLDER} (where the candidate model's "
                            f"path goes), got {self.metric_command!r}")
        if self.max_metric_drop is not None and (isinstance(self.max_metric_drop, bool) or not isinstance(
                self.max_metric_drop, (int, float)) or not self.max_metric_drop >= 0):
            raise UsageError(f"max_metric_drop must be >= 0, got {self.max_metric_drop!r}")
        if self.metric_command is not None and self.max_metric_drop is None:
            raise UsageError("a metric command needs max_metric_drop (--max-drop)")
        if self.evbmf is not None and (isinstance(self.evbmf, bool) or not isinstance(self.evbmf, (int, float))
                                       or not 0 <= self.evbmf <= 1):
            raise UsageError(f"evbmf (the weakening factor) must be in [0, 1], got {self.evbmf!r}")

    def override_for(self, name: str) -> Optional[LayerOverride]:
        return next((o for o in self.overrides if o.matches(name)), None)

    def unmatched_overrides(self, names) -> list:
        """Overrides that match none of `names` (a misspelt layer name is an error)."""
        names = list(names)
        return [o for o in self.overrides if not any(o.matches(n) for n in names)]

    def replace(self, **changes) -> "CompressConfig":
        return dataclasses.replace(self, **changes)


def check_keep(keep, where: str) -> None:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise UsageError(f"{where} must be in (0, 1], got {keep!r}")


def check_sparse_share(share) -> None:
    if share == AUTO_SHARE:
        return
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share < 1:
        raise UsageError(f"sparse_share must be in [0, 1) or 'auto', got {share!r}")


def check_executor(executor, workers, ray_address) -> None:
    if executor not in EXECUTORS:
        raise UsageError(f"unknown executor {executor!r} (choose from {', '.join(EXECUTORS)})")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UsageError(f"workers must be a positive integer, got {workers!r}")
    if ray_address is not None and (executor != "ray" or not isinstance(ray_address, str) or not ray_address):
        raise UsageError("ray_address needs executor 'ray' and a non-empty address")


def check_energy(energy, where: str) -> None:
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1:
        raise UsageError(f"{where}: energy must be in (0, 1], got {energy!r}")


_FILE_KEYS = {f.name for f in dataclasses.fields(CompressConfig)} - {"overrides"} | {"layers"}
_OVERRIDE_KEYS = {f.name for f in dataclasses.fields(LayerOverride)} - {"pattern"}


def load_config_file(path: Union[str, Path], base: Optional[CompressConfig] = None) -> CompressConfig:
    """Read a JSON or YAML config: top-level `CompressConfig` fields plus
    ``layers: {name-or-glob: {keep|energy|rank|method|skip: ...}}``."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # parse errors of either format
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"config file {path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {first_line}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {path}: top level must be a mapping")
    unknown = set(data) - _FILE_KEYS
    if unknown:
        raise UsageError(f"config file {path}: unknown keys {sorted(unknown)} (allowed: {sorted(_FILE_KEYS)})")
    layers = data.pop("layers", {}) or {}
    if not isinstance(layers, dict):
        raise UsageError(f"config file {path}: 'layers' must map layer names or globs to settings")
    overrides = []
    for pattern, settings in layers.items():
        if not isinstance(settings, dict):
            raise UsageError(f"config file {path}: settings of layer '{pattern}' must be a mapping")
        bad = set(settings) - _OVERRIDE_KEYS
        if bad:
            raise UsageError(f"config file {path}: layer '{pattern}' has unknown keys {sorted(bad)} (allowed: {sorted(_OVERRIDE_KEYS)})")
        overrides.append(LayerOverride(pattern=str(pattern), **settings))
    if "dims" in data:
        dims = data["dims"]
        if not isinstance(dims, dict):
            raise UsageError(f"config file {path}: 'dims' must map dimension names to sizes")
        data["dims"] = tuple(sorted((str(k), v) for k, v in dims.items()))
    base = base or CompressConfig()
    try:
        return dataclasses.replace(base, overrides=tuple(overrides) + base.overrides, **data)
    except TypeError as exc:
        raise UsageError(f"config file {path}: {exc}") from None
