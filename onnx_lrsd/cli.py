"""The `onnx-lrsd` command line: inspect, compress, recover, bench, sweep.

Exit codes: 0 success, 1 failure (bad model, bad data, runtime error), 2 usage error (an
option out of range), 3 nothing to compress (no layer factorized; nothing written), 4 output
error above --max-output-error (nothing written; --accept-error writes it), 130 interrupted
(Ctrl-C), 143 terminated (SIGTERM). Every command takes `--json` for machine-readable output
on stdout.

Commands run in a worker thread; the main thread only waits, so Ctrl-C or SIGTERM ends the
process within `POLL_S` even inside a long BLAS call: pending temporary files and outputs
this command created are removed first, then the process leaves (`os._exit`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
import threading
import typing
from pathlib import Path
from typing import Callable, Optional

import click

from .config import (COMPRESS, FULL_RANK, RECOVER, SWEEP, SWEEP_POINTS, CliOption, CompressConfig, LayerOverride,
                     load_config_file, parse_dim, parse_duration)
from .errors import LrsdError, UsageError
from .recover.types import (AUGMENT_CHOICES, DEFAULT_STEPS, LEVEL_CHOICES, LOSS_CHOICES, STEP_SCALE_CHOICES,
                            TRAINABLE_CHOICES, RecoverConfig)

log = logging.getLogger("onnx_lrsd")

POLL_S = 0.2
"""How often the main thread looks for a signal while the command runs."""


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class Terminated(BaseException):
    """SIGTERM, raised where the program is so that cleanup runs as for Ctrl-C."""


_SIGNALLED = {"SIGINT": False, "SIGTERM": False}
"""Signals received by the running command: Python drops the exception a signal raises inside
a destructor, so the command also checks these before it keeps its output."""


_LEAVE = threading.Event()
"""Set by the signal handlers while a command runs in its worker thread: the main thread
cleans up and leaves."""

_NEW_OUTPUTS: list = []
"""(path, identity before the command) of the outputs the running command may create."""


def _note_terminated(signum, frame) -> None:
    _SIGNALLED["SIGTERM"] = True
    _LEAVE.set()


def _note_interrupted(signum, frame) -> None:
    _SIGNALLED["SIGINT"] = True
    _LEAVE.set()


def _leave_now() -> None:
    """On a signal while the worker computes: remove pending temporary files and the outputs
    this command created, say so, and end the process (the worker may be inside BLAS)."""
    from .model.io import discard_pending

    discard_pending()
    for output, before in list(_NEW_OUTPUTS):
        if _identity(output) != before:
            for path in (output, output.with_name(output.name + ".data")):
                path.unlink(missing_ok=True)
    terminated = _SIGNALLED["SIGTERM"]
    click.echo(f"error: {'terminated' if terminated else 'interrupted'}; no output written", err=True)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(143 if terminated else 130)


def _in_worker(command, args, kwargs):
    """Run `command` in a worker thread while the main thread waits for it or a signal;
    returns its value or raises what it raised."""
    outcome = {}

    def body():
        try:
            outcome["value"] = command(*args, **kwargs)
        except BaseException as exc:  # handed to the main thread
            outcome["error"] = exc

    _LEAVE.clear()
    worker = threading.Thread(target=body, name="onnx-lrsd-command", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(POLL_S)
        if _LEAVE.is_set() and worker.is_alive():
            _leave_now()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _raise_if_signalled() -> None:
    if _SIGNALLED["SIGTERM"]:
        raise Terminated()
    if _SIGNALLED["SIGINT"]:
        raise KeyboardInterrupt


def guarded(command):
    """Turn library errors into one line on stderr and exit code 1 (130 on Ctrl-C, 143 on
    SIGTERM)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        _SIGNALLED.update(SIGINT=False, SIGTERM=False)
        _NEW_OUTPUTS.clear()
        previous = _on_signals(_note_terminated, _note_interrupted)
        try:
            if previous is None:  # not the main thread: no handlers, run here
                return command(*args, **kwargs)
            return _in_worker(command, args, kwargs)
        except LrsdError as exc:
            _fail(str(exc).splitlines()[0] if str(exc) else "failed", exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted; no output written", 130)
        except Terminated:
            _fail("terminated; no output written", 143)
        except MemoryError:
            _fail("out of memory")
        finally:
            if previous is not None:
                _on_signals(*previous)

    return wrapper


def _on_signals(on_term, on_int):
    """Install handlers for SIGTERM and SIGINT (main thread only); returns the previous ones."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    # signal.signal returns None for a handler installed outside Python: restored as the default
    return (signal.signal(signal.SIGTERM, on_term or signal.SIG_DFL),
            signal.signal(signal.SIGINT, on_int or signal.SIG_DFL))


def _identity(path: Path):
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _unless_completed(output: Path):
    """A context that removes `output` (and its data file) when the block fails after
    writing it: a failed or interrupted command leaves no new output behind."""
    import contextlib

    before = _identity(output)
    _NEW_OUTPUTS.append((output, before))

    @contextlib.contextmanager
    def block():
        try:
            yield
        except BaseException:
            if _identity(output) != before:
                for path in (output, output.with_name(output.name + ".data")):
                    path.unlink(missing_ok=True)
            raise

    return block()


def _usage(build):
    """`build()`, its `LrsdError` (an option or config value out of range) as a usage error."""
    try:
        return build()
    except UsageError:
        raise
    except LrsdError as exc:
        raise UsageError(str(exc)) from None


def _parse_ranks(values) -> tuple:
    overrides = []
    for item in values:
        name, sep, rank = item.rpartition("=")
        if not sep or not name or not (rank.isdigit() or rank == FULL_RANK):
            raise click.BadParameter(f"expected layer=rank (rank an integer or 'full'), got {item!r}",
                                     param_hint="--rank")
        overrides.append(LayerOverride(name, rank=FULL_RANK if rank == FULL_RANK else int(rank)))
    return tuple(overrides)


def _parsed_by(parse, multiple: bool):
    """A click callback applying `parse` (to each value when repeatable); None when not given."""

    def callback(ctx, param, value):
        if value is None or (multiple and not value):
            return None
        try:
            return tuple(parse(v) for v in value) if multiple else parse(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None

    return callback


def _default_text(default) -> str:
    if default in (None, False, ()):
        return ""
    if default is True:
        return " [on]"
    return f" [{default:g}]" if isinstance(default, float) else f" [{default}]"


def _config_option(field: dataclasses.Field, hint) -> Callable:
    """The click option of a `CompressConfig` field from its `CliOption` metadata (default None:
    a value not given leaves the config file's or the default)."""
    cli: CliOption = field.metadata["cli"]
    flag = cli.flag or "--" + field.name.replace("_", "-")
    kwargs = dict(default=None, metavar=cli.metavar, help=cli.help + _default_text(field.default))
    hint = next((h for h in getattr(hint, "__args__", ()) if h is not type(None)), hint)
    if hint is bool:
        if field.default:
            flag = f"{flag}/--no-{flag[2:]}"
        else:
            kwargs["is_flag"] = True
    elif cli.parse is not None:
        kwargs.update(callback=_parsed_by(cli.parse, cli.multiple), multiple=cli.multiple)
        if cli.flag_value is not None:
            kwargs.update(is_flag=False, flag_value=cli.flag_value)
    elif cli.choices is not None:
        short = {value: name for name, value in cli.aliases}
        kwargs["type"] = click.Choice([short.get(c, c) for c in cli.choices])
        if cli.aliases:
            kwargs["callback"] = _parsed_by(lambda name: dict(cli.aliases).get(name, name), False)
    elif hint is int and cli.minimum is not None:
        kwargs["type"] = click.IntRange(min=cli.minimum)
    elif hint in (int, float):
        kwargs["type"] = hint
    return click.option(flag, field.name, **kwargs)


def config_options(command_name: str):
    """Give a click command one option per `CompressConfig` field whose `CliOption` lists
    `command_name` (in field order, after the command's own options); the command receives
    the given ones as `options` (field -> value)."""
    hints = typing.get_type_hints(CompressConfig)
    fields = [f for f in dataclasses.fields(CompressConfig) if command_name in getattr(
        f.metadata.get("cli"), "commands", ())]

    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            given = {f.name: kwargs.pop(f.name) for f in fields}
            return command(*args, options={k: v for k, v in given.items() if v is not None}, **kwargs)

        for field in reversed(fields):
            wrapper = _config_option(field, hints[field.name])(wrapper)
        return wrapper

    return decorate


def _emit_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _progress_printer(quiet: bool):
    """A progress callback drawing one click progress bar per stage on stderr (a terminal)."""
    if quiet or not sys.stderr.isatty():
        return None
    state = {"stage": None, "bar": None}

    def progress(stage: str, done: int, total: int) -> None:
        if state["stage"] != stage:
            if state["bar"] is not None:
                state["bar"].render_finish()
            state["stage"] = stage
            state["bar"] = click.progressbar(length=total, label=f"{stage:<12}", file=sys.stderr,
                                             show_pos=True, show_eta=False)
            state["bar"].render_progress()
        bar = state["bar"]
        bar.update(done - bar.pos)
        if done >= total:
            bar.render_finish()
            state.update(stage=None, bar=None)

    return progress


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnx_lrsd")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Compress ONNX models by low-rank + sparse decomposition, verified in onnxruntime."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    _quiet_graphsurgeon(verbose)
    _quiet_onnxruntime(verbose)


def _quiet_onnxruntime(verbose: int) -> None:
    """onnxruntime's own log (coloured warnings such as CleanUnusedInitializersAndNodeArgs or
    VerifyOutputSizes) stays off the terminal below errors; -vv shows its warnings."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(2 if verbose >= 2 else 3)


def _quiet_graphsurgeon(verbose: int) -> None:
    """onnx-graphsurgeon prints its warnings on stdout, which would corrupt `--json` output:
    only its errors are shown (all of it with -vv)."""
    from onnx_graphsurgeon.logger import G_LOGGER

    G_LOGGER.severity = G_LOGGER.VERBOSE if verbose >= 2 else G_LOGGER.ERROR


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--dim", "dims", multiple=True, metavar="NAME=VALUE", callback=_parsed_by(parse_dim, True),
              help="Value of a symbolic input dim (MACs are unknown without every dim past the batch).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@guarded
def inspect(model: Path, dims, as_json: bool) -> None:
    """List the layers that can be factorized, and the weight layers that cannot (with why)."""
    from .api import inspect_model

    report = inspect_model(model, tuple(dims or ()))
    if as_json:
        _emit_json(report.to_dict())
    else:
        click.echo(report.to_text())


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the compressed model.")
@click.option("--rank", "ranks", multiple=True, metavar="LAYER=R",
              help="Force a layer's rank (name or glob; R an integer or 'full'). Repeatable.")
@click.option("--skip", "skips", multiple=True, metavar="LAYER", help="Leave a layer dense (name or glob). Repeatable.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help="JSON or YAML config (options and per-layer settings under 'layers').")
@click.option("--report", "report_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the report to this file: .json (full data), .md or .html (per-layer table, "
                   "in-network latency and plots).")
@click.option("--calib", "calib", multiple=True, metavar="PATH|random",
              help="Calibration data: .npz files or directories keyed by input name (repeatable), or 'random'. "
                   "Enables data-aware reconstruction.")
@click.option("--layers", "show_layers", is_flag=True, help="Print the per-layer table.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@config_options(COMPRESS)
@guarded
def compress(model: Path, output: Path, ranks, skips, config_file, report_file, calib, show_layers, as_json, quiet,
             options) -> None:
    """Factorize MODEL's Gemm / MatMul / Conv weights and write the smaller model to OUTPUT."""
    from .api import compress_file

    cli_overrides = _parse_ranks(ranks) + tuple(LayerOverride(s, skip=True) for s in skips)

    def build() -> CompressConfig:
        base = load_config_file(config_file) if config_file else CompressConfig()
        return base.replace(overrides=cli_overrides + base.overrides, **options)

    config = _usage(build)
    if report_file is not None:
        from .report.render import check_report_path
        check_report_path(report_file)
    calibration = list(calib) if calib else None
    with _unless_completed(output):
        result = compress_file(model, output, config, calibration, progress=_progress_printer(quiet or as_json))
        report = result.report
        if report_file is not None:
            _write_report(report_file, report, model, result.model, config)
        _raise_if_signalled()
    if as_json:
        _emit_json(report.to_dict())
    else:
        click.echo(report.to_text())
        if show_layers:
            click.echo(report.layer_table())
        click.echo(f"wrote {output}")


def _write_report(path: Path, report, model: Path, compressed, config) -> None:
    """JSON, or Markdown / HTML with plots and the in-network per-layer latency of both models."""
    from .report.render import write_report
    from .runtime.profile import profile_pair

    profiles, why = (None, "") if path.suffix.lower() == ".json" else profile_pair(
        model, compressed, config.latency_batch, config.latency_threads, config.dims, config.seed)
    write_report(path, report, title=f"onnx-lrsd: {model.name}", profiles=profiles, profile_note=why)


@main.command()
@click.argument("baseline", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("candidate", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True, help="intra_op_num_threads.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Batch size of the inputs.")
@click.option("--dim", "dims", multiple=True, metavar="NAME=VALUE", callback=_parsed_by(parse_dim, True),
              help="Value of a symbolic input dim.")
@click.option("--runs", type=click.IntRange(min=3), default=50, show_default=True, help="Timed runs per model.")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="Untimed runs per model.")
@click.option("--profile-runs", type=click.IntRange(min=0), default=10, show_default=True,
              help="Runs of onnxruntime's profiler for the per-layer times (0: no per-layer profile).")
@click.option("--cold", "cold_repeats", type=click.IntRange(min=0), default=1, show_default=True,
              help="Fresh processes measuring session creation, first run and peak memory (0: none).")
@click.option("--top", type=click.IntRange(min=1), default=15, show_default=True, help="Layers shown in the table.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@guarded
def bench(baseline: Path, candidate: Optional[Path], threads, batch, dims, runs, warmup, profile_runs, cold_repeats,
          top, seed, as_json, quiet) -> None:
    """Latency of BASELINE (and CANDIDATE, interleaved in one process) in onnxruntime: warm and
    cold, peak memory, per-layer times mapped to the model's layers, params, file size, MACs
    and output error side by side."""
    from .runtime.bench import compare_models

    comparison = compare_models(baseline, candidate, threads=threads, batch=batch, dims=dict(dims or ()),
                                runs=runs, warmup=warmup, seed=seed, profile_runs=profile_runs,
                                cold_repeats=cold_repeats, progress=_progress_printer(quiet or as_json))
    if as_json:
        _emit_json(comparison.to_dict())
    else:
        click.echo(comparison.to_text(top))


def _parse_points(text: str) -> tuple:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise LrsdError(f"--points takes comma-separated params ratios, got {text!r}") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise LrsdError(f"--points are params ratios in (0, 1], got {text!r}")
    return values


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for sweep.json, sweep.md and sweep.png (created if missing).")
@click.option("--calib", "calib", multiple=True, metavar="PATH|random",
              help="Calibration .npz file(s) or directories keyed by input name, or 'random'.")
@click.option("--points", default=",".join(f"{v:g}" for v in SWEEP_POINTS),
              show_default=True, help="Comma-separated target params ratios.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help="JSON or YAML config (CompressConfig fields and per-layer settings).")
@click.option("--save-models", is_flag=True, help="Also write each point's model as params-<ratio>.onnx.")
@click.option("--json", "as_json", is_flag=True, help="Print the sweep as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@config_options(SWEEP)
@guarded
def sweep(model: Path, output_dir: Path, calib, points, config_file, save_models, as_json, quiet, options) -> None:
    """Global allocations of MODEL at several sizes: a Pareto table and plot of speedup and
    size against output error."""
    from .api import sweep as run_sweep
    from .model.io import save_model, write_atomic
    from .report.plot import plot_sweep, require_matplotlib

    values = _parse_points(points)
    require_matplotlib()
    if output_dir.exists() and not output_dir.is_dir():
        raise LrsdError(f"output directory is a file: {output_dir}")
    config = _usage(lambda: (load_config_file(config_file) if config_file else CompressConfig()).replace(**options))
    outcome = run_sweep(model, values, config, list(calib) if calib else None, keep_models=save_models,
                        progress=_progress_printer(quiet or as_json))
    report, models = outcome if save_models else (outcome, [])
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LrsdError(f"cannot create {output_dir}: {exc.strerror or exc}") from None
    write_atomic(output_dir / "sweep.json", report.to_json())
    write_atomic(output_dir / "sweep.md", report.to_markdown() + "\n")
    plot_sweep(report, output_dir / "sweep.png", title=f"onnx-lrsd sweep of {model.name}")
    for point, compressed in zip(report.points, models):
        save_model(compressed, output_dir / f"params-{point.target_params:g}.onnx")
    if as_json:
        _emit_json(report.to_dict())
    else:
        click.echo(report.to_markdown())
        click.echo(f"wrote {output_dir / 'sweep.json'}, {output_dir / 'sweep.md'}, {output_dir / 'sweep.png'}")


def _recover_progress_printer(quiet: bool):
    """A click progress bar of recovery's steps (or seconds, with only a time budget) whose
    label shows the best held-out loss so far."""
    if quiet or not sys.stderr.isatty():
        return None
    state = {"bar": None}

    def on_step(p) -> None:
        total, done = (p.total, p.step) if p.total else (int(p.time_budget), int(min(p.seconds, p.time_budget)))
        if state["bar"] is None:
            state["bar"] = click.progressbar(length=total, label="recover", file=sys.stderr, show_pos=True,
                                             show_eta=True)
        bar = state["bar"]
        if p.best_heldout_loss is not None:
            bar.label = f"recover (held-out loss {p.best_heldout_loss:.4g})"
        bar.update(done - bar.pos)
        if done >= total:
            bar.render_finish()

    return on_step


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--teacher", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The original model MODEL was compressed from.")
@click.option("--calib", "calib", multiple=True, required=True, metavar="PATH",
              help="Unlabeled inputs: .npz files or directories keyed by input name (repeatable).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the recovered model.")
@click.option("--steps", type=click.IntRange(min=0), default=None, help=f"Adam steps. [{DEFAULT_STEPS} without --recover-time]")
@click.option("--recover-time", "time_budget", default=None, metavar="DURATION",
              callback=_parsed_by(parse_duration, False), help="Time budget, e.g. 10m, 600s, 1h.")
@click.option("--lr", type=float, default=None, help=f"Adam's step size (cosine-decayed over the budget). [{RecoverConfig.lr:g}]")
@click.option("--batch", type=click.IntRange(min=1), default=None, help=f"Samples per step. [{RecoverConfig.batch}]")
@click.option("--samples", type=click.IntRange(min=2), default=None, help="Use at most N calibration samples.")
@click.option("--loss", type=click.Choice(LOSS_CHOICES), default=None, help=f"Distillation loss. [{RecoverConfig.loss}]")
@click.option("--augment", type=click.Choice(AUGMENT_CHOICES), default=None,
              help="On-the-fly augmentation of the inputs. [auto: from the input's kind]")
@click.option("--trainable", type=click.Choice(TRAINABLE_CHOICES), default=None,
              help=f"Weights to train: the compressed layers' or all float weights. [{RecoverConfig.trainable}]")
@click.option("--level", type=click.Choice(LEVEL_CHOICES), default=None,
              help="End-to-end distillation, block-wise reconstruction, or blocks on half the budget then "
                   f"end-to-end. [{RecoverConfig.level}]")
@click.option("--block-size", type=click.IntRange(min=1), default=None,
              help=f"Block-wise: nodes reading trained weights per block. [{RecoverConfig.block_size}]")
@click.option("--warmup", type=click.IntRange(min=0), default=None,
              help=f"Steps over which Adam's step size rises linearly to --lr. [{RecoverConfig.warmup}]")
@click.option("--step-scale", type=click.Choice(STEP_SCALE_CHOICES), default=None,
              help="Adam moves every weight by about --lr (absolute) or by --lr times its tensor's RMS at the start "
                   f"(relative). [{RecoverConfig.step_scale}]")
@click.option("--shards", type=click.IntRange(min=1), default=None,
              help="Cut each batch's gradient into N shards of samples, one executor task each, summed in order "
                   "(the model depends on N, not on where shards run). [one per worker]")
@click.option("--mask-input", default=None, metavar="NAME", help="Input whose zeros mark padding (token models).")
@click.option("--seed", type=int, default=None, help=f"Seed of the split, sampling and augmentation. [{RecoverConfig.seed}]")
@click.option("--report", "report_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the recovery report as JSON to this file.")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Also draw the held-out loss curve to this PNG (needs matplotlib).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@config_options(RECOVER)
@guarded
def recover(model: Path, teacher: Path, calib, output: Path, steps, time_budget, lr, batch, samples, loss, augment,
            trainable, level, block_size, warmup, step_scale, shards, mask_input, seed, report_file, plot_file, as_json, quiet,
            options) -> None:
    """Fine-tune the compressed MODEL to reproduce TEACHER (the original) on unlabeled data
    (distillation with onnxruntime gradients, end-to-end or block by block) and write it to OUTPUT."""
    from .model.io import write_atomic
    from .recover import recover_file

    given = {k: v for k, v in dict(steps=steps, time_budget=time_budget, lr=lr, batch=batch, samples=samples,
                                    loss=loss, augment=augment, trainable=trainable, level=level,
                                    block_size=block_size, warmup=warmup, step_scale=step_scale, shards=shards,
                                    mask_input=mask_input,
                                    seed=seed).items()
             if v is not None}
    config = _usage(lambda: RecoverConfig(**given, **options))  # options: the executor's, from CompressConfig
    if plot_file is not None:
        from .report.plot import require_matplotlib
        require_matplotlib()
    if output.exists() and model.exists() and output.resolve() in (model.resolve(), teacher.resolve()):
        raise LrsdError("output path is an input path; refusing to overwrite it")
    with _unless_completed(output):
        result = recover_file(model, teacher, output, list(calib), config,
                              on_step=_recover_progress_printer(quiet or as_json))
        if report_file is not None:
            write_atomic(report_file, json.dumps(result.report.to_dict(), indent=2, default=str))
        if plot_file is not None:
            from .report.plot import plot_recovery
            plot_recovery({model.name: result.report}, plot_file, title=f"onnx-lrsd recover {model.name}")
        _raise_if_signalled()
    if as_json:
        _emit_json(result.report.to_dict())
    else:
        click.echo(result.report.to_text())
        click.echo(f"wrote {output}")


if __name__ == "__main__":  # pragma: no cover
    main()
