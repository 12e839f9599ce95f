"""Calibration readers and the validated, re-batched feed stream."""
import itertools
import logging
import zipfile

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_lrsd.runtime.calibrate import (
    CalibrationSpec,
    ListReader,
    NpzReader,
    RandomReader,
    iter_batches,
    open_reader,
)
from onnx_lrsd.errors import LrsdError


def _model(inputs, ir_version=8, initializers=()):
    """One Identity per input, so the model runs in onnxruntime as it is."""
    nodes = [helper.make_node("Identity", [i.name], [f"{i.name}_out"]) for i in inputs]
    outputs = [helper.make_value_info(f"{i.name}_out", i.type) for i in inputs]
    graph = helper.make_graph(nodes, "g", list(inputs), outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = ir_version
    return model


FLOAT = _model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])])
TOKENS = _model([
    helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]),
    helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "seq"]),
])


def _x(rows, start=0):
    """Float rows whose first column counts samples, so order can be checked."""
    x = np.zeros((rows, 3), np.float32)
    x[:, 0] = np.arange(start, start + rows)
    return {"x": x}


def _tokens(rows, seq, dtype=np.int64):
    return {"ids": np.ones((rows, seq), dtype), "mask": np.ones((rows, seq), dtype)}


def _collect(reader, model=FLOAT, n_samples=None, batch_size=None):
    return list(iter_batches(reader, model, n_samples, batch_size))


def _error(feeds, model=FLOAT):
    with pytest.raises(LrsdError) as info:
        _collect(ListReader([feeds]), model)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- validation --------------------------------------------------------------------------


def test_valid_batches_run_in_onnxruntime():
    batches = _collect(ListReader([_tokens(2, 5, np.int32)]), TOKENS)
    session = ort.InferenceSession(TOKENS.SerializeToString(), providers=["CPUExecutionProvider"])
    ids, mask = session.run(None, batches[0])
    assert ids.shape == mask.shape == (2, 5)


def test_missing_input_is_named_with_the_expected_names():
    message = _error({"ids": np.ones((1, 4), np.int64)}, TOKENS)
    assert "calibration batch 0: missing input 'mask' (model inputs: ids, mask)" in message


def test_unknown_input_is_named():
    message = _error({**_tokens(1, 4), "token_type_ids": np.zeros((1, 4), np.int64)}, TOKENS)
    assert "unknown input 'token_type_ids' (model inputs: ids, mask)" in message


def test_wrong_dtype_names_input_expected_and_got():
    message = _error({"x": np.zeros((2, 3), np.int64)})
    assert "input 'x' has dtype int64, the model expects float32" in message
    message = _error({"ids": np.ones((1, 4), np.float32), "mask": np.ones((1, 4), np.int64)}, TOKENS)
    assert "input 'ids' has dtype float32, the model expects int64" in message


def test_safe_casts_are_applied_and_logged_once(caplog):
    reader = ListReader([{"x": np.zeros((2, 3), np.float64)}] * 3)
    with caplog.at_level(logging.DEBUG, logger="onnx_lrsd.runtime.calibrate"):
        batches = _collect(reader)
    assert [b["x"].dtype for b in batches] == [np.float32] * 3
    assert sum("casting float64 to float32" in r.message for r in caplog.records) == 1
    batches = _collect(ListReader([_tokens(2, 4, np.int32)]), TOKENS)
    assert batches[0]["ids"].dtype == batches[0]["mask"].dtype == np.int64


def test_wrong_rank_names_input():
    message = _error({"x": np.zeros((2, 3, 1), np.float32)})
    assert "input 'x' has rank 3 (shape (2, 3, 1)), the model expects rank 2 ['N', 3]" in message


def test_wrong_fixed_dim_names_the_dim():
    message = _error({"x": np.zeros((2, 4), np.float32)})
    assert "input 'x' dim 1 is 4, the model fixes it to 3" in message


def test_named_dim_must_agree_across_inputs():
    message = _error({"ids": np.ones((1, 5), np.int64), "mask": np.ones((1, 7), np.int64)}, TOKENS)
    assert "input 'mask' dim 1 ('seq') is 7, but input 'ids' has 'seq' = 5" in message


