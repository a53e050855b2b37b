"""Command-line wiring: each command gathers options, builds a config, calls one function.

Over 300 lines on purpose: every command's options and its one call, so the whole command
line reads in one place.

Heavy imports (torch, transformers) live inside the command bodies so that
`alignkd --help` stays instant.
"""

from __future__ import annotations

import sys

import click

from alignkd import __version__
from alignkd.distill.eval_config import EvalConfig
from alignkd.distill.run import DistillConfig
from alignkd.errors import AlignKDError, describe_os_error
from alignkd.settings import config_from_options, options_from


class _Group(click.Group):
    """A click group that turns `AlignKDError` into one line on stderr and exit 1.

    Under torchrun, a rank that stopped (killed, out of memory) reaches the others as a
    failed collective or as torchrun's SIGTERM; both become one sentence naming that rank.
    """

    def resolve_command(self, ctx, args):
        name, cmd, rest = super().resolve_command(ctx, args)
        if cmd is not None and not isinstance(cmd, click.Group):
            from alignkd.distributed import exit_when_torchrun_stops_us

            exit_when_torchrun_stops_us(f"{ctx.command_path} {name}")
        return name, cmd, rest

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as err:  # a value click could not parse: its sentence, not a usage page
            where = f"; see `{err.ctx.command_path} --help`" if err.ctx is not None else ""
            _fail(f"{err.format_message().rstrip('.')}{where}.", code=err.exit_code)
        except AlignKDError as err:
            _fail(str(err), quiet=getattr(err, "said_nearby", False))
        except OSError as err:  # the machine said no: full disk, permission denied, not a directory
            _fail(describe_os_error(err))
        except RuntimeError as err:  # under torchrun: another rank went away mid-collective
            from alignkd.distributed import is_peer_failure, report_stopped_rank

            if not is_peer_failure(err):
                raise
            report_stopped_rank(f"{ctx.command_path} {ctx.invoked_subcommand}")
            sys.exit(1)


def _fail(message: str, code: int = 1, quiet: bool = False) -> None:
    """One `error:` line, and under torchrun once per launch rather than once per rank."""
    from alignkd.distributed import say_error

    say_error(message, quiet)
    sys.exit(code)


def _hide_progress(no_progress: bool) -> None:
    """--no-progress also silences transformers' own bars ("Loading weights", "Writing model shards")."""
    if no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="alignkd")
def main() -> None:
    """Offline Align-KD: cache a teacher VLM once, distil small students from the cache."""


@main.group(cls=_Group)
def cache() -> None:
    """Build, inspect, query and verify a teacher cache."""


@cache.command("build")
@click.option("--teacher", required=True,
              help="Teacher model (safetensors): a local directory, or a hub id org/name[@revision] resolved "
                   "through the local Hugging Face cache.")
@click.option("--data", required=True, multiple=True,
              help="Records: a JSON list or JSONL manifest (LLaVA conversations or chat messages), a Parquet file "
                   "or directory (images as bytes; a Hugging Face dataset repository too), a dataset id "
                   "org/name[@rev][:config[/split]] in the local Hugging Face cache, or a YAML mixture "
                   "(datasets: [{json_path, sampling_strategy}]). Repeat it to mix sources.")
@click.option("--images", default=None, multiple=True,
              help="Root directory the records' image paths are relative to; once for every source, or once "
                   "per --data, in order.")
@click.option("--out", required=True, help="Cache directory to create or resume.")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--max-length", default=2048, show_default=True, help="Tokens per sample; the tail is cut.")
@click.option("--shard-size", default=256, show_default=True, help="Samples per shard.")
@click.option("--limit", type=int, default=None, help="Only the first N manifest rows.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", default="float32", show_default=True, help="Teacher compute dtype.")
@click.option("--seed", default=0, show_default=True, help="Seed for sampled logits.")
@click.option("--overwrite", is_flag=True,
              help="Delete an existing alignkd cache (only the files alignkd wrote) instead of resuming it.")
@click.option("--logit-mode", type=click.Choice(["topk", "sampled"]), default="topk", show_default=True)
@click.option("--logit-k", default=16, show_default=True, help="Top-k size (topk mode); see BENCHMARKS.md.")
@click.option("--logit-samples", default=64, show_default=True, help="Draws per position (sampled mode).")
@click.option("--logit-positions", type=click.Choice(["response", "text"]), default="text", show_default=True,
              help="Distil the next-token distribution at every text position after the image (text) or only "
                   "at the answer's (response); docs/efficacy.md has the comparison.")
