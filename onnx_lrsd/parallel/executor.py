"""Where the pipeline's independent work runs: this process, a process pool on this machine, or
a Ray cluster.

The pipeline hands an executor pure functions of picklable arguments (`Task`s, run by `imap` /
`map`, results in task order) and large read-only values once (`share`, whose handle is passed
as a task argument). Which executor runs is decided once, from the config (`open_executor`);
nothing else knows it. A task whose worker dies (killed process, lost node) is run again, up to
`retries` times; a result is only used once its task has completed, so a retry cannot corrupt
the output. A task's own error (bad data, onnxruntime failure) is raised as it is, not retried.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
from abc import ABC, abstractmethod
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from threadpoolctl import threadpool_limits

from ..config import EXECUTORS
from ..errors import LrsdError

log = logging.getLogger(__name__)

RETRIES = 3
"""Times a task is run again after its worker died."""

MEMORY_SHARE = 0.8
"""Share of the available memory the process pool lets its running tasks' estimates fill."""


@dataclass(frozen=True)
class Task:
    """One call ``fn(*args)``: `memory` is its estimated peak in bytes (big layers are
    scheduled where and when that much is free), `cpus` the cores it keeps busy."""

    args: tuple
    memory: int = 0
    cpus: int = 1


class Executor(ABC):
    """Runs tasks; `slots` is how many run at once (1: one after the other, in this process)."""

    slots: int = 1

    def share(self, value: Any) -> Any:
        """A handle to pass as a task argument in place of `value` (a large read-only value:
        shipped to the workers once, not per task)."""
        return value

    @abstractmethod
    def imap(self, fn: Callable, tasks: Sequence[Task]) -> Iterator[Any]:
        """fn(*task.args) for every task, yielded in task order."""

    def map(self, fn: Callable, tasks: Sequence[Task]) -> List[Any]:
        return list(self.imap(fn, tasks))

    @property
    def task_threads(self) -> int:
        """onnxruntime threads a task may use (0: the runtime's default, all cores)."""
        return 0

    def local(self, value: Any) -> Any:
        """`value` when tasks run in this process (it may then be a task argument as it is,
        picklable or not: a progress callback, a graph), else None."""
        return None

    def close(self) -> None:
        """Release the workers."""

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class InProcessExecutor(Executor):
    """Each task in this process, in order, when its result is asked for."""

    def imap(self, fn: Callable, tasks: Sequence[Task]) -> Iterator[Any]:
        return (fn(*task.args) for task in tasks)

    def local(self, value: Any) -> Any:
        return value


def run_task(fn: Callable, blas_threads: Optional[int], *args) -> Any:
    """What a worker runs: `fn(*args)` with the run's BLAS thread limit."""
    with threadpool_limits(limits=blas_threads, user_api="blas"):
        return fn(*args)


