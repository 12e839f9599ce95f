"""Prepare every benchmark task and log the original model's metrics and evaluation time.

Run from the repository root: ``python -m benchmarks.check_tasks [TASK ...]``. Besides
``evaluate``, it runs one calibration feed and one latency batch through the original model, so
that a broken feed shows up here rather than inside a benchmark.
"""

from __future__ import annotations

import argparse
import logging
import time

from benchmarks.tasks import TASK_NAMES, get_task
from benchmarks.tasks.base import make_session

LOGGER = logging.getLogger("benchmarks.check_tasks")


def check(name: str) -> dict[str, float]:
    """Prepare ``name``, exercise its feeds and return the original model's metrics."""
    task = get_task(name)
    start = time.perf_counter()
    task.prepare()
    LOGGER.info("%s: prepared %s in %.1f s", name, task.model_path, time.perf_counter() - start)

    session = make_session(task.model_path)
    calibration = task.calibration_feeds(n_samples=16, batch_size=8)
    for feeds in (*calibration, task.latency_feeds(batch=4)):
        session.run(None, feeds)
    shapes = {key: value.shape for key, value in calibration[0].items()}
    LOGGER.info("%s: calibration feed shapes %s, mask_input=%s", name, shapes, task.mask_input)

    start = time.perf_counter()
    metrics = task.evaluate(task.model_path)
    elapsed = time.perf_counter() - start
    formatted = ", ".join(f"{key}={value:.4f}" for key, value in metrics.items())
    LOGGER.info("%s: original model %s (evaluate took %.1f s)", name, formatted, elapsed)
    return metrics


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "tasks", nargs="*", metavar="TASK", help=f"tasks to check (default: all of {', '.join(TASK_NAMES)})"
    )
    args = parser.parse_args()
    unknown = sorted(set(args.tasks) - set(TASK_NAMES))
    if unknown:
        parser.error(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASK_NAMES)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for name in args.tasks or TASK_NAMES:
        check(name)


if __name__ == "__main__":
    main()
