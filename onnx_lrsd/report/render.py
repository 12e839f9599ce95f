"""A compression report as a file: JSON, Markdown or self-contained HTML (chosen by suffix).

The Markdown and HTML reports hold the summary, a per-layer table (kind, ranks, residual,
params, MACs, held-out reconstruction error, latency) and plots: per-layer params, error and
latency, and the model-level trade-off where there is more than one point (the stages of a
multi-stage run, a sweep). Plots need matplotlib (the `plot` extra); without it the report is
written without them and says so. HTML embeds its PNGs (base64); Markdown writes them beside
the file as `<stem>-layers.png` and `<stem>-tradeoff.png`.

Latency comes from two places: the in-network per-layer profile of the original and the
compressed model (`LayerProfile`s, kernels mapped back to layers) and, with `--layer-latency`,
each factorized layer timed alone (`LayerReport.latency`).
"""
from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Union

from ..errors import LrsdError
from ..model.io import write_atomic
from ..model.naming import layer_of
from .types import CompressionReport, LayerReport, SweepReport

if TYPE_CHECKING:  # measured by runtime.profile; a report only formats them
    from ..runtime.profile import LayerProfile

REPORT_SUFFIXES = (".json", ".md", ".html", ".htm")
NO_MATPLOTLIB = "plots omitted: matplotlib is not installed (pip install 'onnx-lrsd[plot]')"


def check_report_path(path: Union[str, os.PathLike]) -> Path:
    """The report path, or a one-line LrsdError for an unknown suffix or a missing directory
    (checked before any long work)."""
    path = Path(path)
    if path.suffix.lower() not in REPORT_SUFFIXES:
        raise LrsdError(f"report file must end in {', '.join(REPORT_SUFFIXES)}, got {path.name!r}")
    if not path.parent.is_dir():
        raise LrsdError(f"report directory does not exist: {path.parent}")
    if path.is_dir():
        raise LrsdError(f"report path is a directory: {path}")
    return path


@dataclass(frozen=True)
class LayerRow:
    """One line of the per-layer table: the report's layer and its in-network times (ms
    per run in the original and the compressed model, None without a profile)."""

    layer: LayerReport
    ms_before: Optional[float] = None
    ms_after: Optional[float] = None

    @property
    def residual(self) -> str:
        if not self.layer.residual:
            return ""
        unit = "rows" if self.layer.residual == "rows" else "nnz"
        return f"{self.layer.residual_size:,} {unit}"


def layer_rows(report: CompressionReport, profiles: Optional[Tuple[LayerProfile, LayerProfile]] = None
               ) -> List[LayerRow]:
    rows = []
    for layer in report.layers:
        before = after = None
        if profiles is not None:
            found = [p.layer(layer_of(layer.name)) for p in profiles]
            before, after = (f.ms if f is not None else None for f in found)
        rows.append(LayerRow(layer, before, after))
    return rows


def write_report(path: Union[str, os.PathLike], report: CompressionReport, title: str = "",
                 profiles: Optional[Tuple[LayerProfile, LayerProfile]] = None, sweep: Optional[SweepReport] = None,
                 profile_note: str = "") -> List[Path]:
    """Write `report` to `path` (.json, .md, .html) atomically; returns the files written
    (the Markdown report's PNGs too). `profiles`: in-network per-layer profiles of the
    original and the compressed model; `sweep`: a sweep of the same model for the trade-off
    plot; `profile_note`: why there are no profiles, shown in the report."""
    path = check_report_path(path)
    if path.suffix.lower() == ".json":
        write_atomic(path, report.to_json().encode())
        return [path]
    title = title or "onnx-lrsd compression report"
    plots, note = _plots(report, layer_rows(report, profiles), sweep)
    if path.suffix.lower() == ".md":
        written = []
        images = {}
        for key, png in plots.items():
            image = path.with_name(f"{path.stem}-{key}.png")
            write_atomic(image, png)
            written.append(image)
            images[key] = image.name
        text = markdown_report(report, title, profiles, sweep, images, note, profile_note)
        write_atomic(path, text.encode())
        return [path] + written
    images = {key: "data:image/png;base64," + base64.b64encode(png).decode("ascii") for key, png in plots.items()}
    write_atomic(path, html_report(report, title, profiles, sweep, images, note, profile_note).encode())
    return [path]


def _plots(report: CompressionReport, rows: Sequence[LayerRow], sweep: Optional[SweepReport]
           ) -> Tuple[Dict[str, bytes], str]:
    """PNG bytes by name ("layers", "tradeoff") and a note on what is missing."""
    from .plot import layers_png, tradeoff_png, tradeoff_points

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return {}, NO_MATPLOTLIB
    plots = {"layers": layers_png(rows)} if rows else {}
    notes = []
    if len(tradeoff_points(report, sweep)) >= 2:
        plots["tradeoff"] = tradeoff_png(report, sweep)
    else:
        notes.append("no model-level trade-off plot: one compressed point (onnx-lrsd sweep or "
                     "--stages N draw a curve)")
    return plots, "; ".join(notes)