def test_inputs_of_one_batch_need_one_batch_size():
    message = _error({"ids": np.ones((2, 5), np.int64), "mask": np.ones((3, 5), np.int64)}, TOKENS)
    assert "inputs have different batch sizes (ids: 2, mask: 3)" in message


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_name_input_batch_and_sample(bad):
    good = _x(2)
    poisoned = _x(3)
    poisoned["x"][2, 1] = bad
    with pytest.raises(LrsdError, match=r"calibration batch 1: input 'x' has NaN or inf values \(sample 2"):
        _collect(ListReader([good, poisoned]))


def test_float64_overflowing_float32_is_caught_after_the_cast():
    message = _error({"x": np.full((1, 3), 1e300)})
    assert "input 'x' has NaN or inf" in message


def test_empty_batch_and_empty_stream_are_errors():
    assert "calibration batch 0 is empty (0 samples)" in _error({"x": np.zeros((0, 3), np.float32)})
    with pytest.raises(LrsdError, match=r"^calibration data is empty$"):
        _collect(ListReader([]))


def test_reader_returning_something_else_is_an_error():
    assert "the reader returned list, expected a dict" in _error([np.zeros((1, 3), np.float32)])
    with pytest.raises(LrsdError, match="has no get_next"):
        iter_batches(object(), FLOAT, None, None)


def test_initializers_listed_as_inputs_are_not_inputs():
    weight = helper.make_tensor_value_info("w", TensorProto.FLOAT, [3])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])
    init = numpy_helper.from_array(np.ones(3, np.float32), "w")
    model = _model([x, weight], ir_version=3, initializers=[init])
    assert _collect(ListReader([_x(2)]), model)[0]["x"].shape == (2, 3)
    with pytest.raises(LrsdError, match=r"unknown input 'w' \(model inputs: x\)"):
        _collect(ListReader([{**_x(2), "w": np.ones(3, np.float32)}]), model)


def test_scalar_model_input_is_refused():
    model = _model([helper.make_tensor_value_info("t", TensorProto.FLOAT, [])])
    with pytest.raises(LrsdError, match="input 't' is a scalar"):
        iter_batches(ListReader([]), model, None, 4)


# --- re-batching ---------------------------------------------------------------------------


def _firsts(batches):
    return [b["x"][:, 0].astype(int).tolist() for b in batches]


def test_batch_size_one_reader_is_merged_in_order():
    batches = _collect(ListReader([_x(1, i) for i in range(10)]), batch_size=4)
    assert _firsts(batches) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_big_batches_are_split_and_mixed_sizes_recut():
    batches = _collect(ListReader([_x(10)]), batch_size=3)
    assert [len(b["x"]) for b in batches] == [3, 3, 3, 1]
    batches = _collect(ListReader([_x(2, 0), _x(7, 2), _x(1, 9)]), batch_size=4)
    assert _firsts(batches) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_batch_size_none_keeps_the_readers_batches():
    batches = _collect(ListReader([_x(2, 0), _x(5, 2)]))
    assert _firsts(batches) == [[0, 1], [2, 3, 4, 5, 6]]


def test_n_samples_caps_the_stream():
    batches = _collect(ListReader([_x(2, 0), _x(5, 2)]), n_samples=5, batch_size=4)
    assert _firsts(batches) == [[0, 1, 2, 3], [4]]


def test_different_sequence_lengths_are_not_merged_or_padded():
    reader = ListReader([_tokens(2, 5), _tokens(2, 5), _tokens(1, 7), _tokens(2, 5)])
    batches = _collect(reader, TOKENS, batch_size=4)
    assert [b["ids"].shape for b in batches] == [(4, 5), (1, 7), (2, 5)]
    assert all(b["ids"].shape == b["mask"].shape for b in batches)


