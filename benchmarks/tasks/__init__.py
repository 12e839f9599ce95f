"""Real models and real tasks shared by every benchmark of the project.

``get_task(name)`` returns a fresh :class:`~benchmarks.tasks.base.Task`; ``TASK_NAMES`` lists the
names. Task modules are imported on demand, so that using one task does not require the
dependencies of the others.
"""

from __future__ import annotations

import importlib

from benchmarks.tasks.base import Task

#: name -> (module, class) of every task.
_REGISTRY: dict[str, tuple[str, str]] = {
    "digits_cnn": ("benchmarks.tasks.digits", "DigitsTask"),
    "ppocr_rec": ("benchmarks.tasks.ocr", "OcrRecTask"),
    "minilm": ("benchmarks.tasks.minilm", "MiniLMTask"),
    "ppocr_cls": ("benchmarks.tasks.ocr_cls", "OcrClsTask"),
}
TASK_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def get_task(name: str) -> Task:
    """A new instance of the task called ``name`` (one of :data:`TASK_NAMES`)."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(TASK_NAMES)}")
    module_name, class_name = _REGISTRY[name]
    task_class = getattr(importlib.import_module(module_name), class_name)
    return task_class()


__all__ = ["TASK_NAMES", "Task", "get_task"]
