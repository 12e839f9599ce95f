"""PNGs: the sweep's speedup and size against output error (and the metric when measured);
recovery's held-out loss curves."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from ..errors import LrsdError
from ..model.io import write_atomic
from .types import SweepReport


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
    return write_atomic(path, _figure_png(fig))


def _figure_png(fig) -> bytes:
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=100)
    finally:
        plt.close(fig)
    return buffer.getvalue()


def _pyplot():
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _short(name: str, width: int = 32) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def layers_png(rows) -> bytes:
    """Per-layer panels in graph order (rows: `render.LayerRow`): parameters before and after,
    held-out reconstruction error (data-aware fits only), and latency — in-network profile
    before and after, else each layer timed alone (dense and as written) — where measured.
    PNG bytes; needs matplotlib."""
    plt = _pyplot()
    import numpy as np

    names = [_short(r.layer.name) for r in rows]
    x = np.arange(len(rows))
    profiled = any(r.ms_before is not None for r in rows)
    alone = any(r.layer.latency is not None for r in rows)
    with_error = any(r.layer.data_error is not None for r in rows)  # data-free fits have none
    panels = ["params"] + (["error"] if with_error else []) + (["latency"] if profiled or alone else [])
    fig, grid = plt.subplots(len(panels), 1, figsize=(max(8.0, 0.28 * len(rows) + 2), 2.6 * len(panels) + 1.6),
                             sharex=True, squeeze=False)
    axes = list(grid[:, 0])
    width = 0.4
    ax = axes[0]
    ax.bar(x - width / 2, [r.layer.params_before for r in rows], width, label="before", color="tab:gray")
    ax.bar(x + width / 2, [r.layer.params_after for r in rows], width, label="after", color="tab:blue")
    ax.set_yscale("log")
    ax.set_ylabel("parameters")
    ax.legend(fontsize=8)
    if with_error:
        ax = axes[panels.index("error")]
        errors = [r.layer.data_error if r.layer.data_error is not None else np.nan for r in rows]
        ax.bar(x, errors, 0.6, color="tab:red")
        if np.nanmax(errors) > 0:
            ax.set_yscale("log")
        ax.set_ylabel("reconstruction error")
    if "latency" in panels:
        ax = axes[panels.index("latency")]
        if profiled:
            before = [r.ms_before if r.ms_before is not None else np.nan for r in rows]
            after = [r.ms_after if r.ms_after is not None else np.nan for r in rows]
            labels, ylabel = ("original", "compressed"), "ms in the model"
        else:
            before = [r.layer.latency.dense_ms if r.layer.latency else np.nan for r in rows]
            after = [r.layer.latency.ms if r.layer.latency else np.nan for r in rows]
            labels, ylabel = ("dense", "as written"), "ms alone"
        ax.bar(x - width / 2, before, width, label=labels[0], color="tab:gray")
        ax.bar(x + width / 2, after, width, label=labels[1], color="tab:green")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
    axes[-1].set_xticks(x)
    axes[-1].set_xticklabels(names, rotation=70, ha="right", fontsize=7)
    fig.suptitle("per layer (graph order)")
    fig.tight_layout()
    return _figure_png(fig)


def tradeoff_points(report, sweep=None) -> list:
    """(params ratio, largest relative output error, label, on the Pareto front) of the
    compressed model, each stage of a multi-stage run and each sweep point, without
    duplicates; points without a measured output error are left out."""
    points = []
    for stage in report.stages:
        if stage.output_errors:
            points.append((stage.params_ratio, max(stage.output_errors.values()), f"stage {stage.stage}", False))
    if report.output_errors:
        final = (report.params_ratio, max(report.output_errors.values()))
        if not any(abs(p[0] - final[0]) < 1e-12 and abs(p[1] - final[1]) < 1e-12 for p in points):
            points.append(final + ("this model", False))
        else:
            points[-1] = points[-1][:2] + (points[-1][2] + " (this model)", False)
    if sweep is not None:
        points += [(p.params_ratio, p.output_error, f"sweep {p.target_params:g}", p.pareto) for p in sweep.points]
    return points


def tradeoff_png(report, sweep=None) -> bytes:
    """Output error against the params ratio for `tradeoff_points`, the Pareto front of the
    sweep marked. PNG bytes; needs matplotlib."""
    plt = _pyplot()
    points = tradeoff_points(report, sweep)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    swept = sorted((p for p in points if p[2].startswith("sweep")), key=lambda p: p[0])
    if swept:
        ax.plot([p[0] for p in swept], [p[1] for p in swept], "o-", color="tab:blue", label="sweep")
        front = [p for p in swept if p[3]]
        ax.plot([p[0] for p in front], [p[1] for p in front], "o", color="tab:red", label="Pareto (speed vs error)")
    staged = [p for p in points if p[2].startswith("stage")]
    if staged:
        ax.plot([p[0] for p in staged], [p[1] for p in staged], "s--", color="tab:orange", label="stages")
    this = [p for p in points if p[2] == "this model"]
    if this:
        ax.plot([p[0] for p in this], [p[1] for p in this], "*", markersize=14, color="tab:green", label="this model")
    for params, error, label, _ in points:
        ax.annotate(label.replace("sweep ", ""), (params, error), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if all(p[1] > 0 for p in points):
        ax.set_yscale("log")  # matplotlib labels minor ticks itself when the range is under a decade
    ax.set_xlabel("params after / before")
    ax.set_ylabel("relative output error")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("model-level trade-off")
    fig.tight_layout()
    return _figure_png(fig)


def plot_recovery(curves, path: Union[str, os.PathLike], title: str = "") -> Path:
    """Write held-out loss against step for each recovery in `curves` ({label: RecoveryReport
    or its `curve`}) to `path` (PNG, written atomically); needs matplotlib."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for label, curve in curves.items():
        points = getattr(curve, "curve", curve)
        ax.plot([s for s, _ in points], [l for _, l in points], "o-", markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return write_atomic(path, _figure_png(fig))
