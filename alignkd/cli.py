"""Command-line wiring: each command gathers options, builds a config, calls one function.

Heavy imports (torch, transformers) live inside the command bodies so that
`alignkd --help` stays instant.
"""

from __future__ import annotations

import sys

import click

from alignkd import __version__
from alignkd.errors import AlignKDError, NotBuiltError


class _Group(click.Group):
    """A click group that turns `AlignKDError` into one line on stderr and exit 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except AlignKDError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(1)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="alignkd")
def main() -> None:
    """Offline Align-KD: cache a teacher VLM once, distil small students from the cache."""


@main.group(cls=_Group)
def cache() -> None:
    """Build, inspect, query and verify a teacher cache."""


@main.command()
def distill() -> None:
    """Train a student purely from a teacher cache (not built yet)."""
    raise NotBuiltError("`alignkd distill` is not built yet (see issue 4).")


@main.command(name="eval")
def eval_() -> None:
    """Evaluate a saved model on a held-out manifest (not built yet)."""
    raise NotBuiltError("`alignkd eval` is not built yet (see issue 4).")


@main.command()
def demo() -> None:
    """Run the whole pipeline on the embedded default world (not built yet)."""
    raise NotBuiltError("`alignkd demo` is not built yet (see issue 5).")


if __name__ == "__main__":
    main()
