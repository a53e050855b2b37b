"""Kill torture: SIGKILL `cache build` over and over, resume, and compare with an uninterrupted build.

Each kill lands at one of these moments, chosen by a seeded generator:

    time           a random moment in the build (model load, forward, writer, anything)
    chunk          right after the n-th sample array reached a shard file (mid-shard)
    shard_json     right after a shard's shard.json was written, before the rename
    renamed        after the rename, before the shard's catalog row
    catalog_write  inside a catalog write (a record_shard or a rebuild), before it closes
    rebuild        after a rebuilt catalog's temp file is complete, before it replaces the old one

The named moments are reached by wrapping alignkd's own functions in the build process
that is about to die (a forked child), so the real code runs up to the kill. A cache
takes a chain of kills, each build resuming the one before; the last build runs to the
end and must equal the reference build byte for byte in every tensor and row for row in
the samples (placement columns aside) and rejects tables, and `verify` must pass.
batch_size=1 makes the teacher's forward independent of where a resume starts.

Then the --overwrite matrix (`OVERWRITE_CASES`): a foreign cache.json, a cache (killed at a
random moment, or whole) with the user's files in and beside it, a symlinked shards/ and a
symlinked --out; each must be refused touching nothing, or rebuilt to equal the reference,
and every file of the user's must be byte-identical afterwards.

    .venv/bin/python -m bench.torture --kills 200              # the long run (BENCHMARKS.md)
    .venv/bin/python -m bench.torture --kills 12 --samples 10  # a quick look
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from alignkd.storage_schemas import ARRAY_KINDS
from tests.support.files import USER_FILES, plant_user_files, snapshot
from tests.support.world import QUESTION, build_student, build_teacher, image_records, turns, write_manifest

POINTS = ("time", "chunk", "shard_json", "renamed", "catalog_write", "rebuild")
# per point: the range of n for "the n-th time this moment comes" in one build process
OCCURRENCES = {"chunk": (1, 30), "shard_json": (1, 3), "renamed": (1, 3), "catalog_write": (1, 4), "rebuild": (1, 1)}
# where a sample sits in its shard's array files: differs with the shard split, so not compared
PLACEMENT = tuple(f"{kind}_offset" for kind in ARRAY_KINDS)
TENSORS = ("input_ids", "label_mask", "vision_positions", "text_positions", "logit_positions", "attn", "vision",
           "focus", "logit_ids", "logit_values", "logit_tail")


@dataclass(frozen=True)
class Kill:
    point: str
    n: int = 1          # the n-th occurrence of the moment
    delay: float = 0.0  # seconds after the start, for point "time"


# ---------------------------------------------------------------- the dying process
def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _after_nth(owner, name: str, n: int, when=lambda *a, **k: True, before: bool = False) -> None:
    """Wrap owner.name so that its n-th qualifying call SIGKILLs this process (before or after it runs)."""
    original, seen = getattr(owner, name), [0]

    def wrapped(*args, **kwargs):
        hit = when(*args, **kwargs)
        if hit:
            seen[0] += 1
        if hit and before and seen[0] == n:
            _die()
        result = original(*args, **kwargs)
        if hit and seen[0] == n:
            _die()
        return result

    setattr(owner, name, wrapped)


def arm(kill: Kill) -> None:
    """Make this process die at `kill`'s moment."""
    from alignkd.cache import catalog, shard_commit, shard_format
    from alignkd.storage_schemas import SHARD_JSON

    if kill.point == "time":
        threading.Timer(kill.delay, _die).start()
    elif kill.point == "chunk":
        _after_nth(shard_format.ArrayFileWriter, "_write_sample", kill.n)
    elif kill.point == "shard_json":
        _after_nth(shard_commit, "write_durable", kill.n, when=lambda path, data: Path(path).name == SHARD_JSON)
    elif kill.point == "renamed":
        _after_nth(catalog, "record_shard", kill.n, before=True)
    elif kill.point == "catalog_write":
        _after_nth(catalog, "_create_views", kill.n)
    elif kill.point == "rebuild":
        _after_nth(catalog, "_populate", kill.n)
    else:
        raise ValueError(kill.point)


