"""Report files (JSON, Markdown, self-contained HTML with plots) and the `bench` and
`compress --report` commands that produce them."""
import base64
import html
import json
import re
import sys
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

import onnx_lrsd
from onnx_lrsd.cli import main
from onnx_lrsd.errors import LrsdError
from onnx_lrsd.runtime.feeds import random_feeds
from onnx_lrsd.runtime.profile import layer_of, profile_models
from onnx_lrsd.report.render import NO_MATPLOTLIB, write_report

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "models" / "digits_cnn.onnx"
DIGITS_CALIB = REPO / "models" / "digits_calib.npz"


@pytest.fixture(scope="module")
def digits():
    """The digit CNN compressed with its calibration set, and both models' profiles."""
    result = onnx_lrsd.compress(str(DIGITS), keep=0.25, calibration=[str(DIGITS_CALIB)])
    source = onnx.load(str(DIGITS))
    feeds = random_feeds(source, batch=2)
    profiles = tuple(profile_models([source, result.model], feeds, threads=1, runs=3, warmup=1))
    return result, profiles


def _png_count(text: str) -> int:
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)
    assert all(base64.b64decode(image).startswith(b"\x89PNG") for image in images)
    return len(images)


def test_html_report_is_self_contained_with_every_layer(digits, tmp_path):
    result, profiles = digits
    path = tmp_path / "r.html"
    assert write_report(path, result.report, profiles=profiles) == [path]
    text = path.read_text()
    assert _png_count(text) == 1  # per-layer plot; one model-level point draws no trade-off
    assert "one compressed point" in text
    assert not re.search(r"""(src|href)=['"](?!data:)""", text)  # nothing loaded from elsewhere
    for layer in result.report.layers:
        assert f"<td>{html.escape(layer.name)}</td>" in text
    row = re.search(r"<tr><td>fc1</td>(.*?)</tr>", text).group(1)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
    fc1 = next(layer for layer in result.report.layers if layer.name == "fc1")
    assert cells[1] == "svd" and cells[2] == str(fc1.ranks[0]) and cells[-5] == f"{fc1.data_error:.3e}"
    before, after = float(cells[-4]), float(cells[-3])  # in-network ms of fc1 in both models
    assert before == pytest.approx(profiles[0].layer("fc1").ms, abs=1e-3) and after > 0


def test_markdown_report_writes_its_plots_beside_it(digits, tmp_path):
    result, profiles = digits
    path = tmp_path / "r.md"
    written = write_report(path, result.report, profiles=profiles)
    assert written == [path, tmp_path / "r-layers.png"]
    text = path.read_text()
    assert "![Per-layer parameters, error and latency](r-layers.png)" in text
    assert (tmp_path / "r-layers.png").read_bytes().startswith(b"\x89PNG")
    table = text.split("## Layers")[1]
    for layer in result.report.layers:
        assert f"| {layer.name} | {layer.op} | {layer.method} |" in table


def test_json_report_is_the_report_data(digits, tmp_path):
    result, _ = digits
    path = tmp_path / "r.json"
    write_report(path, result.report)
    assert json.loads(path.read_text()) == json.loads(result.report.to_json())


def test_stages_draw_the_trade_off(tmp_path):
    result = onnx_lrsd.compress(str(DIGITS), keep=0.25, stages=2, calibration=[str(DIGITS_CALIB)])
    path = tmp_path / "r.html"
    write_report(path, result.report)
    text = path.read_text()
    assert _png_count(text) == 2 and "one compressed point" not in text
    assert "No in-network latency" not in text  # nothing claimed when profiles were not asked for


def test_data_free_report_without_latency_plots_params(tmp_path):
    report = onnx_lrsd.compress(str(DIGITS), keep=0.25).report
    assert all(layer.data_error is None for layer in report.layers)
    path = tmp_path / "r.html"
    write_report(path, report)
    text = path.read_text()
    assert _png_count(text) == 1 and "ms in model" not in text
    assert all(f"<td>{layer.name}</td>" in text for layer in report.layers)


def test_without_matplotlib_the_report_says_so(digits, tmp_path, monkeypatch):
    result, profiles = digits
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    for suffix in (".html", ".md"):
        path = tmp_path / f"r{suffix}"
        assert write_report(path, result.report, profiles=profiles) == [path]
        text = path.read_text()
        note = html.escape(NO_MATPLOTLIB) if suffix == ".html" else NO_MATPLOTLIB
        assert note in text and "image/png" not in text and ".png" not in text
        assert all(layer.name in text for layer in result.report.layers)
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("name, message", [("r.txt", "report file must end in"),
                                           ("missing/r.html", "report directory does not exist")])
