"""What latency measurements share: inputs at the deployment batch and each layer's input shape."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
import onnx

from ..model.layers import LayerTarget
from .activations import ActivationRunner, Feeds
from .feeds import random_feeds


def deployment_feed(source: onnx.ModelProto, calibration: List[Feeds], config) -> Dict[str, np.ndarray]:
    """Inputs at `config.latency_batch`: the first calibration batch cut or cycled along axis 0
    (taken as the batch axis), else seeded random inputs (`config.dims`, `config.seed`)."""
    batch = config.latency_batch
    if not calibration:
        return random_feeds(source, batch=batch, dims=dict(config.dims), seed=config.seed)
    first = calibration[0]
    return {k: np.asarray(v)[np.arange(batch) % len(v)] for k, v in first.items()}


def input_shapes(source: onnx.ModelProto, targets: Sequence[LayerTarget], feed) -> Dict[str, Tuple[int, ...]]:
    """Each target's input shape (by name) when `source` runs on `feed`."""
    tensors = sorted({t.activation for t in targets})
    values = ActivationRunner(source, tensors).run(feed)
    return {t.name: tuple(int(d) for d in values[t.activation].shape) for t in targets}