def run_until_killed(body, what: str) -> str:
    """Run `body()` (armed with its kill, returning an exit code) in a forked child:
    'killed' (SIGKILL), 'finished' (exit 0) or 'failed'."""
    pid = os.fork()
    if pid == 0:  # the child never returns into the caller's stack
        code = 1
        try:
            code = body()
        except BaseException as exc:  # reported through the exit code only
            print(f"{what} failed: {exc!r}", file=sys.stderr)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return "killed"
    return "finished" if os.waitstatus_to_exitcode(status) == 0 else "failed"


def build_until_killed(cfg, kill: Kill | None) -> str:
    """Run build_cache(cfg) in a forked child armed with `kill`: 'killed', 'finished' or 'failed'."""
    def body() -> int:
        from alignkd.cache.teacher.build import build_cache

        if kill is not None:
            arm(kill)
        build_cache(cfg)
        return 0

    return run_until_killed(body, "build")


# ---------------------------------------------------------------- the comparison
def table(cache: Path, name: str, drop: tuple[str, ...] = ()) -> list[dict]:
    from alignkd.cache.catalog import run_sql

    exclude = f" EXCLUDE ({', '.join(drop)})" if drop else ""
    return run_sql(cache, f"SELECT *{exclude} FROM {name} ORDER BY manifest_row").to_pylist()


def compare_caches(ref: Path, got: Path) -> None:
    """Byte-for-byte tensors, row-for-row tables, a clean verify; AssertionError naming the difference."""
    from alignkd.cache.reader import open_cache
    from alignkd.cache.verify import verify_cache

    a, b = open_cache(ref), open_cache(got)
    assert len(set(b.sample_ids)) == len(b.sample_ids), f"{got}: a sample was stored twice"
    assert sorted(a.sample_ids) == sorted(b.sample_ids), f"{got}: other samples than the reference"
    for sid in a.sample_ids:
        x, y = a[a.index_of(sid)], b[b.index_of(sid)]
        for name in TENSORS:
            u, v = np.asarray(getattr(x, name)), np.asarray(getattr(y, name))
            assert u.dtype == v.dtype and u.shape == v.shape and u.tobytes() == v.tobytes(), f"{sid} {name}"
        assert x.image_bytes == y.image_bytes, f"{sid} image bytes"
    assert table(ref, "samples", PLACEMENT) == table(got, "samples", PLACEMENT), f"{got}: samples table"
    assert table(ref, "rejects") == table(got, "rejects"), f"{got}: rejects table"
    problems = verify_cache(got)
    assert problems == [], f"{got}: {problems[0]}"


# ---------------------------------------------------------------- a run
@dataclass
class Tally:
    killed: Counter          # point -> kills delivered
    finished: Counter        # point -> builds that ended before their moment came
    caches: int = 0          # caches finished and found equal to the reference
    shards_at_kill: Counter = None


def torture(ref_cfg, root: Path, kills: int, per_cache: int, rng: random.Random, seconds: float,
            on_cache=None) -> Tally:
    """Deliver `kills` SIGKILLs to builds of fresh caches, each cache taking up to `per_cache`
    kills (each build resuming the last) before a final unarmed build; every finished cache
    is compared with the reference and removed."""
    tally = Tally(Counter(), Counter(), 0, Counter())
    delivered, index = 0, 0
    while delivered < kills:
        cfg = replace(ref_cfg, out=str(root / f"cache-{index:05d}"))
        index += 1
        for i in range(min(per_cache, kills - delivered)):
            kill = draw_kill(rng, seconds, first=delivered < len(POINTS), i=delivered)
            outcome = build_until_killed(cfg, kill)
            if outcome == "failed":
                raise AssertionError(f"a build of {cfg.out} failed while armed with {kill}")
            if outcome == "finished":
                if i == 0 and kill.point != "time":
                    raise AssertionError(f"a fresh build of {cfg.out} never reached {kill}")
                if i == 0:  # this build ran faster than the reference did: aim earlier
                    seconds /= 2
                tally.finished[kill.point] += 1
                break
            delivered += 1
            tally.killed[kill.point] += 1
            tally.shards_at_kill[len(list((Path(cfg.out) / "shards").glob("shard-*")))] += 1
        if build_until_killed(cfg, None) != "finished":
            raise AssertionError(f"the final resume of {cfg.out} failed")
        compare_caches(Path(ref_cfg.out), Path(cfg.out))
        tally.caches += 1
        shutil.rmtree(cfg.out)
        if on_cache:
            on_cache(delivered, tally)
    return tally