def _fmt(value: Optional[float], spec: str) -> str:
    return "" if value is None else format(value, spec)


def _layer_cells(row: LayerRow, timed_alone: bool, profiled: bool) -> List[str]:
    layer = row.layer
    cells = [layer.name, layer.op, layer.method, "x".join(map(str, layer.ranks)) or "-", row.residual,
             f"{layer.params_before:,}", f"{layer.params_after:,}", f"{layer.macs_before:,}", f"{layer.macs_after:,}",
             _fmt(layer.data_error, ".3e")]
    if profiled:
        ratio = row.ms_after / row.ms_before if row.ms_before and row.ms_after is not None else None
        cells += [_fmt(row.ms_before, ".3f"), _fmt(row.ms_after, ".3f"), _fmt(ratio, ".2f")]
    if timed_alone:
        latency = layer.latency
        cells += [_fmt(latency.dense_ms, ".3f") if latency else "", _fmt(latency.ms, ".3f") if latency else ""]
    return cells + [layer.reason]


def _layer_header(timed_alone: bool, profiled: bool) -> List[str]:
    header = ["layer", "op", "kind", "ranks", "residual", "params before", "params after", "MACs before",
              "MACs after", "error"]
    if profiled:
        header += ["ms in model, before", "after", "after / before"]
    if timed_alone:
        header += ["ms alone, dense", "as written"]
    return header + ["note"]


def _summary_rows(report: CompressionReport) -> List[List[str]]:
    return [["parameters", f"{report.before.params:,}", f"{report.after.params:,}", f"{report.params_ratio:.3f}"],
            ["MACs", f"{report.before.macs:,}", f"{report.after.macs:,}", f"{report.macs_ratio:.3f}"],
            ["file bytes", f"{report.before.file_bytes:,}", f"{report.after.file_bytes:,}", f"{report.size_ratio:.3f}"]]


def _latency_rows(profiles: Tuple[LayerProfile, LayerProfile]) -> List[List[str]]:
    before, after = profiles
    return [["kernel time per run, ms", f"{before.op_ms:.3f}", f"{after.op_ms:.3f}", f"{after.op_ms / before.op_ms:.3f}"],
            ["run time per run, ms", f"{before.run_ms:.3f}", f"{after.run_ms:.3f}", f"{after.run_ms / before.run_ms:.3f}"],
            ["arena peak, MB", f"{before.arena_peak_bytes / 2**20:.1f}", f"{after.arena_peak_bytes / 2**20:.1f}",
             f"{after.arena_peak_bytes / before.arena_peak_bytes:.3f}" if before.arena_peak_bytes else ""]]


def _profile_text(profiles: Optional[Tuple[LayerProfile, LayerProfile]], note: str) -> str:
    if profiles is None:
        return f"No in-network latency: {note}" if note else ""
    before = profiles[0]
    return (f"In-network latency: onnxruntime's profiler, kernels' medians over {before.runs} interleaved runs of "
            f"both models at batch {before.batch}, "
            f"{before.threads} threads, kernels mapped back to the original layers (a factorized layer's chain "
            f"counts as the layer; fused activations count with the layer they run in).")


def _intro(report: CompressionReport) -> str:
    """What the run did: layers factorized and / or channel groups narrowed (a width-only run
    factorizes nothing and says only what it narrowed)."""
    said = []
    if report.layers or not report.widths:
        factorized = sum(layer.method != "dense" for layer in report.layers)
        said.append(f"{factorized} of {len(report.layers)} target layers factorized; {len(report.skipped)} weight "
                    f"layers skipped. Error: held-out relative reconstruction error of the layer's output on the "
                    f"calibration data (none for data-free fits).")
    if report.widths:
        narrowed = sum(w.kept < w.channels for w in report.widths)
        kept, channels = sum(w.kept for w in report.widths), sum(w.channels for w in report.widths)
        said.append(f"{narrowed} of {len(report.widths)} channel groups narrowed, {kept:,} of {channels:,} channels "
                    f"kept (attention heads count as channels); the layers reading them refitted by least squares "
                    f"on the calibration data.")
    return " ".join(said)


def _width_rows(report: CompressionReport) -> List[List[str]]:
    return [[w.name, w.kind, f"{w.channels:,}", f"{w.kept:,}", f"{w.kept / w.channels:.3f}"] for w in report.widths]


_WIDTH_HEADER = ["group", "kind", "channels", "kept", "ratio"]


