"""The Python API: model sources, option validation, per-layer overrides, rank choice,
`compress_file`'s refusals and one-line errors for bad model files."""
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from helpers.graphs import Builder, initializer_arrays, matmul_model, max_rel_error, mlp_model
from onnx_lrsd.api import compress, compress_file, inspect_model
from onnx_lrsd.config import CompressConfig, LayerOverride
from onnx_lrsd.errors import LrsdError


def _one_line(exc_info):
    message = str(exc_info.value)
    assert message and "\n" not in message, repr(message)
    return message


def _layers(result):
    return {layer.name: layer for layer in result.report.layers}


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------
def test_compress_accepts_a_path_bytes_and_a_model_proto(tmp_path):
    model = mlp_model(seed=1)
    path = tmp_path / "mlp.onnx"
    path.write_bytes(model.SerializeToString())
    results = [compress(source, keep=0.5, min_rank=1) for source in (model, model.SerializeToString(), path, str(path))]
    outputs = {r.model.SerializeToString() for r in results}
    assert len(outputs) == 1, "the same model from different sources compressed differently"
    # budgets: 0.5·512 // 48 = 5, 0.5·768 // 56 = 6, 0.5·192 // 32 = 3
    assert [layer.ranks for layer in results[0].report.layers] == [(5,), (6,), (3,)]
    assert results[0].report.params_ratio < 0.7


def test_compress_never_modifies_the_given_model():
    model = mlp_model(seed=2)
    before = model.SerializeToString()
    compress(model, keep=0.3)
    compress(model, overrides=(LayerOverride("*", rank="full"),))
    assert model.SerializeToString() == before


def test_options_override_the_config():
    model = mlp_model()
    result = compress(model, CompressConfig(keep=0.9, seed=3, min_rank=1), keep=0.25)
    assert result.report.config["keep"] == 0.25 and result.report.config["seed"] == 3
    assert result.report.config["min_rank"] == 1
    assert all(layer.method == "svd" for layer in result.report.layers)
    assert all(layer.params_after <= 0.25 * layer.params_before for layer in result.report.layers)


def test_progress_is_reported():
    calls = []
    compress(mlp_model(), keep=0.5, min_rank=1, progress=lambda stage, done, total: calls.append((stage, done, total)))
    decompose = [c for c in calls if c[0] == "decompose"]
    assert decompose and decompose[-1][1] == decompose[-1][2] == 3


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [0, 0.0, 1.5, -1, True, "0.5", float("nan")])
def test_bad_keep_is_an_error(keep):
    with pytest.raises(LrsdError, match="keep") as exc:
        compress(mlp_model(), keep=keep)
    _one_line(exc)
    with pytest.raises(LrsdError, match="keep"):
        CompressConfig(keep=keep)


@pytest.mark.parametrize("keep", [1, 1.0, 1e-3])
def test_edge_keeps_are_accepted(keep):
    assert CompressConfig(keep=keep).keep == keep


@pytest.mark.parametrize("override,match", [
    (LayerOverride("enc/fc1", keep=0), "enc/fc1"),
    (LayerOverride("enc/fc1", keep=1.5), "enc/fc1"),
    (LayerOverride("enc/fc1", energy=0), "energy"),
    (LayerOverride("enc/fc1", rank=-1), "rank"),
    (LayerOverride("enc/fc1", rank="half"), "rank"),
    (LayerOverride("enc/fc1", method="cp"), "unknown method"),
])
def test_bad_override_values_are_errors(override, match):
    with pytest.raises(LrsdError, match=match) as exc:
        compress(mlp_model(), overrides=(override,))
    _one_line(exc)


@pytest.mark.parametrize("pattern", ["enc/fc9", "encoder/*", "fc1"])
def test_override_matching_no_layer_is_an_error(pattern):
    with pytest.raises(LrsdError, match=pattern.replace("*", r"\*")) as exc:
        compress(mlp_model(), overrides=(LayerOverride(pattern, keep=0.5),))
    _one_line(exc)


def test_bad_method_is_an_error():
    with pytest.raises(LrsdError, match="unknown method"):
        compress(mlp_model(), method="qr")


# --------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------
def test_override_by_exact_name_and_by_glob():
    model = mlp_model()  # enc/fc1 16→32, enc/fc2 32→24, dec/fc 24→8
    result = compress(model, keep=0.5, min_rank=1,
                      overrides=(LayerOverride("dec/fc", rank=2), LayerOverride("enc/*", keep=0.25)))
    layers = _layers(result)
    assert layers["enc/fc1"].ranks == (2,)  # 0.25·512 = 128 params, 48 per rank
    assert layers["enc/fc2"].ranks == (3,)  # 0.25·768 = 192 params, 56 per rank
    assert layers["dec/fc"].ranks == (2,)
    assert layers["dec/fc"].params_after == 2 * 32
    assert result.report.config["overrides"][0]["pattern"] == "dec/fc"