def available_memory() -> Optional[int]:
    """Bytes of memory available on this machine (None where the OS does not say)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


class PoolExecutor(Executor):
    """`workers` processes on this machine (spawned: forking a process that holds onnxruntime
    and BLAS threads can hang). Tasks start while the running ones' memory estimates fit in
    `MEMORY_SHARE` of the available memory (a task larger than that runs alone). Arguments,
    shared values included, are pickled per task."""

    def __init__(self, workers: int, blas_threads: Optional[int] = 1, retries: int = RETRIES):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 2:
            raise LrsdError(f"a process pool needs at least 2 workers, got {workers!r}")
        self.slots, self.blas_threads, self.retries = workers, blas_threads, retries
        available = available_memory()
        self.memory_budget = int(MEMORY_SHARE * available) if available else None
        self._pool: Optional[ProcessPoolExecutor] = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.slots, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    @property
    def task_threads(self) -> int:
        return 1

    def imap(self, fn: Callable, tasks: Sequence[Task]) -> Iterator[Any]:
        pending = list(range(len(tasks)))  # not started, in order
        running: Dict[Any, int] = {}
        done: Dict[int, Any] = {}
        deaths = [0] * len(tasks)
        next_out = 0
        while next_out < len(tasks):
            while pending and self._fits(tasks, running, pending[0]):
                index = pending.pop(0)
                try:
                    running[self._executor().submit(run_task, fn, self.blas_threads, *tasks[index].args)] = index
                except BrokenProcessPool:  # a worker died since the last wait
                    if running:  # their futures report it
                        pending.insert(0, index)
                        break
                    self._restart(tasks, running, pending, deaths, [index], fn)
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            broken = []
            for future in finished:
                index = running.pop(future)
                try:
                    done[index] = future.result()
                except BrokenProcessPool:
                    broken.append(index)
            if broken:
                self._restart(tasks, running, pending, deaths, broken, fn)
            while next_out in done:
                yield done.pop(next_out)
                next_out += 1

    def _fits(self, tasks: Sequence[Task], running: Dict[Any, int], index: int) -> bool:
        if len(running) >= self.slots:
            return False
        if not running or self.memory_budget is None:
            return True
        return sum(tasks[i].memory for i in running.values()) + tasks[index].memory <= self.memory_budget

    def _restart(self, tasks, running, pending, deaths, broken, fn) -> None:
        """A worker died: the pool is gone with every running task; those are run again."""
        lost = sorted(broken + list(running.values()))
        running.clear()
        for index in lost:
            deaths[index] += 1
            if deaths[index] > self.retries:
                raise LrsdError(f"a worker died {deaths[index]} times running {getattr(fn, '__name__', fn)} "
                                f"(task {index}); giving up")
        log.warning("a pool worker died; running %d task(s) again", len(lost))
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None
        pending[:0] = lost

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class RayExecutor(Executor):
    """Tasks on a Ray cluster: the one at `address` ("auto", "host:port", "ray://…"), or
    without an address the one `ray.init()` finds or starts on this machine. A Ray already
    initialised in this process is used as it is and left running. Shared values go to the
    object store once (`ray.put`); each task asks for its `cpus` and, when estimated, its
    `memory` (capped at the largest node's), so big layers run where they fit. Tasks whose
    worker or node dies are retried by Ray (`max_retries`); their errors are not."""

    def __init__(self, address: Optional[str] = None, blas_threads: Optional[int] = 1, retries: int = RETRIES,
                 **init_options):
        try:
            import ray
        except ImportError:
            raise LrsdError("the ray executor needs Ray: pip install 'onnx_lrsd[ray]'") from None
        self._ray = ray
        self.blas_threads, self.retries = blas_threads, retries
        self._owned = not ray.is_initialized()
        if self._owned:
            try:
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, **init_options)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                where = address or "a local Ray"
                raise LrsdError(f"cannot connect to {where}: {str(exc).splitlines()[0]}") from None
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        self.slots = max(1, int(sum(n.get("CPU", 0) for n in nodes)))
        self._max_cpus = max([int(n.get("CPU", 0)) for n in nodes] + [1])
        self._max_memory = max([int(n.get("memory", 0)) for n in nodes] + [0])
        self._remote = ray.remote(run_task)
        log.info("Ray executor: %d node(s), %d CPU(s)", len(nodes), self.slots)

    def share(self, value: Any) -> Any:
        return self._ray.put(value)

    @property
    def task_threads(self) -> int:
        return 1

    def _options(self, task: Task) -> Dict[str, Any]:
        options: Dict[str, Any] = {"num_cpus": min(max(task.cpus, 1), self._max_cpus),
                                   "max_retries": self.retries, "retry_exceptions": False}
        if task.memory and self._max_memory:
            options["memory"] = min(int(task.memory), self._max_memory)
        return options

    def remote_function(self, fn: Callable):
        """The remote function a task runs (``run_task(fn, blas_threads, *args)``)."""
        return self._remote

    def imap(self, fn: Callable, tasks: Sequence[Task]) -> Iterator[Any]:
        remote = self.remote_function(fn)
        refs = [remote.options(**self._options(t)).remote(fn, self.blas_threads, *t.args) for t in tasks]
        return self._results(fn, refs)

    def _results(self, fn: Callable, refs: List[Any]) -> Iterator[Any]:
        """Results in order, each reference dropped before its result is handed on (the object
        store may then free it). Tasks are never cancelled: a run given up ends with its Ray
        job, and cancelling a task as it completes can abort the driver (Ray 2.x)."""
        from ray import exceptions

        for index in range(len(refs)):
            ref, refs[index] = refs[index], None
            try:
                result = self._ray.get(ref)
            except exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, Exception):
                    raise cause from None
                raise LrsdError(f"{getattr(fn, '__name__', fn)} failed on Ray: {str(exc).splitlines()[0]}") from None
            except (exceptions.WorkerCrashedError, exceptions.NodeDiedError,
                    exceptions.ObjectLostError, exceptions.OutOfMemoryError) as exc:
                raise LrsdError(f"{getattr(fn, '__name__', fn)} failed on Ray after {self.retries} "
                                f"retries: {str(exc).splitlines()[0]}") from None
            del ref
            yield result

    def close(self) -> None:
        if self._owned and self._ray.is_initialized():
            self._ray.shutdown()
        self._owned = False


def open_executor(kind: str = "local", workers: int = 1, ray_address: Optional[str] = None,
                  blas_threads: Optional[int] = 1) -> Executor:
    """The executor of a run: "local" (in this process, or a process pool with `workers` > 1)
    or "ray" (the cluster at `ray_address`, else a local Ray)."""
    if kind == "local":
        return InProcessExecutor() if workers <= 1 else PoolExecutor(workers, blas_threads)
    if kind == "ray":
        return RayExecutor(ray_address, blas_threads)
    raise LrsdError(f"unknown executor {kind!r} (choose from {', '.join(EXECUTORS)})")


def executor_for(config) -> Executor:
    """The executor a `CompressConfig` asks for."""
    return open_executor(config.executor, config.workers, config.ray_address, config.blas_threads)
