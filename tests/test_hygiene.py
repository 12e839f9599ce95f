"""Nothing is written into the user's working directory except what they asked for: onnxruntime's
quantizer (whose helpers drop scratch files into the current directory) runs in a temporary one."""
import os
from pathlib import Path

import numpy as np
import onnxruntime.quantization as ort_quantization
from click.testing import CliRunner

from onnx_lrsd.cli import main
from onnx_lrsd.runtime.quantize import quantize_model
from tests.test_cli import _mlp

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "models" / "digits_cnn.onnx"
DIGITS_CALIB = REPO / "models" / "digits_calib.npz"


def test_then_quantize_leaves_the_working_directory_empty(tmp_path, monkeypatch):
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    out.mkdir()
    monkeypatch.chdir(cwd)
    for mode in ("static", "dynamic"):
        result = CliRunner().invoke(main, ["compress", str(DIGITS), "-o", str(out / f"{mode}.onnx"), "--calib",
                                           str(DIGITS_CALIB), "--keep", "0.5", "--then-quantize", mode, "-q"])
        assert result.exit_code == 0, result.output
        assert (out / f"{mode}.onnx").is_file()
    assert os.listdir(cwd) == []
    assert Path.cwd() == cwd


def test_scratch_files_of_the_quantizer_stay_out_of_the_working_directory(tmp_path, monkeypatch):
    """The quantizer's shape inference writes `sym_shape_infer_temp.onnx` and a `*.data` file into
    the current directory when it cannot infer every shape; they must land in the temporary one."""
    real = ort_quantization.quantize_dynamic
    seen = []

    def writes_scratch_files(*args, **kwargs):
        Path("sym_shape_infer_temp.onnx").write_bytes(b"scratch")
        Path("0a1b2c.data").write_bytes(b"scratch")
        seen.append(Path.cwd())
        return real(*args, **kwargs)

    monkeypatch.setattr(ort_quantization, "quantize_dynamic", writes_scratch_files)
    monkeypatch.chdir(tmp_path)
    import onnx

    model = onnx.load(str(_mlp(tmp_path / "m.onnx")))
    (tmp_path / "m.onnx").unlink()
    quantized = quantize_model(model, "dynamic-matmul", [{"x": np.ones((2, 32), np.float32)}])
    assert any(node.op_type.startswith("DynamicQuantize") or "Integer" in node.op_type
               for node in quantized.graph.node)
    assert seen and seen[0] != tmp_path and not seen[0].exists()  # a temporary directory, removed
    assert os.listdir(tmp_path) == [] and Path.cwd() == tmp_path
