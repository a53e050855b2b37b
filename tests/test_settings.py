"""Settings declared once: `alignkd distill`'s options are generated from DistillConfig's fields."""

from __future__ import annotations

import dataclasses

import click
import pytest
from click.testing import CliRunner

from alignkd.cli import main
from alignkd.distill.eval_config import EvalConfig
from alignkd.distill.run import DistillConfig
from alignkd.settings import choices_of, config_from_options, options_from, setting


@pytest.mark.parametrize("command,config", [("distill", DistillConfig), ("eval", EvalConfig)])
def test_every_field_is_an_option_with_the_fields_default_and_choices(command, config):
    options = {p.name: p for p in main.commands[command].params}
    for field in dataclasses.fields(config):
        if field.name == "progress":  # set from the command's own --no-progress
            assert field.name not in options
            continue
        option = options[field.name]
        assert option.opts[0] == "--" + field.name.replace("_", "-")
        if field.default is dataclasses.MISSING:
            assert option.required
        elif option.is_flag and not option.secondary_opts:  # --bf16: absent means False
            assert field.default is False
        elif isinstance(field.default, tuple):
            assert option.default == ",".join(field.default)
        else:
            assert option.default == field.default, field.name
    for name, allowed in choices_of(config).items():
        assert tuple(options[name].type.choices) == allowed


def test_the_command_line_builds_the_config_the_library_would():
    @dataclasses.dataclass(frozen=True)
    class Toy:
        path: str = setting(help="a path")
        parts: tuple[str, ...] = setting(("a",), comma=True)
        mode: str = setting("x", choices=("x", "y"))
        check: bool = setting(True, negatable=True)
        limit: int | None = setting(None, type=int)
        quiet: bool = setting(False, cli=False)

    seen = {}

    @click.command()
    @options_from(Toy)
    def toy(**opts):
        seen["config"] = config_from_options(Toy, opts, quiet=True)

    result = CliRunner().invoke(toy, ["--path", "p", "--parts", "b, c", "--mode", "y", "--no-check",
                                      "--limit", "3"])
    assert result.exit_code == 0, result.output
    assert seen["config"] == Toy(path="p", parts=("b", "c"), mode="y", check=False, limit=3, quiet=True)
    assert CliRunner().invoke(toy, ["--path", "p", "--mode", "z"]).exit_code == 2  # click refuses the choice
    assert CliRunner().invoke(toy, []).exit_code == 2                               # --path is required
    result = CliRunner().invoke(toy, ["--path", "p"])
    assert seen["config"] == Toy(path="p", quiet=True)  # every default is the field's