def test_fixed_batch_model_gets_batches_of_that_size(caplog):
    model = _model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])])
    batches = _collect(ListReader([_x(5)]), model, batch_size=16)
    assert _firsts(batches) == [[0], [1], [2], [3], [4]]
    model = _model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])])
    with caplog.at_level(logging.WARNING):
        batches = _collect(ListReader([_x(5)]), model, batch_size=16)
    assert _firsts(batches) == [[0, 1], [2, 3]]
    assert "1 calibration samples dropped" in caplog.text


# --- readers -------------------------------------------------------------------------------


class _OnlyGetNext:
    """What a user writes for onnxruntime's static quantization: get_next() and nothing else."""

    def __init__(self, n):
        self._batches = iter([_x(1, i) for i in range(n)])

    def get_next(self):
        return next(self._batches, None)


def test_user_reader_with_only_get_next_works_once():
    reader = _OnlyGetNext(5)
    assert _firsts(_collect(reader, batch_size=2)) == [[0, 1], [2, 3], [4]]
    with pytest.raises(LrsdError, match=r"calibration data is empty \(a reader without rewind"):
        _collect(reader)


def test_onnxruntime_reader_subclass_works_and_ours_satisfy_its_protocol():
    from onnxruntime.quantization import CalibrationDataReader

    class OrtReader(CalibrationDataReader):
        def __init__(self):
            self._it = iter([_x(2, 0), _x(2, 2)])

        def get_next(self):
            return next(self._it, None)

    assert _firsts(_collect(OrtReader(), batch_size=4)) == [[0, 1, 2, 3]]
    assert isinstance(ListReader([]), CalibrationDataReader)


def test_rewind_is_used_so_a_reader_can_be_read_twice():
    reader = ListReader([_x(3)])
    assert reader.get_next() is not None  # partly consumed before
    assert _firsts(_collect(reader)) == _firsts(_collect(reader)) == [[0, 1, 2]]


def test_iteration_is_lazy_and_stops_at_n_samples():
    calls = itertools.count()

    class Endless:
        def get_next(self):
            return _x(1, next(calls))

    stream = iter_batches(Endless(), FLOAT, 10, 4)
    assert next(calls) == 0  # nothing read before iteration
    assert [len(b["x"]) for b in stream] == [4, 4, 2]
    assert next(calls) == 11  # 10 reads, plus the probe above


def test_list_reader_refuses_a_single_dict():
    with pytest.raises(LrsdError, match="got a single dict"):
        ListReader(_x(2))


def _save(path, rows, start=0, seq=None):
    if seq is None:
        np.savez(path, **_x(rows, start))
    else:
        np.savez(path, **_tokens(rows, seq))
    return path


def test_npz_file_round_trip_per_file(tmp_path):
    path = _save(tmp_path / "a.npz", 6)
    reader = NpzReader([path])
    batch = reader.get_next()
    assert reader.get_next() is None
    np.testing.assert_array_equal(batch["x"], _x(6)["x"])
    reader.rewind()
    assert reader.get_next() is not None


def test_npz_directory_is_sorted_and_batches_cross_files(tmp_path):
    _save(tmp_path / "b.npz", 5, start=3)
    _save(tmp_path / "a.npz", 3, start=0)
    _save(tmp_path / "c.npz", 4, start=8)
    (tmp_path / "notes.txt").write_text("not data")
    per_file = _collect(NpzReader([tmp_path]))
    assert _firsts(per_file) == [[0, 1, 2], [3, 4, 5, 6, 7], [8, 9, 10, 11]]
    batches = _collect(NpzReader([tmp_path], batch_size=5))
    assert _firsts(batches) == [list(range(0, 5)), list(range(5, 10)), [10, 11]]
    capped = _collect(NpzReader([tmp_path]), n_samples=7, batch_size=4)
    assert _firsts(capped) == [[0, 1, 2, 3], [4, 5, 6]]


def test_npz_files_of_different_sequence_lengths_stay_apart(tmp_path):
    _save(tmp_path / "a.npz", 3, seq=5)
    _save(tmp_path / "b.npz", 3, seq=8)
    shapes = [b["ids"].shape for b in _collect(NpzReader([tmp_path], batch_size=4), TOKENS, batch_size=4)]
    assert shapes == [(3, 5), (3, 8)]


