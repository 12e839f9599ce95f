"""A Ray cluster on this machine's loopback: a head and worker nodes started with `ray start`,
as on separate machines, for the cluster test and the scale-out benchmark.

Every node is a separate raylet with its own CPUs and a small object store; the cluster lives
under its own temp dir and is stopped by the ids of its own processes (never `ray stop`, which
stops every Ray on the machine). Token authentication is off: the nodes and the driver share
the loopback only.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import psutil

RAY = str(Path(sys.executable).with_name("ray")) if Path(sys.executable).with_name("ray").is_file() \
    else shutil.which("ray") or "ray"
"""The `ray` command beside this interpreter (a venv with Ray installed), else on the PATH (a venv
using the system site-packages, whose `ray` script is the system's)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackCluster:
    """`worker_nodes` nodes of `cpus_per_node` CPUs joined to a head of `head_cpus` CPUs (0: the
    head only coordinates and holds the driver's objects). Use as a context manager; `address`
    is what `ray.init` / `--ray-address` take."""

    def __init__(self, worker_nodes: int, cpus_per_node: int = 1, head_cpus: int = 1,
                 object_store_mb: int = 128, temp_root: Optional[str] = None):
        self.worker_nodes, self.cpus_per_node, self.head_cpus = worker_nodes, cpus_per_node, head_cpus
        self.object_store_bytes = object_store_mb * 2**20
        self.temp_dir = tempfile.mkdtemp(prefix="lrsd-ray-", dir=temp_root or "/tmp")
        self.address = f"127.0.0.1:{_free_port()}"
        self.env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
        self._saved_auth: Optional[str] = None

    def _ray_start(self, *args: str) -> None:
        common = ["--node-ip-address", "127.0.0.1", "--object-store-memory", str(self.object_store_bytes),
                  "--disable-usage-stats"]
        done = subprocess.run([RAY, "start", *args, *common], env=self.env, capture_output=True, text=True,
                              timeout=180)
        if done.returncode != 0:
            raise RuntimeError(f"ray start {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")

    def start(self) -> "LoopbackCluster":
        self._saved_auth = os.environ.get("RAY_AUTH_MODE")
        os.environ["RAY_AUTH_MODE"] = "disabled"  # the driver, as the nodes
        try:
            port = self.address.rsplit(":", 1)[1]
            self._ray_start("--head", "--port", port, "--num-cpus", str(self.head_cpus), "--include-dashboard=false",
                            "--temp-dir", self.temp_dir)
            for _ in range(self.worker_nodes):
                self._ray_start("--address", self.address, "--num-cpus", str(self.cpus_per_node))
            self._wait_for_nodes(1 + self.worker_nodes)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_for_nodes(self, count: int, timeout: float = 60.0) -> None:
        import ray

        ray.init(address=self.address, log_to_driver=False, logging_level="WARNING")
        try:
            deadline = time.monotonic() + timeout
            while sum(n["Alive"] for n in ray.nodes()) < count:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {sum(n['Alive'] for n in ray.nodes())} of {count} Ray nodes came up")
                time.sleep(0.5)
        finally:
            ray.shutdown()

    def processes(self) -> List[psutil.Process]:
        """The cluster's processes: those naming its temp dir, and their descendants."""
        found = {}
        for proc in psutil.process_iter(["cmdline"]):
            if any(self.temp_dir in part for part in (proc.info["cmdline"] or ())):
                found[proc.pid] = proc
                try:
                    found.update({c.pid: c for c in proc.children(recursive=True)})
                except psutil.NoSuchProcess:
                    pass
        return list(found.values())

    def stop(self) -> None:
        for _ in range(3):  # workers started while the first ones stop are caught by the next sweep
            procs = self.processes()
            if not procs:
                break
            for proc in procs:
                try:
                    proc.terminate()
                except psutil.NoSuchProcess:
                    pass
            _, alive = psutil.wait_procs(procs, timeout=5)
            for proc in alive:
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(alive, timeout=5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        if self._saved_auth is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = self._saved_auth

    def __enter__(self) -> "LoopbackCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
