"""User-facing errors.

Every mistake a user can make (a bad option, a missing file, a cache from another
version) raises a subclass of `AlignKDError` whose message is one sentence naming the
file, sample or option. The CLI prints that sentence and exits non-zero without a
traceback; anything else is a bug and keeps its traceback.
"""


class AlignKDError(Exception):
    """A user error: the message is shown as is, with no traceback."""


class ConfigError(AlignKDError):
    """An option or combination of options is invalid."""


class NotBuiltError(AlignKDError):
    """A command that exists in the interface but is not implemented yet."""


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def check_choices(config, choices: dict[str, tuple]) -> None:
    """Each named field of a config must be one of its allowed values."""
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise ConfigError(f"{_flag(name)} must be one of {', '.join(allowed)}, not {getattr(config, name)!r}.")


def check_at_least_one(config, names: tuple[str, ...]) -> None:
    """Each named (count-like) field of a config must be >= 1."""
    for name in names:
        if getattr(config, name) < 1:
            raise ConfigError(f"{_flag(name)} must be at least 1.")
