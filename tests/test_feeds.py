"""Input shape resolution and seeded random inputs."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnx_lrsd.errors import LrsdError
from onnx_lrsd.runtime.feeds import random_feeds, resolve_input_shapes
from onnx_lrsd.testing.zoo import zoo_path


def _model(inputs, ir_version=8, initializers=()):
    """One Identity per input, so the model runs in onnxruntime as it is."""
    nodes = [helper.make_node("Identity", [i.name], [f"{i.name}_out"]) for i in inputs]
    outputs = [helper.make_value_info(f"{i.name}_out", i.type) for i in inputs]
    graph = helper.make_graph(nodes, "g", list(inputs), outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = ir_version
    return model


def _tokens_and_image():
    return _model([
        helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("mask", TensorProto.BOOL, ["batch", "seq"]),
        helper.make_tensor_value_info("img", TensorProto.FLOAT16, [None, 3, 8, 8]),
    ])


def test_symbolic_batch_defaults_to_one_and_named_dims_apply():
    shapes = resolve_input_shapes(_tokens_and_image(), dims={"seq": 7})
    assert shapes == {
        "ids": ((1, 7), np.dtype(np.int64)),
        "mask": ((1, 7), np.dtype(bool)),
        "img": ((1, 3, 8, 8), np.dtype(np.float16)),
    }


def test_batch_sets_unknown_first_dims_and_dims_override_it():
    shapes = resolve_input_shapes(_tokens_and_image(), batch=4, dims={"seq": 5})
    assert shapes["ids"][0] == (4, 5)
    assert shapes["img"][0] == (4, 3, 8, 8)
    shapes = resolve_input_shapes(_tokens_and_image(), batch=4, dims={"seq": 5, "batch": 2})
    assert shapes["ids"][0] == (2, 5)
    assert shapes["img"][0] == (4, 3, 8, 8)  # unnamed first dim: still the batch


def test_fixed_dims_are_kept():
    model = _model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])])
    assert resolve_input_shapes(model, batch=8) == {"x": ((2, 3), np.dtype(np.float32))}


def test_unknown_inner_dim_names_the_input_and_suggests_dim():
    with pytest.raises(LrsdError, match=r"'seq' \(ids dim 1; mask dim 1\) are unknown: pass --dim seq=VALUE"):
        resolve_input_shapes(_tokens_and_image())


def test_every_unknown_dim_is_named_in_one_error():
    model = _model([helper.make_tensor_value_info("img", TensorProto.FLOAT, ["N", 3, "H", "W"]),
                    helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "seq"])])
    with pytest.raises(LrsdError, match=r"'H' \(img dim 2\), 'W' \(img dim 3\), 'seq' \(ids dim 1\) are unknown: "
                                        r"pass --dim H=VALUE --dim W=VALUE --dim seq=VALUE") as info:
        resolve_input_shapes(model, dims={})
    assert info.value.exit_code == 2


def test_unnamed_unknown_inner_dim_is_an_error():
    model = _model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None])])
    with pytest.raises(LrsdError, match=r"input 'x' dim 1 is unknown and unnamed"):
        resolve_input_shapes(model)


def test_unknown_dim_name_is_rejected():
    with pytest.raises(LrsdError, match=r"--dim sequence: .*named dims: batch, seq"):
        resolve_input_shapes(_tokens_and_image(), dims={"sequence": 4})


@pytest.mark.parametrize("kwargs", [{"batch": 0}, {"dims": {"seq": 0}}])
def test_non_positive_sizes_are_rejected(kwargs):
    with pytest.raises(LrsdError):
        resolve_input_shapes(_tokens_and_image(), **{"dims": {"seq": 3}, **kwargs})


def test_initializers_listed_as_inputs_are_not_real_inputs():
    weight = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
    model = _model(
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [2])],
        ir_version=3,
        initializers=[weight],
    )
    assert list(resolve_input_shapes(model)) == ["x"]


def test_zoo_file_inputs_exclude_ir3_initializers():
    model = onnx.load(zoo_path("squeezenet"))
    assert resolve_input_shapes(model) == {"data_0": ((1, 3, 224, 224), np.dtype(np.float32))}


def test_random_feeds_dtypes_values_and_onnxruntime_accepts_them():
    model = _tokens_and_image()
    feeds = random_feeds(model, batch=3, dims={"seq": 64}, seed=1)
    assert feeds["ids"].dtype == np.int64 and feeds["ids"].shape == (3, 64)
    assert set(np.unique(feeds["ids"])) == {0, 1}  # valid token ids
    assert feeds["mask"].dtype == bool and feeds["mask"].any() and not feeds["mask"].all()
    img = feeds["img"].astype(np.float64)
    assert feeds["img"].dtype == np.float16 and img.shape == (3, 3, 8, 8)
    assert abs(img.mean()) < 0.2 and 0.8 < img.std() < 1.2
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = session.run(None, feeds)
    np.testing.assert_array_equal(outputs[0], feeds["ids"])


def test_random_feeds_are_seeded():
    model = _tokens_and_image()
    a = random_feeds(model, dims={"seq": 16}, seed=3)
    b = random_feeds(model, dims={"seq": 16}, seed=3)
    c = random_feeds(model, dims={"seq": 16}, seed=4)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["img"], c["img"])


def test_unsupported_input_dtype_is_an_error():
    model = _model([helper.make_tensor_value_info("s", TensorProto.STRING, [1])])
    with pytest.raises(LrsdError, match="input 's' has dtype"):
        random_feeds(model)


def test_exporters_unknown_dims_are_named_on_load():
    """−1, an empty dim and the '?' placeholder naming several dims become dims named after
    input and axis, which --dim or calibration data can then give; −1 on an output becomes
    unknown; the caller's model is not modified; a '?' naming one dim keeps its name."""
    from onnx_lrsd.model.io import load_model

    model = _model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, None, "?", "?", 3])])
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = -1
    loaded = load_model(model)
    dims = loaded.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["x_dim0", "x_dim1", "x_dim2", "x_dim3", 3]
    assert not loaded.graph.output[0].type.tensor_type.shape.dim[0].HasField("dim_value")
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == -1
    shapes = resolve_input_shapes(loaded, dims={"x_dim1": 2, "x_dim2": 4, "x_dim3": 5})
    assert shapes["x"][0] == (1, 2, 4, 5, 3)
    single = load_model(_model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, "?", 8])]))
    assert [d.dim_param or d.dim_value for d in single.graph.input[0].type.tensor_type.shape.dim] == [
        "x_dim0", 3, "?", 8]
