"""Options and progress of recovery (typed, frozen); its report is `report.types.RecoveryReport`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from ..config import (EXECUTORS, RECOVER_BLOCK_SIZE, RECOVER_LEVEL, RECOVER_LEVELS, RECOVER_STEP_SCALE,
                      RECOVER_STEP_SCALES, RECOVER_WARMUP, check_executor)
from ..errors import LrsdError
from ..report.types import LeftAsFitted, RecoveryReport  # noqa: F401  (reports live in report/)

LOSS_CHOICES = ("auto", "kl", "mse")
AUGMENT_CHOICES = ("auto", "none", "image", "tokens", "noise")
TRAINABLE_CHOICES = ("compressed", "all")
SCHEDULE_CHOICES = ("cosine", "constant")
LEVEL_CHOICES = RECOVER_LEVELS
STEP_SCALE_CHOICES = RECOVER_STEP_SCALES
DEFAULT_STEPS = 200
"""Steps when neither `steps` nor `time_budget` is given ("auto")."""
MIN_EVALS = 10
"""Held-out evaluations before `patience` may stop a run (`RecoverConfig.min_evals`). The held-out
loss often rises over the first tens of Adam steps before it falls below its start: on the digit
CNN at keep 0.05 (lr 1e-3, evaluated every 10 steps) `patience=5` from the first evaluation kept
nothing in 2 of 3 seeds, waiting for 10 evaluations kept 0.65 of the start loss in all 3
(`python -m benchmarks recovery_step`)."""


@dataclass(frozen=True)
class RecoverConfig:
    """How to fine-tune the compressed model (student) against the original (teacher).

    steps / time_budget: the budget (either or both; neither: `DEFAULT_STEPS`).
    batch: samples per Adam step (the adjoint is built for this static batch).
    lr, beta1, beta2: Adam's step size and moment decays.
    schedule: "cosine" decays the step size as lr·½(1 + cos πt), t the spent share of the budget
      (steps or time, whichever is further), or "constant".
    warmup: the step size of step k (k = 1, 2, ...) is multiplied by min(1, k / warmup), so it
      rises linearly over the first `warmup` steps (0: none); each block of block-wise
      reconstruction warms up anew (its steps are the budget's share of the block).
    step_scale: "absolute" (plain Adam: each weight moves by about lr_t per step) or "relative"
      (each tensor's step is multiplied by s_θ = max(RMS(θ₀), f·mean RMS), its RMS when the
      run or block starts, floored by a share f of the mean over the trained tensors, so lr is
      a step relative to the weight's scale: `distill.step_scales`).
    loss: "kl" on probability or logit outputs, "mse" (scaled by the teacher's mean square)
      otherwise; "auto" picks from the teacher's output on the data.
    augment: "image" (contrast, brightness, noise, blur, scale), "tokens" (token dropout to
      `unk_id`), "noise", "none", or "auto" from the input's kind.
    trainable: "compressed" (factors, residual values on their support, biases of compressed
      layers) or "all" float weights.
    holdout: fraction of the samples held out for early stopping and for keeping the best step.
    eval_every: steps between held-out evaluations; patience: evaluations without improvement
      before stopping (None: never stop early); min_evals: evaluations before patience may stop
      the run (`MIN_EVALS`: the held-out loss often rises over the first steps before it falls).
    samples: use at most this many calibration samples (None: all the source gives).
    level: "end-to-end" distillation on the model output, "blocks" (block-wise reconstruction,
      `recover.blockwise`), or "blocks+end-to-end" (blocks on half the budget, then end-to-end);
      block_size: nodes reading trainable weights per block.
    executor, workers, ray_address: where the gradient shards run (`onnx_lrsd.parallel.executor`,
      as `CompressConfig` has them); shards: a batch's gradient is the sample-weighted sum of
      this many shards' gradients (contiguous, near-equal runs of the batch), each one executor
      task, summed in shard order in float64 (None: one per executor slot). The model depends
      on `shards`, not on where they run: the same shards in this process, on a process pool or
      on Ray give the same bytes.
    """

    steps: Optional[int] = None
    time_budget: Optional[float] = None
    batch: int = 8
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    schedule: str = "cosine"
    loss: str = "auto"
    augment: str = "auto"
    trainable: str = "compressed"
    holdout: float = 0.2
    eval_every: int = 10
    patience: Optional[int] = 5
    min_evals: int = MIN_EVALS
    output: Optional[str] = None
    mask_input: Optional[str] = None
    unk_id: int = 100
    samples: Optional[int] = None
    seed: int = 0
    threads: int = 2
    level: str = RECOVER_LEVEL
    block_size: int = RECOVER_BLOCK_SIZE
    warmup: int = RECOVER_WARMUP
    step_scale: str = RECOVER_STEP_SCALE
    shards: Optional[int] = None
    executor: str = EXECUTORS[0]
    workers: int = 1
    ray_address: Optional[str] = None

    def __post_init__(self):
        checks = [
            (self.steps is None or (isinstance(self.steps, int) and self.steps >= 0),
             f"steps must be >= 0, got {self.steps!r}"),
            (self.time_budget is None or self.time_budget > 0,
             f"time_budget must be > 0 seconds, got {self.time_budget!r}"),
            (isinstance(self.batch, int) and self.batch >= 1, f"batch must be >= 1, got {self.batch!r}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr!r}"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)"),
            (self.schedule in SCHEDULE_CHOICES,
             f"schedule must be one of {', '.join(SCHEDULE_CHOICES)}, got {self.schedule!r}"),
            (self.loss in LOSS_CHOICES, f"loss must be one of {', '.join(LOSS_CHOICES)}, got {self.loss!r}"),
            (self.augment in AUGMENT_CHOICES,
             f"augment must be one of {', '.join(AUGMENT_CHOICES)}, got {self.augment!r}"),
            (self.trainable in TRAINABLE_CHOICES,
             f"trainable must be one of {', '.join(TRAINABLE_CHOICES)}, got {self.trainable!r}"),
            (0 < self.holdout < 1, f"holdout must be in (0, 1), got {self.holdout!r}"),
            (isinstance(self.eval_every, int) and self.eval_every >= 1,
             f"eval_every must be >= 1, got {self.eval_every!r}"),
            (self.patience is None or self.patience >= 1, f"patience must be >= 1, got {self.patience!r}"),
            (isinstance(self.min_evals, int) and not isinstance(self.min_evals, bool) and self.min_evals >= 0,
             f"min_evals must be >= 0, got {self.min_evals!r}"),
            (self.samples is None or self.samples >= 2, f"samples must be >= 2, got {self.samples!r}"),
            (isinstance(self.threads, int) and self.threads >= 1, f"threads must be >= 1, got {self.threads!r}"),
            (self.level in LEVEL_CHOICES, f"level must be one of {', '.join(LEVEL_CHOICES)}, got {self.level!r}"),
            (isinstance(self.block_size, int) and self.block_size >= 1,
             f"block_size must be >= 1, got {self.block_size!r}"),
            (isinstance(self.warmup, int) and not isinstance(self.warmup, bool) and self.warmup >= 0,
             f"warmup must be >= 0 steps, got {self.warmup!r}"),
            (self.step_scale in STEP_SCALE_CHOICES,
             f"step_scale must be one of {', '.join(STEP_SCALE_CHOICES)}, got {self.step_scale!r}"),
            (self.shards is None or (isinstance(self.shards, int) and self.shards >= 1),
             f"shards must be >= 1, got {self.shards!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise LrsdError(message)
        check_executor(self.executor, self.workers, self.ray_address)

    @property
    def step_budget(self) -> Optional[int]:
        """Steps to run at most (None: only the time budget bounds them)."""
        if self.steps is None and self.time_budget is None:
            return DEFAULT_STEPS
        return self.steps

    def replace(self, **changes) -> "RecoverConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class RecoverProgress:
    """What the progress callback sees after each step."""

    step: int
    total: Optional[int]
    seconds: float
    time_budget: Optional[float]
    train_loss: float
    heldout_loss: Optional[float]
    best_heldout_loss: Optional[float]