def test_npz_errors(tmp_path):
    with pytest.raises(LrsdError, match=r"calibration data .*missing\.npz does not exist"):
        NpzReader([tmp_path / "missing.npz"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(LrsdError, match=r"calibration directory .*empty holds no \.npz files"):
        NpzReader([tmp_path / "empty"])
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(LrsdError, match=r"text\.npz: not an \.npz file"):
        NpzReader([tmp_path / "text.npz"])
    np.save(tmp_path / "single.npy", np.zeros((2, 3)))
    with pytest.raises(LrsdError, match=r"single\.npy: not an \.npz file \(one array"):
        NpzReader([tmp_path / "single.npy"])
    with zipfile.ZipFile(tmp_path / "other.npz", "w") as archive:
        archive.writestr("readme.txt", "hi")
    with pytest.raises(LrsdError, match=r"other\.npz: holds non-array members \(readme\.txt\)"):
        NpzReader([tmp_path / "other.npz"])
    np.savez(tmp_path / "ragged.npz", ids=np.ones((2, 4)), mask=np.ones((3, 4)))
    with pytest.raises(LrsdError, match=r"ragged\.npz: arrays must share one sample count"):
        NpzReader([tmp_path / "ragged.npz"]).get_next()


def test_random_reader_warns_and_is_seeded(caplog):
    with caplog.at_level(logging.WARNING, logger="onnx_lrsd.runtime.calibrate"):
        first = _collect(RandomReader(TOKENS, 10, batch_size=4, dims={"seq": 6}, seed=3), TOKENS, 10, 4)
    assert any(r.levelno == logging.WARNING and "random inputs" in r.message for r in caplog.records)
    again = _collect(RandomReader(TOKENS, 10, batch_size=4, dims={"seq": 6}, seed=3), TOKENS, 10, 4)
    other = _collect(RandomReader(TOKENS, 10, batch_size=4, dims={"seq": 6}, seed=4), TOKENS, 10, 4)
    assert [b["ids"].shape for b in first] == [(4, 6), (4, 6), (2, 6)]
    assert all(np.array_equal(a["ids"], b["ids"]) for a, b in zip(first, again))
    assert not all(np.array_equal(a["ids"], b["ids"]) for a, b in zip(first, other))
    with pytest.raises(LrsdError, match="--dim seq=VALUE"):
        RandomReader(TOKENS, 10)


def test_random_reader_counts_samples_of_a_fixed_batch_model():
    model = _model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])])
    assert len(_collect(RandomReader(model, 5, batch_size=4), model)) == 5


def test_open_reader_and_spec(tmp_path, caplog):
    _save(tmp_path / "a.npz", 3)
    reader = open_reader(CalibrationSpec(sources=(str(tmp_path),)), FLOAT)
    assert isinstance(reader, NpzReader)
    with caplog.at_level(logging.WARNING):
        reader = open_reader(CalibrationSpec(sources=("random",), n_samples=5, batch_size=2), FLOAT)
    assert isinstance(reader, RandomReader) and "random inputs" in caplog.text
    assert [len(b["x"]) for b in iter_batches(reader, FLOAT, 5, 2)] == [2, 2, 1]
    spec = CalibrationSpec(sources=["random"], n_samples=3, dims={"seq": 6})  # as a CLI builds it
    assert spec.sources == ("random",) and spec.dims == (("seq", 6),)
    assert [b["ids"].shape for b in iter_batches(open_reader(spec, TOKENS), TOKENS, 3, 16)] == [(3, 6)]
    with pytest.raises(LrsdError, match="cannot be combined"):
        CalibrationSpec(sources=("random", str(tmp_path)))
    with pytest.raises(LrsdError, match="no calibration data"):
        CalibrationSpec(sources=())
    with pytest.raises(LrsdError, match="batch size must be >= 1"):
        CalibrationSpec(sources=("random",), batch_size=0)
    with pytest.raises(LrsdError, match="sample count must be >= 1"):
        CalibrationSpec(sources=("random",), n_samples=0)
