"""Every case of the hostile-input corpus (`tests/corpus/`, built by `helpers/hostile_corpus.py`)
through `onnx-lrsd compress` and `inspect`: a one-line error or a correct skip, the right exit
code, no traceback, no output on failure, inputs byte-identical afterwards."""
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import onnx_lrsd
from helpers.hostile_corpus import CASES, CORPUS
from onnx_lrsd.cli import main
from onnx_lrsd.runtime.feeds import random_feeds
from onnx_lrsd.model.io import load_model

BY_NAME = {case.name: case for case in CASES}


def _snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _staged(case, tmp_path: Path) -> Path:
    shutil.copytree(CORPUS / case.name, tmp_path / case.name)
    return tmp_path / case.name


def _compress_args(case, directory: Path) -> list:
    args = ["compress", str(directory / case.model), "-o", str(directory / case.output), "--json", "-q"]
    args += [str(directory / a) if a.endswith(".npz") else a for a in case.args]
    if case.expect == "compress" or case.expect == "skip" and onnx_lrsd.inspect_model(directory / case.model).targets:
        args += ["--rank", "*=full"]  # the outputs must not change
    return args


def _dims(case) -> dict:
    args = list(case.args)
    return dict(a.split("=") for i, a in enumerate(args) if i and args[i - 1] == "--dim")


def _outputs(path: Path, feeds: dict) -> list:
    """Outputs of the model at `path` as the library loads it (repeated node names, which
    onnxruntime refuses, made unique)."""
    model = load_model(path)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _node_ops(graph: onnx.GraphProto) -> dict:
    ops = {}
    for node in graph.node:
        ops[node.name] = node.op_type
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                ops.update(_node_ops(sub))
    return ops


def test_corpus_on_disk_matches_the_case_list():
    assert sorted(p.name for p in CORPUS.iterdir() if p.is_dir()) == sorted(BY_NAME)
    assert len(CASES) >= 60
    assert {case.expect for case in CASES} == {"error", "skip", "compress", "nothing"}


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_compress_hostile_input(name, tmp_path):
    case = BY_NAME[name]
    directory = _staged(case, tmp_path)
    before = _snapshot(directory)
    result = CliRunner().invoke(main, _compress_args(case, directory))
    # anything but SystemExit escaping the command is a traceback
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    output = directory / case.output
    after = _snapshot(directory)
    written = {k: v for k, v in after.items() if k not in before}
    assert {k: after[k] for k in before} == before, "an input file was modified"
    if case.expect in ("error", "nothing"):
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == (3 if case.expect == "nothing" else case.code), result.output
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert re.search(case.pattern, lines[0]), lines[0]
        assert result.stdout == ""
        assert written == {}, f"files left behind: {sorted(written)}"
        return
    assert result.exit_code == 0, result.output
    assert set(written) <= {case.output, case.output + ".data"}
    report = json.loads(result.stdout)
    if case.expect == "skip" and case.pattern:
        assert report["skipped"] and all(re.search(case.pattern, s["reason"]) for s in report["skipped"])
        kept = _node_ops(onnx.load(str(output), load_external_data=False).graph)
        assert all(kept.get(s["name"]) == s["op"] for s in report["skipped"]), "a skipped layer was rewritten"
    if case.expect == "compress":
        assert report["layers"] and all(layer["method"] != "dense" for layer in report["layers"])
    source = onnx.load(str(output), load_external_data=False)  # the input dims as compress named them
    feeds = random_feeds(source, batch=3, dims={k: int(v) for k, v in _dims(case).items()}, seed=5)
    tolerance = 2e-3 if any(v.dtype == np.float16 for v in feeds.values()) else 1e-4
    for want, got in zip(_outputs(directory / case.model, feeds), _outputs(output, feeds)):
        finite = np.isfinite(want)  # inf weights: inf - inf lands elsewhere in a chain
        scale = np.abs(want[finite]).max(initial=1)
        np.testing.assert_allclose(got[finite], want[finite], rtol=tolerance, atol=tolerance * scale)


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_inspect_and_api_on_hostile_input(name, tmp_path):
    """`inspect` fails with one line or lists layers; the Python API raises only `LrsdError`."""
    case = BY_NAME[name]
    directory = _staged(case, tmp_path)
    result = CliRunner().invoke(main, ["inspect", str(directory / case.model), "--json"])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    if result.exit_code:
        assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    else:
        assert "targets" in json.loads(result.stdout)
    if case.expect in ("error", "nothing"):
        with pytest.raises(onnx_lrsd.LrsdError, match=case.pattern) as info:
            onnx_lrsd.compress_file(directory / case.model, directory / case.output,
                                    calibration=str(directory / "calib.npz") if "--calib" in case.args else None,
                                    **dict(case.api_options))
        assert info.value.exit_code == (3 if case.expect == "nothing" else case.code)
        assert not (directory / case.output).exists()


def test_inspect_counts_macs_of_dynamic_hw_only_with_the_dims(tmp_path):
    """PP-OCR det-like H×W: without --dim the MACs are unknown (not params); with them, the
    exact count at batch 1: H·W·Cout·Cin·k² per conv."""
    case = BY_NAME["dynamic_hw_conv"]
    directory = _staged(case, tmp_path)
    result = CliRunner().invoke(main, ["inspect", str(directory / case.model), "--json"])
    report = json.loads(result.stdout)
    assert report["macs"] is None and report["unresolved"] == ["H", "W"]
    assert all(t["macs"] is None for t in report["targets"])
    text = CliRunner().invoke(main, ["inspect", str(directory / case.model)]).stdout
    assert "MACs unknown" in text and "--dim H=VALUE --dim W=VALUE" in text
    result = CliRunner().invoke(main, ["inspect", str(directory / case.model), "--dim", "H=20", "--dim", "W=24", "--json"])
    report = json.loads(result.stdout)
    want = {"stem": 20 * 24 * 32 * 3 * 9, "conv1": 20 * 24 * 32 * 32 * 9}
    assert {t["name"]: t["macs"] for t in report["targets"]} == want and report["macs"] == sum(want.values())
    compressed = CliRunner().invoke(main, ["compress", str(directory / case.model), "-o", str(tmp_path / "o.onnx"),
                                           "--dim", "H=20", "--dim", "W=24", "--json", "--accept-error"])
    assert json.loads(compressed.stdout)["before"]["macs"] == sum(want.values())


@pytest.mark.parametrize("name", ["truncated", "cycle", "external_path_traversal"])
def test_console_script_prints_one_line(name, tmp_path):
    """Through the real entry point: stderr is exactly the error line."""
    case = BY_NAME[name]
    directory = _staged(case, tmp_path)
    run = subprocess.run([sys.executable, "-m", "onnx_lrsd.cli"] + _compress_args(case, directory),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: ") and "Traceback" not in run.stderr
    assert not (directory / case.output).exists()