@click.option("--attn-dtype", type=click.Choice(["uint8-log", "bfloat16", "float16", "uint8-sqrt", "uint4-log"]),
              default="uint8-log", show_default=True, help="Attention storage; see docs/cache-format.md.")
@click.option("--attn-topk", default=0, show_default=True,
              help="Keep each attention row's K largest vision columns and the rest's mass (0: every column); "
                   "pays when rows are peaked: `cache stats` shows the top-16 share.")
@click.option("--vision-dtype", type=click.Choice(["bfloat16", "float16", "int8-channel", "int4-channel"]),
              default="bfloat16", show_default=True, help="Vision-token storage; see docs/cache-format.md.")
@click.option("--attn-store", type=click.Choice(["maps", "layer0"]), default="maps", show_default=True,
              help="maps: store each sample's layer-0 attention rows; layer0: store none and keep the teacher's "
                   "layer-0 kit (embeddings, layer-0 query/key) once, from which readers and distill recompute "
                   "them exactly; see docs/cache-format.md.")
@click.option("--skip", type=click.Choice(["attn", "vision"]), multiple=True,
              help="Leave a teacher target out of the cache (repeatable): attn (the layer-0 attention rows) or "
                   "vision (the vision tokens). Its loss term is then off in distill; see docs/cache-format.md for "
                   "the bytes each saves.")
@click.option("--store-images/--no-store-images", default=True, show_default=True)
@click.option("--share-vision/--no-share-vision", default=True, show_default=True,
              help="Store the teacher's vision tokens once per distinct set of images (samples that repeat "
                   "an image point at the first); `cache stats` counts the sharing.")
@click.option("--device-map", default=None,
              help="Spread a teacher too big for one device over this node's GPUs, CPU and disk (accelerate's "
                   "big-model loading): auto, balanced, balanced_low_0, sequential, or a JSON file "
                   "{module: GPU index|cpu|disk}. Under torchrun, one process per node; see docs/scale.md.")
@click.option("--max-memory", default=None,
              help="With --device-map: the most each device may hold, e.g. 0=70GiB,1=70GiB,cpu=200GiB.")
@click.option("--offload-folder", default=None,
              help="With --device-map: where modules placed on disk go [default: a temporary directory].")
@click.option("--timeout", type=float, default=None,
              help="Under torchrun: the most minutes a rank waits for the others (to create the cache, to "
                   "finish their rows), saying every 30 s whom it waits for [default: 72 hours].")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model directory's own Python code.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def cache_build(no_progress: bool, **opts) -> None:
    """Run the teacher once over a manifest and write the cache.

    \b
    Example:
      alignkd cache build --teacher teacher/ --data train.json --images imgs/ --out cache/
      alignkd cache build --teacher big/ --device-map auto --dtype bfloat16 --data train.json --images imgs/ --out cache/
    """
    from alignkd.cache.teacher.build import BuildConfig, build_cache

    from alignkd.distributed import dist_info

    _hide_progress(no_progress)
    data, images = opts.pop("data"), opts.pop("images")
    summary = build_cache(BuildConfig(data=data[0] if len(data) == 1 else data,
                                      images=None if not images else images[0] if len(images) == 1 else images,
                                      progress=not no_progress, **opts))
    if not dist_info().is_main:
        return
    rejects = ", ".join(f"{n} {reason}" for reason, n in sorted(summary.rejects.items())) or "none"
    size = (_footprint_words(summary) if summary.cached_total
            else "the cache holds no samples yet, so it cannot train a student")
    for note in summary.notes:
        click.echo(note)
    if opts["device_map"] is not None:  # always: a teacher that spilled to cpu or disk runs, only slower
        click.echo(f"teacher placed by --device-map: {_placement_words(summary.placement)}")
    click.echo(
        f"cached {summary.samples} samples ({summary.skipped_done} rows already done), "
        f"rejects: {rejects}; {size}; {summary.seconds:.1f}s -> {summary.out}"
    )


def _placement_words(placement: dict) -> str:
    if len(placement) == 1 and next(iter(placement.values())) == 1:
        return f"the whole teacher on {next(iter(placement))}"
    return ", ".join(f"{n} on {device}" for device, n in sorted(placement.items())) + " (modules)"