def draw_kill(rng: random.Random, seconds: float, first: bool, i: int) -> Kill:
    """The first kills visit every moment once; later ones are drawn at random."""
    point = POINTS[i] if first else rng.choice(POINTS)
    if point == "time":
        return Kill("time", delay=rng.uniform(0.0, 0.9 * seconds))
    return Kill(point, n=rng.randint(*OCCURRENCES[point]))


# ---------------------------------------------------------------- the --overwrite matrix
# `cache build --overwrite` pointed at a directory that holds more than a cache: it must either
# refuse in one sentence, touching nothing, or rebuild the cache and leave every file that
# alignkd did not write byte for byte as it was (issue 23).
OVERWRITE_CASES = {
    "foreign_cache_json": "refused",     # a cache.json that is not an alignkd cache's, beside the user's files
    "cache_with_user_files": "rebuilt",  # a cache (killed mid-build, or whole) with the user's files in and beside it
    "symlinked_shards": "refused",       # shards/ a link to a directory elsewhere that holds the user's files too
    "symlinked_out": "refused",          # --out itself a link to a cache elsewhere
}
FOREIGN_CACHE_JSON = ("{}", "not json", '{"format": "my-notes"}', "[1, 2]", "")


def prepare_overwrite_case(case: str, ref_cfg, out: Path, elsewhere: Path, rng: random.Random,
                           seconds: float) -> list[str]:
    """Lay out `case` at `out` (and `elsewhere`); return the user's files, relative to `out`'s parent."""
    ref = Path(ref_cfg.out)
    user = [f"{out.name}/{rel}" for rel in USER_FILES]
    if case == "foreign_cache_json":
        plant_user_files(out)
        (out / "cache.json").write_text(rng.choice(FOREIGN_CACHE_JSON))
    elif case == "cache_with_user_files":
        kill = draw_kill(rng, seconds, first=False, i=0)
        build_until_killed(replace(ref_cfg, out=str(out)), kill)  # killed, or finished first: both are caches
        if not (out / "cache.json").is_file():  # killed before it made one: a whole cache instead
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(ref, out)
        plant_user_files(out, extra=("shards/README",))
        user.append(f"{out.name}/shards/README")
    elif case == "symlinked_shards":
        shutil.copytree(ref, out, ignore=shutil.ignore_patterns("shards"))
        shutil.copytree(ref / "shards", elsewhere / "shards")
        plant_user_files(elsewhere)
        (out / "shards").symlink_to(elsewhere / "shards")
        user = [f"{elsewhere.name}/{rel}" for rel in USER_FILES]
    elif case == "symlinked_out":
        shutil.copytree(ref, elsewhere)
        plant_user_files(elsewhere)
        out.symlink_to(elsewhere)
        user = [f"{elsewhere.name}/{rel}" for rel in USER_FILES]
    else:
        raise ValueError(case)
    return user


def overwrite_outcome(cfg) -> str:
    """`cache build --overwrite` in this process: 'rebuilt', or the one sentence it refused with."""
    from alignkd.cache.teacher.build import build_cache
    from alignkd.errors import AlignKDError

    try:
        build_cache(replace(cfg, overwrite=True))
    except AlignKDError as exc:
        return f"refused: {exc}"
    return "rebuilt"


def overwrite_matrix(ref_cfg, root: Path, rounds: int, rng: random.Random, seconds: float) -> Counter:
    """Each case of OVERWRITE_CASES `rounds` times; returns (case, outcome) -> count, or raises
    AssertionError naming the case whose outcome or files were wrong."""
    tally = Counter()
    for r in range(rounds):
        for case, expected in OVERWRITE_CASES.items():
            place = root / f"overwrite-{r}-{case}"
            out, elsewhere = place / "out", place / "elsewhere"
            place.mkdir(parents=True)
            user = prepare_overwrite_case(case, ref_cfg, out, elsewhere, rng, seconds)
            before = snapshot(place)
            outcome = overwrite_outcome(replace(ref_cfg, out=str(out)))
            after = snapshot(place)
            assert outcome.split(":")[0] == expected, f"{case}: {outcome}"
            assert {f: after.get(f) for f in user} == {f: before[f] for f in user}, f"{case}: a user's file changed"
            if expected == "refused":
                assert after == before, f"{case}: refused, yet the files changed"
            else:
                compare_caches(Path(ref_cfg.out), out)
            tally[case, expected] += 1
            shutil.rmtree(place)
    return tally