def test_first_matching_override_wins():
    result = compress(mlp_model(), min_rank=1,
                      overrides=(LayerOverride("enc/fc1", rank=1), LayerOverride("enc/*", rank=4)))
    layers = _layers(result)
    assert layers["enc/fc1"].ranks == (1,) and layers["enc/fc2"].ranks == (4,)
    assert layers["dec/fc"].ranks == (3,)  # global keep 0.5: 0.5·192 = 96 params, 32 per rank


def test_exact_name_with_glob_characters():
    model = mlp_model(names=("layer[0]", "layer[1]", "head"))
    result = compress(model, overrides=(LayerOverride("layer[0]", rank=1),))
    layers = _layers(result)
    assert layers["layer[0]"].ranks == (1,)
    assert layers["layer[1]"].ranks != (1,)


def test_skip_override_leaves_the_layer_dense():
    model = mlp_model(seed=4)
    result = compress(model, keep=0.5, min_rank=1, overrides=(LayerOverride("enc/fc2", skip=True),))
    layers = _layers(result)
    assert layers["enc/fc2"].method == "dense" and layers["enc/fc2"].reason == "skipped by configuration"
    assert layers["enc/fc2"].params_after == layers["enc/fc2"].params_before == 32 * 24
    assert layers["enc/fc1"].method == "svd" and layers["dec/fc"].method == "svd"
    out = result.model
    np.testing.assert_array_equal(initializer_arrays(out)["enc/fc2.weight"],
                                  initializer_arrays(model)["enc/fc2.weight"])
    assert {n.name: n.op_type for n in out.graph.node}["enc/fc2"] == "MatMul"
    assert not [t for t in out.graph.initializer if t.name.startswith("enc/fc2/lrsd/")]


def test_skip_all_gives_the_same_model_outputs():
    model = mlp_model(seed=5)
    result = compress(model, overrides=(LayerOverride("*", skip=True),))
    assert all(layer.method == "dense" for layer in result.report.layers)
    assert max_rel_error(model, result.model) == 0.0
    assert result.report.after.params == result.report.before.params


# --------------------------------------------------------------------------------------------
# Rank choice
# --------------------------------------------------------------------------------------------
def _planted_low_rank_model(rank=4, n_in=64, n_out=48, noise=1e-4, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_in, rank)) @ rng.standard_normal((rank, n_out)) / np.sqrt(n_in)
    w += noise * rng.standard_normal((n_in, n_out))
    b = Builder(seed=seed)
    b.input("x", ["batch", n_in])
    b.node("MatMul", ["x", b.init("W", w.astype(np.float32))], ["y"], name="layer")
    b.output("y", ["batch", n_out])
    return b.model()


def test_energy_threshold_finds_a_planted_low_rank():
    model = _planted_low_rank_model()
    (by_keep,) = compress(model, keep=0.5).report.layers
    assert by_keep.ranks == (13,)  # 0.5·64·48 / (64 + 48) = 13.7
    result = compress(model, keep=0.5, energy=0.999, min_rank=1)
    (by_energy,) = result.report.layers
    assert by_energy.ranks == (4,)
    assert by_energy.params_after == 4 * 112
    assert result.report.output_errors["y"] < 1e-3
    assert max_rel_error(model, result.model) < 1e-3


def test_energy_is_capped_by_the_keep_budget():
    model = _planted_low_rank_model(rank=20)
    (layer,) = compress(model, keep=0.25, energy=0.9999, min_rank=1).report.layers
    assert layer.ranks == (6,)  # 0.25·3072 / 112 = 6.9: the budget is smaller than the energy rank


def test_energy_per_layer_override():
    model = _planted_low_rank_model()
    (layer,) = compress(model, keep=0.5, min_rank=1, overrides=(LayerOverride("layer", energy=0.999),)).report.layers
    assert layer.ranks == (4,)


def test_energy_rank_below_min_rank_is_raised_not_dropped():
    model = _planted_low_rank_model()
    (layer,) = compress(model, keep=0.5, energy=0.999).report.layers  # default min_rank 8
    assert layer.method == "svd" and 8 <= layer.ranks[0] <= 13, (layer.method, layer.reason)


def test_budget_below_min_rank_leaves_the_layer_dense():
    model = _planted_low_rank_model()
    (layer,) = compress(model, keep=0.25).report.layers  # 0.25·3072 // 112 = 6 < 8
    assert layer.method == "dense" and "rank >= 8" in layer.reason
    (layer,) = compress(model, keep=0.25, min_rank=6).report.layers
    assert layer.method == "svd" and layer.ranks == (6,)


