"""What latency measurements share: inputs at the deployment batch and each layer's input shape."""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np

from ..runtime.activations import ActivationRunner
from ..runtime.feeds import random_feeds

from .context import PassContext


def deployment_feed(ctx: PassContext) -> Dict[str, np.ndarray]:
    """Inputs at `latency_batch`: the first calibration batch cut or cycled along axis 0
    (taken as the batch axis), else seeded random inputs."""
    batch = ctx.config.latency_batch
    if not ctx.calibration:
        return random_feeds(ctx.source, batch=batch, dims=dict(ctx.config.dims), seed=ctx.config.seed)
    first = ctx.calibration[0]
    return {k: np.asarray(v)[np.arange(batch) % len(v)] for k, v in first.items()}


def input_shapes(ctx: PassContext, names: List[str], feed) -> Dict[str, Tuple[int, ...]]:
    tensors = sorted({ctx.targets[n].activation for n in names})
    values = ActivationRunner(ctx.source, tensors).run(feed)
    return {n: tuple(int(d) for d in values[ctx.targets[n].activation].shape) for n in names}
