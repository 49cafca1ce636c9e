"""Command-line options generated from a recipe section's schema (``cli.section_options``): a field
becomes a flag with its schema comment as help, values are validated by the recipe's own model, and
the commands that take the same section field share one flag."""
from __future__ import annotations

from typing import Literal

import click
import pytest
from click.testing import CliRunner
from pydantic import Field

from ollama_compress import cli
from ollama_compress.errors import UserError
from ollama_compress.recipe import Strict


class Knobs(Strict):
    depth: int = Field(3, ge=1)  # how deep to go
    mode: Literal["fast", "slow"] = "fast"  # which way
    names: list[str] = ["a", "b"]  # names to use
    loud: bool = False  # shout
    ratio: float | None = None  # a share, if any
    nested: dict[str, float] = {}  # a mapping: no flag


def _command(model=Knobs) -> click.Command:
    @click.command()
    @cli.section_options(model)
    def knobs(**given):
        section = cli.section_from_options(model, cli.option_values(model, given))
        click.echo(section.model_dump_json())

    return knobs


def _options(command: click.Command) -> dict[str, click.Option]:
    return {opt: param for param in command.params if isinstance(param, click.Option) for opt in param.opts}


def test_each_field_of_a_section_is_a_flag_with_its_schema_comment_as_help():
    options = _options(_command())
    assert set(options) == {"--depth", "--mode", "--names", "--loud", "--ratio"}  # not the mapping
    assert options["--depth"].help.startswith("How deep to go") and "[default: 3]" in options["--depth"].help
    assert options["--mode"].metavar == "[fast|slow]"
    assert options["--loud"].is_flag and options["--ratio"].type is click.FLOAT


def test_a_field_added_to_the_section_appears_as_a_flag():
    class MoreKnobs(Knobs):
        width: int = Field(2, ge=1)  # how wide

    options = _options(_command(MoreKnobs))
    assert "--width" in options and options["--width"].help.startswith("How wide")
    result = CliRunner().invoke(_command(MoreKnobs), ["--width", "5", "--names", "x,y", "--loud"])
    assert result.exit_code == 0, result.output
    assert '"width":5' in result.output and '"names":["x","y"]' in result.output and '"loud":true' in result.output


def test_options_not_given_keep_the_schema_defaults():
    result = CliRunner().invoke(_command(), [])
    assert result.exit_code == 0 and Knobs.model_validate_json(result.output) == Knobs()


def test_a_bad_value_is_refused_by_the_schema_naming_the_flag():
    with pytest.raises(UserError, match=r"^--depth: Input should be greater than or equal to 1$"):
        cli.section_from_options(Knobs, {"depth": 0})


def _commands() -> dict[str, click.Command]:
    cli._add_plugin_commands()
    return {name: cli.cli.commands[name] for name in ("prune", "heal", "analyze")}


def test_prune_heal_and_analyze_share_one_flag_per_field_and_json():
    commands = _commands()
    by_field: dict[str, list[click.Option]] = {}
    for command in commands.values():
        for param in command.params:
            if getattr(param, "section_field", None):
                by_field.setdefault(param.section_field, []).append(param)
    shared = {field: opts for field, opts in by_field.items() if len(opts) > 1}
    assert {"TextSource.samples", "TextSource.seq_len", "TextSource.seed"} <= set(shared)  # prune and analyze
    for field, opts in shared.items():
        assert len({(tuple(o.opts), o.help, repr(o.type)) for o in opts}) == 1, field
    common = set.intersection(*(set(_options(c)) for c in commands.values()))
    plain = {flag for flag in common if not any(getattr(_options(c)[flag], "section_field", None)
                                                for c in commands.values())}
    assert {"--json", "--device", "--out"} <= plain
    for flag in plain - {"--out"}:  # each command says what it writes where
        assert len({_options(c)[flag].help for c in commands.values()}) == 1, flag


@pytest.mark.parametrize("argv, flag", [
    (["prune", "M", "--remove", "-1", "--out", "O"], "--remove"),
    (["prune", "M", "--remove", "1", "--samples", "0", "--out", "O"], "--samples"),
    (["heal", "M", "--teacher", "M", "--batch-size", "0", "--out", "O"], "--batch-size"),
    (["heal", "M", "--teacher", "M", "--train", "some", "--out", "O"], "--train"),
    (["analyze", "M", "--seq-len", "4", "--out", "O"], "--seq-len"),
])
def test_a_bad_option_value_exits_2_with_one_line_naming_the_flag(argv, flag, tmp_path, capsys):
    argv = [str(tmp_path / a) if a in ("M", "O") else a for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and err.startswith(f"Error: {flag}: "), err
    assert not (tmp_path / "O").exists()