def test_bad_report_path(digits, tmp_path, name, message):
    with pytest.raises(LrsdError, match=message):
        write_report(tmp_path / name, digits[0].report)


@pytest.fixture
def runner():
    return CliRunner()


def test_cli_compress_html_report(runner, tmp_path):
    out, report = tmp_path / "d.onnx", tmp_path / "report.html"
    result = runner.invoke(main, ["compress", str(DIGITS), "-o", str(out), "--calib", str(DIGITS_CALIB),
                                  "--keep", "0.25", "--report", str(report), "-q"])
    assert result.exit_code == 0, result.output
    text = report.read_text()
    assert "In-network latency: onnxruntime's profiler" in html.unescape(text) and _png_count(text) == 1
    for name in ("conv1", "conv2", "fc1", "fc2"):
        assert f"<td>{name}</td>" in text


@pytest.mark.parametrize("name, message", [("r.txt", "report file must end in"),
                                           ("nowhere/r.md", "report directory does not exist")])
def test_cli_compress_bad_report_path_writes_nothing(runner, tmp_path, name, message):
    out = tmp_path / "d.onnx"
    result = runner.invoke(main, ["compress", str(DIGITS), "-o", str(out), "--keep", "0.5", "--report",
                                  str(tmp_path / name), "-q"])
    assert result.exit_code == 1 and message in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def test_cli_bench_two_models_per_layer(runner, tmp_path):
    out = tmp_path / "d.onnx"
    compressed = runner.invoke(main, ["compress", str(DIGITS), "-o", str(out), "--keep", "0.25", "--json", "-q"])
    assert compressed.exit_code == 0, compressed.output
    factorized = [layer["name"] for layer in json.loads(compressed.output)["layers"] if layer["method"] != "dense"]
    result = runner.invoke(main, ["bench", str(DIGITS), str(out), "--runs", "5", "--batch", "4",
                                  "--profile-runs", "3", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    for side in ("baseline", "candidate"):
        cold, profile = data[side]["cold"], data[side]["profile"]
        assert cold["session_ms"] > 0 and cold["first_run_ms"] > 0 and profile["runs"] == 3
        assert profile["batch"] == 4
        assert sum(layer["ms"] for layer in profile["layers"]) == pytest.approx(profile["op_ms"], rel=1e-9)
    rows = {row["name"]: row for row in data["layer_comparison"]}
    names = [n.name for n in onnx.load(str(DIGITS)).graph.node]
    assert set(rows) <= set(names) and set(factorized) <= set(rows)
    assert all(rows[name]["candidate_ms"] > 0 and rows[name]["ratio"] > 0 for name in factorized)
    text = runner.invoke(main, ["bench", str(DIGITS), str(out), "--runs", "3", "--profile-runs", "2", "--top", "3"])
    assert text.exit_code == 0, text.output
    assert "per-layer kernel time" in text.output and "more layers" in text.output
    assert "session create ms" in text.output and "peak RSS MB" in text.output


def test_cli_bench_one_model(runner):
    result = runner.invoke(main, ["bench", str(DIGITS), "--runs", "3", "--profile-runs", "2", "--cold", "0"])
    assert result.exit_code == 0, result.output
    assert "candidate" not in result.output and "session create ms" not in result.output
    assert re.search(r"^  fc1 +Gemm ", result.output, re.M)
    data = json.loads(runner.invoke(main, ["bench", str(DIGITS), "--runs", "3", "--profile-runs", "0", "--cold", "0",
                                           "--json"]).output)
    assert data["candidate"] is None and data["speedup"] is None and data["baseline"]["profile"] is None
    assert data["layer_comparison"] == []


@pytest.mark.parametrize("args, message", [
    (["missing.onnx"], "not found"),
    ([str(DIGITS), "--dim", "seq=8"], "no input dim named 'seq'"),
    ([str(DIGITS), "--dim", "seq"], "expected name=positive-integer"),
])
def test_cli_bench_bad_input_one_line(runner, args, message):
    result = runner.invoke(main, ["bench"] + args + ["--runs", "3"])
    assert result.exit_code in (1, 2) and message in result.output
    assert "Traceback" not in result.output
    if result.exit_code == 1:
        assert len(result.output.strip().splitlines()) == 1


def test_layer_names_of_chains():
    assert layer_of("enc/fc1/lrsd/u") == "enc/fc1" and layer_of("fc1") == "fc1"