def markdown_report(report: CompressionReport, title: str, profiles=None, sweep=None, images=None, plot_note: str = "",
                    profile_note: str = "") -> str:
    """The report as Markdown; `images` maps plot names to the image paths to link."""
    images = images or {}
    timed_alone = any(layer.latency is not None for layer in report.layers)
    rows = layer_rows(report, profiles)

    def table(header, body):
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(":---" if i == 0 else "---:"
                                                                  for i in range(len(header))) + "|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |" for cells in body]
        return "\n".join(lines)

    parts = [f"# {title}", "", table(["", "before", "after", "ratio"], _summary_rows(report)
                                     + (_latency_rows(profiles) if profiles else [])),
             "", "```", report.to_text(), "```", "", _intro(report), "", _profile_text(profiles, profile_note)]
    if not images and plot_note == NO_MATPLOTLIB:
        parts += ["", f"*{NO_MATPLOTLIB}*"]
    for key, caption in (("layers", "Per-layer parameters, error and latency"),
                         ("tradeoff", "Model-level trade-off")):
        if key in images:
            parts += ["", f"![{caption}]({images[key]})"]
    if plot_note and plot_note != NO_MATPLOTLIB:
        parts += ["", f"*{plot_note}*"]
    if report.widths:
        parts += ["", "## Channel groups", "", table(_WIDTH_HEADER, _width_rows(report))]
    if report.layers or not report.widths:
        parts += ["", "## Layers", "", table(_layer_header(timed_alone, profiles is not None),
                                             [_layer_cells(r, timed_alone, profiles is not None) for r in rows])]
    if report.skipped:
        parts += ["", "## Skipped weight layers", "",
                  table(["layer", "op", "reason"], [[s.name, s.op, s.reason] for s in report.skipped])]
    if sweep is not None:
        parts += ["", "## Sweep", "", sweep.to_markdown()]
    return "\n".join(parts) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;font-size:13px;
margin:1em 0}th,td{border:1px solid #ccc;padding:3px 8px}td.n{text-align:right;font-variant-numeric:tabular-nums}
th{background:#f2f2f2;position:sticky;top:0}tr.dense td{color:#777}pre{background:#f7f7f7;padding:1em;
overflow-x:auto}img{max-width:100%}.note{color:#555;font-style:italic}"""


def html_report(report: CompressionReport, title: str, profiles=None, sweep=None, images=None, plot_note: str = "",
                profile_note: str = "") -> str:
    """The report as one self-contained HTML page; `images` maps plot names to data URIs."""
    images = images or {}
    timed_alone = any(layer.latency is not None for layer in report.layers)
    esc = html.escape

    def table(header, body, classes=None):
        out = ["<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
        for i, cells in enumerate(body):
            css = f' class="{classes[i]}"' if classes and classes[i] else ""
            out.append(f"<tr{css}>" + "".join(
                f"<td{' class=n' if j > 0 and _numeric(c) else ''}>{esc(c)}</td>" for j, c in enumerate(cells))
                + "</tr>")
        return "\n".join(out + ["</table>"])

    rows = layer_rows(report, profiles)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
             f"<style>{_CSS}</style></head><body>", f"<h1>{esc(title)}</h1>",
             table(["", "before", "after", "ratio"], _summary_rows(report) + (_latency_rows(profiles) if profiles else [])),
             f"<pre>{esc(report.to_text())}</pre>", f"<p>{esc(_intro(report))}</p>",
             f"<p>{esc(_profile_text(profiles, profile_note))}</p>"]
    if plot_note:
        parts.append(f"<p class='note'>{esc(plot_note)}</p>")
    for key, caption in (("layers", "Per-layer parameters, error and latency"),
                         ("tradeoff", "Model-level trade-off")):
        if key in images:
            parts.append(f"<figure><img alt='{esc(caption)}' src='{images[key]}'><figcaption>{esc(caption)}"
                         f"</figcaption></figure>")
    if report.widths:
        parts += ["<h2>Channel groups</h2>", table(_WIDTH_HEADER, _width_rows(report))]
    if report.layers or not report.widths:
        parts += ["<h2>Layers</h2>", table(_layer_header(timed_alone, profiles is not None),
                                           [_layer_cells(r, timed_alone, profiles is not None) for r in rows],
                                           ["dense" if r.layer.method == "dense" else "" for r in rows])]
    if report.skipped:
        parts += ["<h2>Skipped weight layers</h2>",
                  table(["layer", "op", "reason"], [[s.name, s.op, s.reason] for s in report.skipped])]
    if sweep is not None:
        parts += ["<h2>Sweep</h2>", table(
            ["target params", "params", "MACs", "speedup", "output error", "Pareto"],
            [[f"{p.target_params:g}", f"{p.params_ratio:.3f}", f"{p.macs_ratio:.3f}", f"{p.speedup:.3f}",
              f"{p.output_error:.3e}", "yes" if p.pareto else ""] for p in sweep.points])]
    return "\n".join(parts + ["</body></html>"]) + "\n"


def _numeric(text: str) -> bool:
    return bool(text) and text.replace(",", "").replace(".", "").replace("e-", "").replace("e+", "").lstrip("-").isdigit()