@pytest.mark.parametrize("shape,keep", [((8, 8), 1.0), ((2, 2), 0.9), ((4, 1), 0.9)])
def test_layer_that_would_not_save_stays_dense_with_a_reason(shape, keep):
    model = matmul_model((3, shape[0]), n=shape[1])
    result = compress(model, keep=keep, min_rank=1)
    (layer,) = result.report.layers
    assert layer.method == "dense"
    assert layer.reason.startswith(f"no factorization at keep={keep:g} cuts both params and MACs")
    assert layer.params_after == layer.params_before == shape[0] * shape[1]
    assert [n.op_type for n in result.model.graph.node] == ["MatMul"]
    assert max_rel_error(model, result.model) == 0.0


def test_budget_rank_of_a_small_layer():
    """8×8 at keep 0.9: 57.6 parameters allowed, 16 per rank, so rank 3 (48 < 64) is kept."""
    (layer,) = compress(matmul_model((3, 8), n=8), keep=0.9, min_rank=1).report.layers
    assert layer.method == "svd" and layer.ranks == (3,) and layer.params_after == 48


def test_forced_rank_is_capped_at_full_rank():
    (layer,) = compress(matmul_model((3, 12), n=10), overrides=(LayerOverride("layer", rank=1000),)).report.layers
    assert layer.ranks == (10,)


def test_forced_rank_zero_leaves_the_layer_dense():
    (layer,) = compress(matmul_model((3, 12), n=10), overrides=(LayerOverride("layer", rank=0),)).report.layers
    assert layer.method == "dense" and layer.reason == "rank 0 requested"


# --------------------------------------------------------------------------------------------
# compress_file
# --------------------------------------------------------------------------------------------
def _write(path: Path, model) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def _files(directory: Path):
    return sorted(p.name for p in directory.iterdir())


def test_compress_file_writes_the_model_and_reports_file_sizes(tmp_path):
    source = _write(tmp_path / "in.onnx", mlp_model(sizes=(64, 128, 64, 10)))
    result = compress_file(source, tmp_path / "out.onnx", keep=0.25, accept_error=True)
    assert _files(tmp_path) == ["in.onnx", "out.onnx"]  # no temporary files left behind
    written = onnx.load(str(tmp_path / "out.onnx"))
    assert written.SerializeToString() == result.model.SerializeToString()
    assert result.report.after.file_bytes == (tmp_path / "out.onnx").stat().st_size
    assert result.report.before.file_bytes == source.stat().st_size
    assert result.report.size_ratio < 0.5


def test_compress_file_refuses_to_overwrite_its_input(tmp_path):
    source = _write(tmp_path / "in.onnx", mlp_model())
    before = source.read_bytes()
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.onnx").symlink_to(source)
    for output in (source, str(source), tmp_path / "sub" / ".." / "in.onnx", Path(os.path.relpath(source)),
                   tmp_path / "link.onnx"):
        with pytest.raises(LrsdError, match="input") as exc:
            compress_file(source, output)
        _one_line(exc)
    assert source.read_bytes() == before
    assert _files(tmp_path) == ["in.onnx", "link.onnx", "sub"]
    assert _files(tmp_path / "sub") == []


def test_compress_file_refuses_a_missing_output_directory(tmp_path):
    source = _write(tmp_path / "in.onnx", mlp_model())
    with pytest.raises(LrsdError, match="does not exist") as exc:
        compress_file(source, tmp_path / "missing" / "out.onnx")
    _one_line(exc)
    assert _files(tmp_path) == ["in.onnx"]


def test_compress_file_refuses_a_directory_as_output(tmp_path):
    source = _write(tmp_path / "in.onnx", mlp_model())
    (tmp_path / "out").mkdir()
    with pytest.raises(LrsdError, match="directory") as exc:
        compress_file(source, tmp_path / "out")
    _one_line(exc)
    assert _files(tmp_path / "out") == []


def test_compress_file_with_a_bad_input_leaves_no_output(tmp_path):
    source = tmp_path / "in.onnx"
    source.write_bytes(b"")
    with pytest.raises(LrsdError, match="empty"):
        compress_file(source, tmp_path / "out.onnx")
    assert _files(tmp_path) == ["in.onnx"]


def test_compress_file_with_a_bad_option_leaves_no_output(tmp_path):
    source = _write(tmp_path / "in.onnx", mlp_model())
    with pytest.raises(LrsdError):
        compress_file(source, tmp_path / "out.onnx", overrides=(LayerOverride("nope", rank=1),))
    assert _files(tmp_path) == ["in.onnx"]


