"""A task metric computed by the user's own command (``compress --metric 'CMD {model}'``).

The candidate model is written to a temporary directory, ``{model}`` in the command is replaced
by its (shell-quoted) path, the command runs in a shell in the current directory, and the last
non-empty line of its standard output is the score (higher is better). A command that exits
non-zero, or whose last line is not a number, is a one-line `LrsdError`. The command should
score on data that is not the data its user reports on: the search picks the model by this
score, so the score of the picked model is optimistic on the data it was searched on.
"""
from __future__ import annotations

import logging
import math
import shlex
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx

from ..config import METRIC_PLACEHOLDER as PLACEHOLDER
from ..errors import LrsdError
from ..model.io import save_model

log = logging.getLogger(__name__)


def check_metric_command(command: str) -> None:
    """LrsdError unless `command` is a non-empty command containing `PLACEHOLDER`."""
    if not command.strip() or PLACEHOLDER not in command:
        raise LrsdError(f"the metric command must contain {PLACEHOLDER} (where the candidate model's path goes), "
                        f"got {command!r}")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@dataclass(frozen=True)
class CommandMetric:
    """`compress`'s `metric` callable running `command` on each candidate model."""

    command: str

    def __post_init__(self) -> None:
        check_metric_command(self.command)

    def __call__(self, model: onnx.ModelProto) -> float:
        with tempfile.TemporaryDirectory(prefix="onnx_lrsd-metric-") as tmp:
            path = Path(tmp) / "candidate.onnx"
            save_model(model, path)
            command = self.command.replace(PLACEHOLDER, shlex.quote(str(path)))
            try:
                done = subprocess.run(command, shell=True, capture_output=True, text=True)
            except OSError as exc:
                raise LrsdError(f"metric command could not run: {exc}") from None
        if done.returncode != 0:
            detail = _last_line(done.stderr) or _last_line(done.stdout) or "no output"
            raise LrsdError(f"metric command failed (exit {done.returncode}): {detail}")
        line = _last_line(done.stdout)
        try:
            score = float(line)
        except ValueError:
            raise LrsdError(f"metric command's last output line is not a number: {line[:80]!r}") from None
        if not math.isfinite(score):
            raise LrsdError(f"metric command's score is not finite: {line[:80]!r}")
        log.info("metric command: %.6g", score)
        return score