def _footprint_words(summary) -> str:
    """Bytes as `cache stats` counts them: the shards per sample, what the cache holds once, images shared."""
    from alignkd.cache.inspection.stats import kilobytes

    return (f"{kilobytes(summary.bytes_per_sample)} per sample in shards + {kilobytes(sum(summary.fixed.values()))} "
            f"once ({', '.join(summary.fixed)}); {summary.images:,} images, {summary.distinct_images:,} distinct")


@cache.command("sql")
@click.argument("cache_dir", metavar="CACHE")
@click.argument("query")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table",
              show_default=True)
@click.option("--memory-limit", default="25%", show_default=True,
              help="The most memory the query may use: a size (4GB, 512MiB) or a share of this machine's.")
@click.option("--timeout", "timeout_s", type=float, default=60.0, show_default=True,
              help="Seconds the query may run before it is stopped.")
def cache_sql(cache_dir: str, query: str, fmt: str, memory_limit: str, timeout_s: float) -> None:
    """Run read-only SQL over the catalog (tables: samples, rejects, shards).

    \b
    Example:
      alignkd cache sql cache/ "SELECT count(*), avg(teacher_ce) FROM samples"
    """
    from alignkd.cache.catalog import run_sql
    from alignkd.cache.sql_limits import SQLLimits
    from alignkd.cache.inspection.tables import format_table

    limits = SQLLimits(memory=memory_limit, timeout_s=timeout_s)
    click.echo(format_table(run_sql(cache_dir, query, limits), fmt))


@cache.command("verify")
@click.argument("cache_dir", metavar="CACHE")
def cache_verify(cache_dir: str) -> None:
    """Check format, version, checksums, offsets and catalog; exit 1 on any problem.

    \b
    Example:
      alignkd cache verify cache/
    """
    from alignkd.cache.storage import open_store
    from alignkd.cache.verify import build_in_progress_at, verify_cache

    store = open_store(cache_dir)
    building = build_in_progress_at(store)
    if building:
        click.echo(f"a build is in progress (pid {building}): checking the shards it has committed so far")
    problems = verify_cache(store)
    for problem in problems:
        click.echo(str(problem), err=True)
    if problems:
        click.echo(f"{len(problems)} problem(s) found in {cache_dir}", err=True)
        sys.exit(1)
    click.echo(f"ok: {cache_dir} verified" + (" (its committed shards; the build goes on)" if building else ""))


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

    from alignkd.cache.inspection.stats import cache_stats as compute, render_stats

    stats = compute(cache_dir)
    click.echo(json.dumps(stats, indent=2) if as_json else render_stats(stats))


@cache.command("show")
@click.argument("cache_dir", metavar="CACHE")
@click.argument("sample_id")
@click.option("--out", required=True, help="PNG file to write (its name ends in .png).")
@click.option("--images", default=None, help="Image root, when the cache holds no image bytes.")
def cache_show(cache_dir: str, sample_id: str, out: str, images: str | None) -> None:
    """Draw the teacher's text focus over each image, its vision tokens laid out as the model
    family lays them out, plus per-answer-token attention rows (8 a page: OUT.png, OUT-p2.png, ...).

    \b
    Example:
      alignkd cache show cache/ s0 --out s0.png
    """
    from alignkd.cache.inspection.show import MAX_TOKEN_PANELS, show_pages

    pages = show_pages(cache_dir, sample_id, out, images_root=images)
    click.echo(f"wrote {pages[0]}" if len(pages) == 1 else
               f"wrote {', '.join(map(str, pages))}: {MAX_TOKEN_PANELS} answer tokens a page")


@main.command()
@options_from(DistillConfig)
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def distill(no_progress: bool, **opts) -> None:
    """Train a student purely from a teacher cache; the teacher is never loaded.

    \b
    Example:
      alignkd distill --student student/ --cache cache/ --out run/ --max-steps 200
      torchrun --nproc-per-node 8 --no-python alignkd distill --student student/ --cache cache/ --out run/ --bf16 --fsdp "full_shard auto_wrap"
    """
    from alignkd.distill.run import distill as run_distill
    from alignkd.distributed import dist_info

    _hide_progress(no_progress)
    summary = run_distill(config_from_options(DistillConfig, opts, progress=not no_progress))
    if not dist_info().is_main:
        return
    terms = " ".join(f"{k.removeprefix('loss_')}={v:.4g}" for k, v in summary.final_losses.items())
    click.echo(f"distilled {summary.steps} steps in {summary.seconds:.0f}s ({terms}) -> {summary.out}"
               + "".join(f"; {note}" for note in summary.notes))