# --------------------------------------------------------------------------------------------
# Bad model files: one-line LrsdErrors
# --------------------------------------------------------------------------------------------
def _bad_sources(tmp_path):
    good = mlp_model(sizes=(64, 128, 10), names=("a", "b")).SerializeToString()
    (tmp_path / "dir.onnx").mkdir()
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "truncated.onnx").write_bytes(good[: len(good) // 2])
    (tmp_path / "text.onnx").write_text("graph {\n  node: MatMul\n}\nthis is not a protobuf\n")
    (tmp_path / "json.onnx").write_text('{"ir_version": 8, "graph": {}}')
    (tmp_path / "zeros.onnx").write_bytes(bytes(1000))
    return {
        "missing": (tmp_path / "nope.onnx", "not found"),
        "directory": (tmp_path / "dir.onnx", "not a file"),
        "empty": (tmp_path / "empty.onnx", "empty"),
        "truncated": (tmp_path / "truncated.onnx", "not an ONNX model"),
        "text": (tmp_path / "text.onnx", "not an ONNX model"),
        "json": (tmp_path / "json.onnx", "not an ONNX model"),
        "zeros": (tmp_path / "zeros.onnx", "not an ONNX model"),
    }


@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "truncated", "text", "json", "zeros"])
def test_bad_model_files_are_one_line_errors(tmp_path, kind):
    path, match = _bad_sources(tmp_path)[kind]
    for call in (lambda: compress(path), lambda: compress(str(path)), lambda: inspect_model(path)):
        with pytest.raises(LrsdError, match=match) as exc:
            call()
        _one_line(exc)


def test_bad_model_bytes_are_one_line_errors():
    good = mlp_model().SerializeToString()
    for data in (b"", good[:-7], b"not a model at all"):
        with pytest.raises(LrsdError) as exc:
            compress(data)
        _one_line(exc)


def _external_data_model(tmp_path):
    model = mlp_model(sizes=(64, 128, 10), names=("a", "b"))
    path = tmp_path / "ext.onnx"
    saved = onnx.ModelProto()
    saved.CopyFrom(model)  # onnx.save_model moves the weights out of the proto it is given
    onnx.save_model(saved, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.weights", size_threshold=256)
    return model, path


def test_external_data_is_loaded(tmp_path):
    model, path = _external_data_model(tmp_path)
    assert (tmp_path / "ext.weights").stat().st_size > 0
    result = compress(path, keep=0.5)
    reference = compress(model, keep=0.5)
    assert [layer.ranks for layer in result.report.layers] == [layer.ranks for layer in reference.report.layers]
    arrays, expected = initializer_arrays(result.model), initializer_arrays(reference.model)
    assert arrays.keys() == expected.keys()
    for name in arrays:
        np.testing.assert_array_equal(arrays[name], expected[name])
    assert not [t for t in result.model.graph.initializer if t.external_data]


def test_model_proto_with_unloaded_external_data_is_a_one_line_error(tmp_path, monkeypatch):
    _, path = _external_data_model(tmp_path)
    unloaded = onnx.load(str(path), load_external_data=False)
    monkeypatch.chdir(tmp_path.parent)  # relative locations do not resolve from here
    for call in (lambda: compress(unloaded), lambda: compress(unloaded.SerializeToString()),
                 lambda: inspect_model(unloaded)):
        with pytest.raises(LrsdError, match="external data") as exc:
            call()
        _one_line(exc)


def test_missing_external_data_is_a_one_line_error(tmp_path):
    _, path = _external_data_model(tmp_path)
    (tmp_path / "ext.weights").unlink()
    for call in (lambda: compress(path), lambda: inspect_model(path),
                 lambda: compress_file(path, tmp_path / "out.onnx")):
        with pytest.raises(LrsdError, match="ext.weights") as exc:
            call()
        assert "missing" in _one_line(exc)
    assert _files(tmp_path) == ["ext.onnx"]


def test_external_data_outside_the_model_directory_is_refused(tmp_path):
    model = mlp_model(sizes=(64, 128, 10), names=("a", "b"))
    (tmp_path / "inner").mkdir()
    onnx.save_model(model, str(tmp_path / "inner" / "m.onnx"), save_as_external_data=True,
                    location="m.weights", size_threshold=256)
    loaded = onnx.load(str(tmp_path / "inner" / "m.onnx"), load_external_data=False)
    for tensor in loaded.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../secret.bin"
    (tmp_path / "inner" / "m.onnx").write_bytes(loaded.SerializeToString())
    (tmp_path / "secret.bin").write_bytes((tmp_path / "inner" / "m.weights").read_bytes())
    with pytest.raises(LrsdError, match="outside") as exc:
        compress(tmp_path / "inner" / "m.onnx")
    _one_line(exc)


@pytest.mark.parametrize("rank, expected", [(31, 31), (32, 32), (47, 47), (48, 48), (70, 64), (100, 96), (15, 15), (8, 8)])
def test_conv_ranks_round_to_blocks_only_when_cheap(rank, expected):
    from onnx_lrsd.plan.rank_select import round_conv_rank

    assert round_conv_rank(rank, 16, limit=512) == expected
    assert round_conv_rank(rank, 16, limit=20) == min(expected, 20)
