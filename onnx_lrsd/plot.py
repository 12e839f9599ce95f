"""The sweep's PNG: speedup and size against output error (and the metric when measured)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Union

from .errors import LrsdError
from .report import SweepReport


def require_matplotlib() -> None:
    """LrsdError unless matplotlib imports (checked before long work, not after)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise LrsdError("plots need matplotlib: pip install 'onnx-lrsd[plot]'") from None


def plot_sweep(report: SweepReport, path: Union[str, os.PathLike], title: str = "") -> Path:
    """Write the sweep's Pareto plot to `path` (PNG, written atomically); needs matplotlib."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter
    points = sorted(report.points, key=lambda p: p.output_error)
    with_metric = report.metric_original is not None
    fig, axes = plt.subplots(1, 3 if with_metric else 2, figsize=(13 if with_metric else 9, 3.8))
    errors = [p.output_error for p in points]
    panels = [("speedup", [p.speedup for p in points], f"speedup (batch {report.batch}, {report.threads} threads)"),
              ("params", [p.params_ratio for p in points], "params after / before")]
    for ax, (_, values, label) in zip(axes, panels):
        ax.plot(errors, values, "o-", color="tab:blue")
        ax.plot([e for e, p in zip(errors, points) if p.pareto], [v for v, p in zip(values, points) if p.pareto],
                "o", color="tab:red", label="Pareto (speed vs error)")
        for e, v, p in zip(errors, values, points):
            ax.annotate(f"{p.target_params:g}", (e, v), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a short log axis overlap
        ax.set_xlabel("relative output error")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if with_metric:
        ax = axes[2]
        ax.plot([p.params_ratio for p in points], [p.metric for p in points], "o-", color="tab:green")
        ax.axhline(report.metric_original, color="gray", linestyle="--", label="original")
        ax.set_xlabel("params after / before")
        ax.set_ylabel("metric")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title or "onnx-lrsd sweep (labels: target params)")
    fig.tight_layout()
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
