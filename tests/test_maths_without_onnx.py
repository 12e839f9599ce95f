"""The maths room (`onnx_lrsd.decompose`, every module of it, `stats` included) imports and runs
with onnx, onnxruntime and onnx_graphsurgeon unavailable."""
import os
import subprocess
import sys
from pathlib import Path

BLOCKED = ("onnx", "onnxruntime", "onnx_graphsurgeon")

SCRIPT = f"""
import sys
for name in {BLOCKED!r}:
    sys.modules[name] = None  # any import of it, or of a submodule, now raises ImportError
try:
    import onnx
except ImportError:
    pass
else:
    raise SystemExit("blocking failed")

import importlib
import pkgutil

import numpy as np
import onnx_lrsd.decompose as d
import onnx_lrsd.decompose.stats as s
import onnx_lrsd.decompose.channels as ch

for module in pkgutil.iter_modules(d.__path__):  # every module of the maths room, stats included
    importlib.import_module(f"onnx_lrsd.decompose.{{module.name}}")
assert "onnx_lrsd.decompose.stats" in sys.modules

x = np.random.default_rng(0).standard_normal((2, 3, 6, 6))
w = np.random.default_rng(1).standard_normal((4, 3, 3, 3))
acc = s.GramAccumulator(27)
acc.update(s.im2col(x, (3, 3), pads=(1, 1, 1, 1)))
f = d.whitened_svd(d.conv_to_matrix(w), acc.gram, 4)
assert np.allclose(f.to_dense(), d.conv_to_matrix(w))
consumer = ch.ConsumerStats(acc.gram, acc.mean * acc.count, acc.count, d.conv_to_matrix(w), block=9)
assert ch.select_channels([consumer], 2, "greedy").shape == (2,)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r} and sys.modules[m])
assert not loaded, loaded
print("ok")
"""


def test_decompose_and_stats_import_without_onnx():
    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                          cwd=root, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
