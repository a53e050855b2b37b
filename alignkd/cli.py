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


@cache.command("build")
@click.option("--teacher", required=True, help="Teacher model directory (Hugging Face, safetensors).")
@click.option("--data", required=True, help="LLaVA-format manifest (JSON list or JSONL).")
@click.option("--images", required=True, help="Root directory the manifest's image paths are relative to.")
@click.option("--out", required=True, help="Cache directory to create or resume.")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--max-length", default=2048, show_default=True, help="Tokens per sample; the tail is cut.")
@click.option("--shard-size", default=256, show_default=True, help="Samples per shard.")
@click.option("--limit", type=int, default=None, help="Only the first N manifest rows.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", default="float32", show_default=True, help="Teacher compute dtype.")
@click.option("--seed", default=0, show_default=True, help="Seed for sampled logits.")
@click.option("--overwrite", is_flag=True, help="Delete an existing cache instead of resuming it.")
@click.option("--logit-mode", type=click.Choice(["topk", "sampled"]), default="topk", show_default=True)
@click.option("--logit-k", default=32, show_default=True, help="Top-k size (topk mode).")
@click.option("--logit-samples", default=64, show_default=True, help="Draws per position (sampled mode).")
@click.option("--logit-positions", type=click.Choice(["response", "text"]), default="response",
              show_default=True)
@click.option("--attn-dtype", type=click.Choice(["float16", "bfloat16", "uint8-sqrt"]), default="bfloat16",
              show_default=True)
@click.option("--vision-dtype", type=click.Choice(["float16", "bfloat16"]), default="bfloat16",
              show_default=True)
@click.option("--store-images/--no-store-images", default=True, show_default=True)
@click.option("--trust-remote-code", is_flag=True, help="Allow the model directory's own Python code.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def cache_build(no_progress: bool, **opts) -> None:
    """Run the teacher once over a manifest and write the cache.

    \b
    Example:
      alignkd cache build --teacher teacher/ --data train.json --images imgs/ --out cache/
    """
    from alignkd.cache.build import BuildConfig, build_cache

    summary = build_cache(BuildConfig(progress=not no_progress, **opts))
    rejects = ", ".join(f"{n} {reason}" for reason, n in sorted(summary.rejects.items())) or "none"
    click.echo(
        f"cached {summary.samples} samples ({summary.skipped_done} rows already done), "
        f"rejects: {rejects}; {summary.bytes_per_sample / 1e3:.1f} kB/sample on disk; "
        f"{summary.seconds:.1f}s -> {summary.out}"
    )


@cache.command("sql")
@click.argument("cache_dir", metavar="CACHE")
@click.argument("query")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table",
              show_default=True)
def cache_sql(cache_dir: str, query: str, fmt: str) -> None:
    """Run read-only SQL over the catalog (tables: samples, rejects, shards).

    \b
    Example:
      alignkd cache sql cache/ "SELECT count(*), avg(teacher_ce) FROM samples"
    """
    from alignkd.cache.catalog import run_sql
    from alignkd.cache.tables import format_table

    click.echo(format_table(run_sql(cache_dir, query), fmt))


@cache.command("verify")
@click.argument("cache_dir", metavar="CACHE")
def cache_verify(cache_dir: str) -> None:
    """Check format, version, checksums, offsets and catalog; exit 1 on any problem.

    \b
    Example:
      alignkd cache verify cache/
    """
    from alignkd.cache.verify import verify_cache

    problems = verify_cache(cache_dir)
    for problem in problems:
        click.echo(str(problem), err=True)
    if problems:
        click.echo(f"{len(problems)} problem(s) found in {cache_dir}", err=True)
        sys.exit(1)
    click.echo(f"ok: {cache_dir} verified")


@cache.command("stats")
@click.argument("cache_dir", metavar="CACHE")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def cache_stats(cache_dir: str, as_json: bool) -> None:
    """Summarise a cache: samples, rejects, bytes per tensor kind, teacher statistics.

    \b
    Example:
      alignkd cache stats cache/ --json
    """
    import json

    from alignkd.cache.stats import cache_stats as compute, render_stats

    stats = compute(cache_dir)
    click.echo(json.dumps(stats, indent=2) if as_json else render_stats(stats))


@cache.command("show")
@click.argument("cache_dir", metavar="CACHE")
@click.argument("sample_id")
@click.option("--out", required=True, help="PNG file to write.")
@click.option("--images", default=None, help="Image root, when the cache holds no image bytes.")
def cache_show(cache_dir: str, sample_id: str, out: str, images: str | None) -> None:
    """Draw the teacher's text focus over the image, plus per-answer-token attention rows.

    \b
    Example:
      alignkd cache show cache/ s0 --out s0.png
    """
    from alignkd.cache.show import show_sample

    click.echo(f"wrote {show_sample(cache_dir, sample_id, out, images_root=images)}")


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