def make_world(root: Path, n_samples: int) -> dict:
    """A tiny teacher, `n_samples` images and a manifest with two rejects at the end."""
    answers = ["red", "blue circle", "yes", "no", "green square", "3", "left", "a red cross above"]
    images = root / "images"
    images.mkdir()
    records = image_records(images, n_samples, lambda i, rng: turns((QUESTION, answers[i % len(answers)])))
    conv = records[0]["conversations"]
    records += [{"id": "gone", "image": "gone.png", "conversations": conv}, {"id": "s0", "image": "0.png",
                                                                             "conversations": conv}]
    return {"teacher": build_teacher(root / "teacher"), "data": write_manifest(root / "data.json", records),
            "images": images}


def reference_build(world: dict, root: Path, **opts):
    from alignkd.cache.teacher.build import BuildConfig

    cfg = BuildConfig(teacher=str(world["teacher"]), data=str(world["data"]), images=str(world["images"]),
                      out=str(root / "reference"), batch_size=1, progress=False, **opts)
    start = time.perf_counter()
    if build_until_killed(cfg, None) != "finished":
        raise AssertionError("the reference build failed")
    return cfg, time.perf_counter() - start


def run(kills: int, samples: int, per_cache: int, seed: int, root: Path, overwrite_rounds: int = 0):
    import torch

    torch.set_num_threads(1)
    world = make_world(root, samples)
    ref, seconds = reference_build(world, root, shard_size=3, logit_mode="sampled", logit_samples=16)

    def report(delivered, tally):
        print(f"  {delivered}/{kills} kills delivered, {tally.caches} caches equal so far", flush=True)

    tally = torture(ref, root, kills, per_cache, random.Random(seed), seconds, on_cache=report)
    overwrites = overwrite_matrix(ref, root, overwrite_rounds, random.Random(seed), seconds)
    return tally, overwrites


# ================================================================ distill --resume: the kill matrix
# `alignkd distill` (the CLI, in a forked child) SIGKILLed at a random step, at one of these
# moments, then rerun with --resume (with --overwrite when no checkpoint was complete yet, which
# starts over), kill after kill, until an unarmed rerun finishes. The exported student and
# adapters must be bit-identical to an uninterrupted run with the same seed: on CPU every op is
# deterministic, a checkpoint holds the weights, the optimizer and scheduler state and the RNG
# states exactly, and the sampler replays an epoch's order from its seed, so a resumed step
# computes the same floats as the uninterrupted one (the tests and the bench found 0 differing
# bits; a tolerance would hide a step replayed on other data).
#
#     step          after the n-th optimizer step, before its log line and checkpoint
#     checkpoint    inside the n-th checkpoint: weights, optimizer and scheduler staged, not yet renamed
#     published     right after the n-th checkpoint was renamed into place
#     export        the student exported under OUT/.tmp-export, not yet moved into OUT
#     dtime         a seeded random moment (model load, a step, a save, the export, anything)
DISTILL_POINTS = ("step", "checkpoint", "published", "export", "dtime")


