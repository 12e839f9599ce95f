"""The compress and sweep options come from `CompressConfig`'s field metadata: every field with a
`CliOption` is a flag of its commands, with the config's choices and default."""
import dataclasses
import typing

import click
import pytest
from click.testing import CliRunner

from onnx_lrsd import config as cfg
from onnx_lrsd.cli import _config_option, compress, main, sweep

FIELDS = [f for f in dataclasses.fields(cfg.CompressConfig) if "cli" in f.metadata]
HINTS = typing.get_type_hints(cfg.CompressConfig)


def _param(command: click.Command, name: str) -> click.Option:
    return next(p for p in command.params if p.name == name)


@pytest.mark.parametrize("command, name", [(compress, cfg.COMPRESS), (sweep, cfg.SWEEP)])
def test_every_option_field_is_a_flag_of_its_commands(command, name):
    wanted = {f.name for f in FIELDS if name in f.metadata["cli"].commands}
    config_params = {p.name for p in command.params} & {f.name for f in dataclasses.fields(cfg.CompressConfig)}
    assert config_params == wanted
    assert len(wanted) >= (25 if name == cfg.COMPRESS else 9)


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.name)
def test_choices_and_default_come_from_the_config(field):
    meta = field.metadata["cli"]
    param = _param(compress if cfg.COMPRESS in meta.commands else sweep, field.name)
    assert param.default is None  # a flag not given leaves the config file's value
    if meta.choices is not None:
        short = {value: name for name, value in meta.aliases}
        assert list(param.type.choices) == [short.get(c, c) for c in meta.choices]
    if field.default not in (None, False, ()):
        shown = "on" if field.default is True else f"{field.default:g}" if isinstance(field.default, float) \
            else str(field.default)
        assert param.help.endswith(f"[{shown}]")


def test_a_field_with_metadata_makes_a_flag():
    @dataclasses.dataclass(frozen=True)
    class Extra:
        budget_share: float = cfg.option(0.25, "Share of the budget.")
        mode: str = cfg.option("b", "A mode.", choices=("a", "b"), aliases=(("x", "a"),))

    hints = typing.get_type_hints(Extra)

    @click.command()
    def command(**kwargs):
        click.echo(repr(sorted(kwargs.items())))

    for field in reversed(dataclasses.fields(Extra)):
        command = _config_option(field, hints[field.name])(command)
    out = CliRunner().invoke(command, ["--budget-share", "0.5", "--mode", "x"]).output
    assert out.strip() == "[('budget_share', 0.5), ('mode', 'a')]"
    assert "Share of the budget. [0.25]" in CliRunner().invoke(command, ["--help"]).output
    assert CliRunner().invoke(command, ["--mode", "a"]).exit_code == 2  # only the alias is offered


def test_joint_short_names_and_parsed_values_reach_the_config(tmp_path, monkeypatch):
    seen = {}

    def fake_compress_file(model, output, config, calibration, progress=None):
        seen["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr("onnx_lrsd.api.compress_file", fake_compress_file)
    model = tmp_path / "m.onnx"
    model.write_bytes(b"")
    result = CliRunner().invoke(main, ["compress", str(model), "-o", str(tmp_path / "o.onnx"), "--joint", "r",
                                       "--sparse-share", "auto", "--dim", "seq=8", "--no-verify", "--keep", "0.3"])
    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert (config.joint, config.sparse_share, config.dims, config.verify, config.keep) == \
        ("right", "auto", (("seq", 8),), False, 0.3)
    assert config.method == cfg.CompressConfig().method  # not given: the config's default


@pytest.mark.parametrize("args, message", [(["--sparse-share", "1.5"], "expected a number in [0, 1) or 'auto'"),
                                           (["--dim", "seq"], "expected name=positive-integer")])
def test_malformed_values_are_usage_errors(tmp_path, args, message):
    result = CliRunner().invoke(main, ["compress", "m.onnx", "-o", str(tmp_path / "o.onnx"), *args])
    assert result.exit_code == 2 and message in result.output
