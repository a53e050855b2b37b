"""Settings declared once: a config dataclass field carries its default, help and choices,
and a command's options are generated from the fields (as litgpt builds its CLI from typed
functions).

    @dataclass(frozen=True)
    class EvalConfig:
        model: str = setting(help="Saved model directory.")            # no default: a required option
        max_new_tokens: int = setting(16, help="Tokens to generate.")
        mode: str = setting("fast", choices=("fast", "exact"))

    @main.command()
    @options_from(EvalConfig)
    def eval_(**opts): evaluate(config_from_options(EvalConfig, opts))

The option is the field's name with dashes (`--max-new-tokens`); click reads its type from
the default, or from `type=` where the default is None. A `comma` field is a tuple given as a
comma list (`--freeze vision_tower,projector`); a `negatable` bool reads `--x/--no-x`; a
`flag` bool is `--x`. `cli=False` keeps a field off the command line (set by code only).
`choices_of(Config)` gives the choices to the dataclass's own checks, so the command line and
the library refuse the same values.

Imports nothing heavy: the command line builds its options from this at import time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING
from typing import Any, Callable


def setting(default: Any = MISSING, *, help: str = "", choices: tuple | Callable[[], tuple] | None = None,
            type: Any = None, flag: bool = False, negatable: bool = False, comma: bool = False,
            show_default: bool | str = True, cli: bool = True):
    """A dataclass field with what its command-line option needs. `choices` may be a callable
    (read when the options are built)."""
    meta = {"help": help, "choices": choices, "type": type, "flag": flag, "negatable": negatable,
            "comma": comma, "show_default": show_default, "cli": cli}
    if isinstance(default, (list, dict, set)):
        raise TypeError("setting(): a mutable default; use a tuple")
    return dataclasses.field(default=default, metadata={"alignkd": meta})


def _meta(field: dataclasses.Field) -> dict:
    return field.metadata.get("alignkd", {"cli": False})


def _choices(meta: dict) -> tuple | None:
    choices = meta.get("choices")
    return tuple(choices()) if callable(choices) else choices


def choices_of(config_cls) -> dict[str, tuple]:
    """{field: allowed values} of every field declared with choices, for `errors.check_choices`."""
    return {f.name: _choices(_meta(f)) for f in dataclasses.fields(config_cls) if _choices(_meta(f))}


def _option(field: dataclasses.Field):
    import click

    meta = _meta(field)
    flag = "--" + field.name.replace("_", "-")
    names = [f"{flag}/--no-{field.name.replace('_', '-')}" if meta["negatable"] else flag, field.name]
    kwargs: dict[str, Any] = {"help": meta["help"] or None}
    if field.default is MISSING:
        kwargs["required"] = True
    elif meta["flag"]:
        kwargs["is_flag"] = True
    else:
        default = field.default
        kwargs["default"] = ",".join(default) if meta["comma"] else default
        kwargs["show_default"] = meta["show_default"] if default is not None else False
    choices = _choices(meta)
    if choices:
        kwargs["type"] = click.Choice(list(choices))
    elif meta["type"] is not None:
        kwargs["type"] = meta["type"]
    elif meta["comma"]:
        kwargs["type"] = str
    return click.option(*names, **kwargs)


def options_from(config_cls):
    """A decorator adding one click option per command-line field of `config_cls`, in field order."""
    fields = [f for f in dataclasses.fields(config_cls) if _meta(f)["cli"]]

    def decorate(command):
        for field in reversed(fields):  # click lists options in decoration order
            command = _option(field)(command)
        return command

    return decorate


def config_from_options(config_cls, opts: dict, **extra):
    """`config_cls` from a command's keyword arguments, comma lists split into tuples; `extra`:
    fields given by the command's own code."""
    values = dict(extra)
    for field in dataclasses.fields(config_cls):
        meta = _meta(field)
        if not meta["cli"] or field.name not in opts:
            continue
        value = opts[field.name]
        if meta["comma"] and isinstance(value, str):
            value = tuple(part.strip() for part in value.split(",") if part.strip())
        values[field.name] = value
    return config_cls(**values)
