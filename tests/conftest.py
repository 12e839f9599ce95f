"""Shared test setup.

- Fail fast when `onnx_lrsd.passes` is not importable: `passes/` is a top-level directory that
  only installs as `onnx_lrsd.passes` through `pip install -e .`; without it every pipeline
  test would fail with the same ImportError.
- One BLAS thread (unless the environment sets one): on a loaded 2-core machine OpenBLAS's
  threads fight over the cores and a 576×256 SVD takes seconds instead of 40 ms, which makes
  test times meaningless. Set before numpy is imported, and again at run time in case a
  plugin imported numpy first.
- The latency cache of global allocations lives in a temporary directory, never the user's.
"""
import os
import sys

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # `from helpers.graphs import ...` from any test module

try:
    import onnx_lrsd.passes  # noqa: F401,E402
    _IMPORT_ERROR = None
except ImportError as _exc:  # pragma: no cover - depends on the install
    _IMPORT_ERROR = f"onnx_lrsd.passes is not importable ({_exc}): run `pip install -e .[test]` first"

try:
    import threadpoolctl  # noqa: E402

    threadpoolctl.threadpool_limits(int(os.environ["OPENBLAS_NUM_THREADS"]))
except ImportError:  # pragma: no cover - threadpoolctl is optional
    pass


@pytest.fixture(autouse=True, scope="session")
def _private_latency_cache(tmp_path_factory):
    previous = os.environ.get("ONNX_LRSD_CACHE_DIR")
    os.environ["ONNX_LRSD_CACHE_DIR"] = str(tmp_path_factory.mktemp("lrsd-cache"))
    yield
    if previous is None:
        os.environ.pop("ONNX_LRSD_CACHE_DIR", None)
    else:
        os.environ["ONNX_LRSD_CACHE_DIR"] = previous


def pytest_configure(config):
    # exiting here (not at import) gives a one-line message and exit status 2 instead of a
    # "conftest import failed" traceback
    if _IMPORT_ERROR is not None:
        pytest.exit(_IMPORT_ERROR, returncode=2)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow (full zoo runs, minutes)")


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` are skipped unless --runslow is given or -m names them."""
    if config.getoption("--runslow") or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow or -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