def arm_distill(kill: Kill) -> None:
    """Make this (distill) process die at `kill`'s moment."""
    from transformers import Trainer, TrainerCallback

    from alignkd.distill import export, saving
    from alignkd.distill import trainer as hf_trainer

    if kill.point == "dtime":
        threading.Timer(kill.delay, _die).start()
    elif kill.point == "step":
        class DieAtStep(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == kill.n:
                    _die()

        build = hf_trainer.build_callbacks
        hf_trainer.build_callbacks = lambda out: build(out) + [DieAtStep()]
    elif kill.point == "checkpoint":
        _after_nth(Trainer, "_save_optimizer_and_scheduler", 1,
                   when=lambda self, output_dir: output_dir.endswith(f"checkpoint-{kill.n}"))
    elif kill.point == "published":
        _after_nth(saving, "publish_checkpoint", 1, when=lambda staged, final: final.name == f"checkpoint-{kill.n}")
    elif kill.point == "export":
        _after_nth(export, "publish", 1, before=True)
    else:
        raise ValueError(kill.point)


def distill_until_killed(args: list[str], kill: Kill | None, log: Path | None = None) -> str:
    """Run `alignkd distill ARGS` in a forked child armed with `kill`: 'killed', 'finished' or 'failed'."""
    def body() -> int:
        from click.testing import CliRunner

        from alignkd.cli import main as cli

        if kill is not None:
            arm_distill(kill)
        result = CliRunner().invoke(cli, ["distill", *args])
        if log is not None:
            log.write_text(result.output + (f"\n{result.exception!r}" if result.exit_code else ""))
        return result.exit_code

    return run_until_killed(body, "distill")


def distill_args(student, cache, out, steps: int, save_steps: int, seed: int = 0) -> list[str]:
    # batch 2 over 8 samples: the run crosses an epoch, so a resume replays a reshuffled order too
    return ["--student", str(student), "--cache", str(cache), "--out", str(out), "--max-steps", str(steps),
            "--save-steps", str(save_steps), "--batch-size", "2", "--lr", "3e-3", "--seed", str(seed),
            "--logging-steps", "1", "--workers", "0", "--no-verify", "--no-progress"]


def last_checkpoint_step(out: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*")
             if (p / "trainer_state.json").is_file()]
    return max(steps, default=0)


def draw_distill_kill(rng: random.Random, steps: int, save_steps: int, done: int, seconds: float, i: int) -> Kill:
    """The first kills visit every moment once; the step is drawn past the last complete checkpoint
    (for the checkpoint moments, among the steps that save one)."""
    point = DISTILL_POINTS[i] if i < len(DISTILL_POINTS) else rng.choice(DISTILL_POINTS)
    if point == "dtime":
        return Kill("dtime", delay=rng.uniform(0.0, 0.9 * seconds))
    ahead = range(done + 1, steps + 1)
    if point in ("checkpoint", "published"):
        ahead = [n for n in ahead if n % save_steps == 0 or n == steps]
    return Kill(point, n=rng.choice(list(ahead) or [steps]))


def compare_students(ref: Path, got: Path) -> None:
    """The exported student and adapters, tensor for tensor, bit for bit; metrics.jsonl holds
    each step once, with the reference's losses exactly."""
    import json

    from safetensors.torch import load_file

    def logged(run: Path) -> list[dict]:
        return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    assert logged(got) == logged(ref), f"{got}: steps or losses in metrics.jsonl differ from the reference"
    for name in ("model.safetensors", "adapters.safetensors"):
        a, b = load_file(ref / name), load_file(got / name)
        assert a.keys() == b.keys(), f"{got / name}: other tensors than the reference"
        for key in a:
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, f"{got / name}: {key}"
            diff = (a[key].double() - b[key].double()).abs().max().item() if a[key].numel() else 0.0
            assert bits(a[key]) == bits(b[key]), f"{got / name}: {key} differs (max |diff| {diff:.3g})"


def bits(t) -> bytes:
    """A tensor's bytes (any dtype): nan == nan and 0.0 != -0.0 here, unlike torch.equal."""
    import torch

    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy())


@dataclass
class DistillTally:
    killed: Counter = field(default_factory=Counter)      # moment -> kills delivered
    finished: Counter = field(default_factory=Counter)    # moment -> runs that ended before their moment came
    runs: int = 0                                         # runs finished and found bit-identical
    checkpoint_at_kill: Counter = field(default_factory=Counter)  # last complete checkpoint's step -> kills


def distill_torture(world: dict, root: Path, kills: int, per_run: int, steps: int, save_steps: int,
                    rng: random.Random, on_run=None) -> DistillTally:
    """Deliver `kills` SIGKILLs to distill runs (each run taking up to `per_run`, each rerun resuming
    the last), finish each run unarmed and compare its student with an uninterrupted run's."""
    reference = root / "distill-reference"
    start = time.perf_counter()
    args = distill_args(world["student"], world["cache"], reference, steps, save_steps)
    if distill_until_killed(args, None, root / "distill-reference.log") != "finished":
        raise AssertionError(f"the reference distill failed: {(root / 'distill-reference.log').read_text()}")
    seconds = time.perf_counter() - start
    tally = DistillTally()
    delivered, index = 0, 0
    while delivered < kills:
        out = root / f"distill-{index:05d}"
        index += 1
        for _ in range(min(per_run, kills - delivered)):
            kill = draw_distill_kill(rng, steps, save_steps, last_checkpoint_step(out), seconds, delivered)
            if distill_once(world, out, steps, save_steps, kill) == "finished":
                tally.finished[kill.point] += 1
                if kill.point == "dtime":  # this run was faster than the reference: aim earlier
                    seconds /= 2
                break
            delivered += 1
            tally.killed[kill.point] += 1
            tally.checkpoint_at_kill[last_checkpoint_step(out)] += 1
        if distill_once(world, out, steps, save_steps, None) != "finished":
            raise AssertionError(f"the final resume of {out} did not finish")
        compare_students(reference, out)
        tally.runs += 1
        shutil.rmtree(out)
        if on_run:
            on_run(delivered, tally)
    return tally


