"""User-facing errors.

Every mistake a user can make (a bad option, a missing file, a cache from another
version) raises a subclass of `AlignKDError` whose message is one sentence naming the
file, sample or option. The CLI prints that sentence and exits non-zero without a
traceback; anything else is a bug and keeps its traceback.
"""

from pathlib import Path


class AlignKDError(Exception):
    """A user error: the message is shown as is, with no traceback."""


class ConfigError(AlignKDError):
    """An option or combination of options is invalid."""


class NotBuiltError(AlignKDError):
    """A command that exists in the interface but is not implemented yet."""


def describe_os_error(err: OSError) -> str:
    """One sentence for an OSError, naming the file when the OS said which one."""
    import os
    import re

    # pyarrow raises OSError("[Errno 27] Error writing bytes to file. Detail: [errno 27] File too large")
    reason = err.strerror or (os.strerror(err.errno) if err.errno else str(err))
    reason = re.sub(r"\[errno \d+\]\s*", "", reason.split("Detail:")[-1], flags=re.I).strip() or type(err).__name__
    where = f"{err.filename}: " if err.filename else ""
    return f"{where}{reason[0].lower()}{reason[1:]}.".replace("..", ".")


def check_file(path, what: str) -> None:
    """An input that must be an existing regular file."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{what} {path} does not exist.")
    if not p.is_file():
        raise ConfigError(f"{what} {path} is not a file.")


def check_dir(path, what: str) -> None:
    """An input that must be an existing directory."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{what} {path} does not exist.")
    if not p.is_dir():
        raise ConfigError(f"{what} {path} is not a directory.")


def check_out_dir(path) -> None:
    """--out may be new or a directory, never an existing file (or a path through one)."""
    for p in (Path(path), *Path(path).parents):
        if p.exists() and not p.is_dir():
            raise ConfigError(f"--out {path} cannot be a directory: {p} is an existing file.")


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


def check_finite(config, names: tuple[str, ...]) -> None:
    """Each named float field of a config must be a finite number (click reads "nan" and "inf" as floats)."""
    import math

    for name in names:
        if not math.isfinite(getattr(config, name)):
            raise ConfigError(f"{_flag(name)} must be a finite number, not {getattr(config, name)}.")
