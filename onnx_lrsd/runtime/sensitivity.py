"""Layer sensitivities measured in onnxruntime: how much of a layer's reconstruction error
reaches the model's outputs, probed by compressing that layer alone (`probe_layer`, one
executor task per layer: `onnx_lrsd.parallel.tasks.sensitivity_probes`)."""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..model.layers import LayerTarget
from ..plan.candidates import LayerCandidate
from ..plan.factorize import factorize_data_aware, layer_ridge
from ..plan.rank_select import LayerPlan
from .activations import Feeds
from .calibrate import split_holdout
from .session import make_session, rewritten_session, run_outputs

PROBE_BATCHES = 2
"""Calibration batches (held-out ones first) run per sensitivity probe."""

TINY = 1e-12

PROBE_ERRORS = (0.1, 0.4)
"""Reconstruction errors at which a layer's sensitivity is read: above float32 noise at the
outputs, and far enough apart to see how fast the damage grows (softmax attention, CTC
decoding and ReLUs make it grow faster than e² at large errors)."""


def probe_candidates(candidates: Sequence[LayerCandidate]) -> List[LayerCandidate]:
    """The candidates whose errors are nearest `PROBE_ERRORS` on a log scale (a layer nearly
    exact at half its parameters is probed at lower ranks, where it loses something)."""
    picks = [min(candidates, key=lambda c: (abs(np.log(max(c.error, TINY) / level)), c.cost.params))
             for level in PROBE_ERRORS]
    return list({(c.method, c.ranks): c for c in picks}.values())


def probe_batches(source: onnx.ModelProto, calibration: Sequence[Feeds], config) -> Tuple[List[Feeds], list]:
    """The probes' batches (`PROBE_BATCHES`, held-out ones first) and `source`'s outputs on them."""
    batches = split_holdout(calibration, config.holdout_every).judging(PROBE_BATCHES)[:PROBE_BATCHES]
    original = make_session(source, threads=config.latency_threads)
    return batches, [run_outputs(original, feeds) for feeds in batches]


def probe_layer(source: Union[gs.Graph, onnx.ModelProto], template: onnx.ModelProto, target: LayerTarget,
                plans: List[LayerPlan], fit, config, batches, reference) -> List[float]:
    """The squared relative output error of the model with `target` alone replaced by its
    data-aware fit at each plan; `source` is the prepared graph or its model."""
    points = []
    for plan in plans:
        fact = factorize_data_aware(target, plan, fit, layer_ridge(target, config), config.bias_correction,
                                    solver=config.svd_solver)
        session = rewritten_session(source, template, {target.name: target}, [fact], config.latency_threads)
        points.append(squared_output_error(session, batches, reference))
    return points


def squared_output_error(session, batches, reference) -> float:
    """Σ‖y′ − y‖² / Σ‖y‖² over the float outputs of all batches."""
    err = ref = 0.0
    for feeds, expected in zip(batches, reference):
        for got, want in zip(run_outputs(session, feeds), expected):
            if np.issubdtype(np.asarray(want).dtype, np.floating):
                err += float(np.sum((np.asarray(got, np.float64) - want) ** 2))
                ref += float(np.sum(np.asarray(want, np.float64) ** 2))
    return err / max(ref, TINY)