def distill_once(world: dict, out: Path, steps: int, save_steps: int, kill: Kill | None) -> str:
    """One run: fresh, --resume from the last checkpoint, or --overwrite when none was complete."""
    flag = [] if not out.exists() else ["--resume"] if last_checkpoint_step(out) else ["--overwrite"]
    log = out.with_name(out.name + ".log")
    outcome = distill_until_killed(distill_args(world["student"], world["cache"], out, steps, save_steps) + flag,
                                   kill, log)
    if outcome == "failed":
        raise AssertionError(f"a distill of {out} {' '.join(flag)} failed while armed with {kill}: "
                             f"{log.read_text()[-2000:]}")
    return outcome


def distill_world(root: Path, samples: int = 8) -> dict:
    """make_world's teacher and manifest, its cache, and a smaller student with the same tokenizer."""
    from alignkd.cache.teacher.build import BuildConfig

    world = make_world(root, samples)
    cfg = BuildConfig(teacher=str(world["teacher"]), data=str(world["data"]), images=str(world["images"]),
                      out=str(root / "distill-cache"), batch_size=4, progress=False)
    if build_until_killed(cfg, None) != "finished":
        raise AssertionError("the cache build failed")
    return {**world, "cache": Path(cfg.out), "student": build_student(root / "student")}


def run_distill(kills: int, per_run: int, steps: int, save_steps: int, seed: int, root: Path) -> DistillTally:
    import torch

    torch.set_num_threads(1)
    world = distill_world(root)

    def report(delivered, tally):
        print(f"  {delivered}/{kills} kills delivered, {tally.runs} students equal so far", flush=True)

    return distill_torture(world, root, kills, per_run, steps, save_steps, random.Random(seed), on_run=report)


def main_distill(args) -> None:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="alignkd-torture-distill-") as tmp:
        tally = run_distill(args.kills, args.per_cache, args.steps, args.save_steps, args.seed, Path(tmp))
    print_kills(DISTILL_POINTS, tally)
    at_kill = ", ".join(f"{n}: {c}" for n, c in sorted(tally.checkpoint_at_kill.items()))
    print(f"\nlast complete checkpoint when killed (step: kills): {at_kill}")
    print(f"{tally.runs} runs resumed to the end, every student bit-identical to the uninterrupted run "
          f"({sum(tally.killed.values())} kills, {time.perf_counter() - start:.0f} s)")
# ================================================================ end of the distill kill matrix

def print_kills(points, tally) -> None:
    """The kills per moment, and how often a run finished before its kill came."""
    print(f"\n{'moment':<15} {'killed':>7} {'finished first':>15}")
    for point in points:
        print(f"{point:<15} {tally.killed[point]:>7} {tally.finished[point]:>15}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--samples", type=int, default=14)
    parser.add_argument("--per-cache", type=int, default=8, help="kills applied to one cache before it finishes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite-rounds", type=int, default=2,
                        help="rounds of the --overwrite matrix (each case once per round)")
    parser.add_argument("--distill", action="store_true", help="kill `alignkd distill --resume` runs instead")
    parser.add_argument("--steps", type=int, default=10, help="--distill: steps per run")
    parser.add_argument("--save-steps", type=int, default=3, help="--distill: steps between checkpoints")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.distill:
        return main_distill(args)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="alignkd-torture-") as tmp:
        tally, overwrites = run(args.kills, args.samples, args.per_cache, args.seed, Path(tmp), args.overwrite_rounds)
    print_kills(POINTS, tally)
    at_kill = ", ".join(f"{n}: {c}" for n, c in sorted(tally.shards_at_kill.items()))
    print(f"\ncommitted shards when killed (shards: kills): {at_kill}")
    print(f"{tally.caches} caches resumed to the end, every one equal to the uninterrupted build "
          f"({sum(tally.killed.values())} kills, {time.perf_counter() - start:.0f} s)")
    print(f"\n{'--overwrite case':<24} {'outcome':<9} {'runs':>5}   (every user file byte-identical after each)")
    for (case, outcome), n in sorted(overwrites.items()):
        print(f"{case:<24} {outcome:<9} {n:>5}")


if __name__ == "__main__":
    main()