@main.command(name="eval")
@options_from(EvalConfig)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--no-progress", is_flag=True)
def eval_(as_json: bool, no_progress: bool, **opts) -> None:
    """Greedy-answer accuracy (normalised exact match) and answer CE on a manifest.

    \b
    Example:
      alignkd eval --model run/ --data test.json --images imgs/
    """
    import json
    from dataclasses import asdict

    from alignkd.distill.evaluate import evaluate

    _hide_progress(no_progress)
    result = evaluate(config_from_options(EvalConfig, opts, progress=not no_progress))
    if as_json:
        click.echo(json.dumps(asdict(result), indent=2))
        return
    click.echo(f"{opts['model']}: accuracy {result.accuracy:.3f} over {result.samples} samples, "
               f"answer CE {result.answer_ce:.4f}" + (f", {result.skipped} skipped (" + ", ".join(
                   f"{n} {reason}" for reason, n in result.skipped_by_reason.items()) + ")" if result.skipped else ""))
    for qtype, acc in result.by_type.items():
        click.echo(f"  {qtype:<12} {acc:.3f}")


@main.group(cls=_Group, invoke_without_command=True)
@click.option("--out", default="demo-out", show_default=True, help="Where every stage writes; reruns resume.")
@click.option("--quick", is_flag=True, help="Small and fast (about 2 minutes): the path the tests take.")
@click.option("--seeds", type=int, default=None, help="Student seeds per ablation row (3 full, 1 quick).")
@click.option("--teacher", default=None, help="Use this trained teacher directory instead of the shipped one.")
@click.option("--steps", "distill_steps", type=int, default=None, help="Distillation steps per student.")
@click.option("--ablation", is_flag=True,
              help="Also train one row per objective preset (logits, logits + vision, logits + attention).")
@click.option("--no-progress", is_flag=True)
@click.pass_context
def demo(ctx, out: str, quick: bool, seeds: int | None, teacher: str | None, distill_steps: int | None,
         ablation: bool, no_progress: bool) -> None:
    """Run the whole pipeline on the embedded grid world and print the ablation table.

    \b
    Example:
      alignkd demo --quick --out /tmp/demo
    """
    if ctx.invoked_subcommand is not None:
        return
    from alignkd.demo.runner import DemoConfig, run_demo

    _hide_progress(no_progress)

    opts = {k: v for k, v in {"seeds": seeds, "teacher": teacher, "distill_steps": distill_steps}.items()
            if v is not None}
    opts["ablation"] = ablation
    cfg = (DemoConfig.quick_mode(out, progress=not no_progress, **opts) if quick
           else DemoConfig(out=out, progress=not no_progress, **opts))
    click.echo(f"report -> {run_demo(cfg)}")


@demo.command("train-teacher")
@click.option("--out", required=True, help="Directory for the world, the teacher model and metrics.json.")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--threads", default=2, show_default=True)
@click.option("--ship", is_flag=True, help="Copy the weights into the package's demo assets.")
def demo_train_teacher(out: str, seed: int, device: str, threads: int, ship: bool) -> None:
    """Train the demo teacher with the seeded recipe (tens of CPU minutes; once).

    \b
    Example:
      alignkd demo train-teacher --out teacher-run --ship
    """
    from alignkd.demo.teacher import train_teacher

    run = train_teacher(out, seed=seed, device=device, threads=threads)
    if ship:
        import json
        from pathlib import Path

        from alignkd.demo.shipped import export_for_shipping

        metrics = json.loads((Path(out) / "metrics.json").read_text())
        metrics.pop("losses", None)
        export_for_shipping(run.model_dir, metrics, f"alignkd demo train-teacher --out DIR --seed {seed}")
    accuracy = " ".join(f"{k}={v:.3f}" for k, v in run.accuracy.items())
    click.echo(f"teacher trained in {run.seconds / 60:.1f} min ({accuracy}) -> {run.model_dir}")


if __name__ == "__main__":
    main()
