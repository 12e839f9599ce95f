"""`recover` and `recover_file`: the recovery step on model files, paths or ModelProtos."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

from ..errors import LrsdError
from .blockwise import recover_at_level
from .distill import RecoveryResult
from .types import RecoverConfig, RecoverProgress

log = logging.getLogger(__name__)


def recover(model, teacher, calibration, config: Optional[RecoverConfig] = None,
            on_step: Optional[Callable[[RecoverProgress], None]] = None, **options) -> RecoveryResult:
    """Fine-tune the compressed `model` to reproduce `teacher` (the original) on unlabeled
    `calibration` data (any source `onnx_lrsd.api.calibration_batches` takes: .npz paths,
    feed dicts, a reader); neither model is modified. `options` are `RecoverConfig` fields
    applied on top of `config`."""
    from ..config import CompressConfig
    from ..model.io import load_model
    from ..runtime.calibrate import RANDOM, calibration_batches

    config = (config or RecoverConfig()).replace(**options) if options else (config or RecoverConfig())
    student, original = load_model(model), load_model(teacher)
    names = lambda values: [v.name for v in values]  # noqa: E731
    init_names = {t.name for t in original.graph.initializer}
    if [n for n in names(student.graph.input) if n not in {t.name for t in student.graph.initializer}] != \
            [n for n in names(original.graph.input) if n not in init_names]:
        raise LrsdError("the compressed model and the teacher have different inputs")
    if names(student.graph.output) != names(original.graph.output):
        raise LrsdError("the compressed model and the teacher have different outputs")
    given = [calibration] if isinstance(calibration, (str, os.PathLike)) else calibration
    if calibration is None or (isinstance(given, (list, tuple)) and any(str(c) == RANDOM for c in given)):
        raise LrsdError("recovery needs real unlabeled inputs (--calib DATA), not random ones")
    if isinstance(calibration, (list, tuple)) and calibration and all(isinstance(c, Mapping) for c in calibration):
        batches = list(calibration)  # feed dicts as given (token batches may differ in length)
        if config.samples is not None:
            batches = _first_samples(batches, config.samples)
    else:
        batches = calibration_batches(calibration, original, CompressConfig(
            calib_samples=config.samples, calib_batch=config.batch, verify=False, seed=config.seed))
    return recover_at_level(student, original, batches, config, on_step)


def _first_samples(batches, n: int):
    out, total = [], 0
    for batch in batches:
        rows = len(next(iter(batch.values())))
        if total + rows > n:
            batch = {k: v[:n - total] for k, v in batch.items()}
            rows = n - total
        if rows:
            out.append(batch)
        total += rows
        if total >= n:
            break
    return out


def recover_file(model, teacher, output: Union[str, os.PathLike], calibration, config: Optional[RecoverConfig] = None,
                 on_step: Optional[Callable[[RecoverProgress], None]] = None, **options) -> RecoveryResult:
    """`recover`, then save the recovered model to `output` atomically (nothing is written if
    recovery fails or is interrupted)."""
    from ..model.io import check_output_directory, save_model

    check_output_directory(Path(output))
    result = recover(model, teacher, calibration, config, on_step, **options)
    save_model(result.model, output)
    return result
