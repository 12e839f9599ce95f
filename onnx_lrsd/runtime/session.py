"""onnxruntime sessions as the compressor opens them, and the models it writes on the way:
a copy of a graph with factorizations written in, exported, opened."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Union

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from ..errors import LrsdError, runtime_message
from ..model.graph import export_model, import_graph
from ..model.io import serialize_for_runtime
from ..model.layers import LayerTarget
from ..model.mapped import runtime_options
from ..model.rewrite import rewrite_layers

ModelLike = Union[str, Path, bytes, onnx.ModelProto]

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def make_session(model: ModelLike, threads: int, optimization: str = "all", profile_prefix: Optional[str] = None,
                 optimized_path: Optional[str] = None) -> ort.InferenceSession:
    """A CPU session with `threads` intra-op threads, one inter-op thread and no spinning.

    Paths are passed to onnxruntime as paths (external data, models above 2 GB).
    `optimization` is one of "disable", "basic", "extended", "all". With `profile_prefix` the
    session writes onnxruntime's JSON trace (`end_profiling()` returns its path); with
    `optimized_path` it saves the graph it runs there (weights above 1 KB beside it in
    `<name>.data`).
    """
    if threads < 1:
        raise LrsdError(f"threads must be >= 1, got {threads}")
    if optimization not in _OPT_LEVELS:
        raise LrsdError(f"unknown optimization level '{optimization}' (choose from {', '.join(_OPT_LEVELS)})")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = _OPT_LEVELS[optimization]
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if optimized_path is not None:
        options.log_severity_level = 3  # not the warning that NCHWc graphs are machine-specific
        options.optimized_model_filepath = optimized_path
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         Path(optimized_path).name + ".data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    runtime_options(options)
    if isinstance(model, onnx.ModelProto):
        source: Union[str, bytes] = serialize_for_runtime(model)
    elif isinstance(model, (bytes, bytearray)):
        source = bytes(model)
    else:
        source = str(model)
    try:
        return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several unrelated exception types
        raise LrsdError(f"onnxruntime cannot load the model: {runtime_message(exc)}") from None


def run_outputs(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """All outputs of one run, in the session's output order."""
    return list(session.run(None, dict(feeds)))


def rewritten_model(source: Union[gs.Graph, onnx.ModelProto], template: onnx.ModelProto,
                    targets: Dict[str, LayerTarget], factorizations: Iterable) -> onnx.ModelProto:
    """A copy of `source` (a graph, or a model to import) with `factorizations` written in
    (`rewrite_layers`), exported with `template`'s metadata; `source` is left as it was."""
    graph = source.copy() if isinstance(source, gs.Graph) else import_graph(source)
    sparse = rewrite_layers(graph, targets, factorizations)
    return export_model(graph, template, sparse)


def rewritten_session(source: Union[gs.Graph, onnx.ModelProto], template: onnx.ModelProto,
                      targets: Dict[str, LayerTarget], factorizations: Iterable, threads: int) -> ort.InferenceSession:
    """A session on `rewritten_model(source, template, targets, factorizations)`."""
    return make_session(rewritten_model(source, template, targets, factorizations), threads)
