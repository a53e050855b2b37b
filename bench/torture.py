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

    .venv/bin/python bench/torture.py --kills 200              # the long run (BENCHMARKS.md)
    .venv/bin/python bench/torture.py --kills 12 --samples 10  # a quick look
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
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from alignkd.storage_schemas import ARRAY_KINDS

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


def build_until_killed(cfg, kill: Kill | None) -> str:
    """Run build_cache(cfg) in a forked child armed with `kill`: 'killed', 'finished' or 'failed'."""
    from alignkd.cache.build import build_cache

    pid = os.fork()
    if pid == 0:  # the child never returns into the caller's stack
        code = 1
        try:
            if kill is not None:
                arm(kill)
            build_cache(cfg)
            code = 0
        except BaseException as exc:  # reported through the exit code only
            print(f"build failed: {exc!r}", file=sys.stderr)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return "killed"
    return "finished" if os.waitstatus_to_exitcode(status) == 0 else "failed"


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
USER_FILES = {"thesis.txt": b"four years of work\n", "src/m.py": b"x = 1\n", ".notes": b"hidden, still the user's\n"}
FOREIGN_CACHE_JSON = ("{}", "not json", '{"format": "my-notes"}', "[1, 2]", "")


def plant_user_files(root: Path, extra: tuple[str, ...] = ()) -> None:
    for rel, data in {**USER_FILES, **{rel: rel.encode() for rel in extra}}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def digests(root: Path) -> dict[str, str]:
    """Every file and link under root (links not followed): path -> sha256, or the link's target."""
    import hashlib

    found = {}
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(parent) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                found[rel] = "link:" + os.readlink(path)
            elif path.is_file():
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


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
    from alignkd.cache.build import build_cache
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
            before = digests(place)
            outcome = overwrite_outcome(replace(ref_cfg, out=str(out)))
            after = digests(place)
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
    from PIL import Image

    from alignkd.demo.tiny_models import TinyLlavaSpec, build_tiny_llava

    teacher = build_tiny_llava(root / "teacher", TinyLlavaSpec(), seed=0)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    answers = ["red", "blue circle", "yes", "no", "green square", "3", "left", "a red cross above"]
    records = []
    for i in range(n_samples):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(images / f"{i}.png")
        conv = [{"from": "human", "value": "<image>\nwhat is the colour of this image ?"},
                {"from": "gpt", "value": answers[i % len(answers)]}]
        records.append({"id": f"s{i}", "image": f"{i}.png", "conversations": conv})
    conv = records[0]["conversations"]
    records += [{"id": "gone", "image": "gone.png", "conversations": conv}, {"id": "s0", "image": "0.png",
                                                                             "conversations": conv}]
    import json

    (root / "data.json").write_text(json.dumps(records))
    return {"teacher": teacher, "data": root / "data.json", "images": images}


def reference_build(world: dict, root: Path, **opts):
    from alignkd.cache.build import BuildConfig

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--samples", type=int, default=14)
    parser.add_argument("--per-cache", type=int, default=8, help="kills applied to one cache before it finishes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite-rounds", type=int, default=2,
                        help="rounds of the --overwrite matrix (each case once per round)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="alignkd-torture-") as tmp:
        tally, overwrites = run(args.kills, args.samples, args.per_cache, args.seed, Path(tmp), args.overwrite_rounds)
    print(f"\n{'moment':<15} {'killed':>7} {'finished first':>15}")
    for point in POINTS:
        print(f"{point:<15} {tally.killed[point]:>7} {tally.finished[point]:>15}")
    at_kill = ", ".join(f"{n}: {c}" for n, c in sorted(tally.shards_at_kill.items()))
    print(f"\ncommitted shards when killed (shards: kills): {at_kill}")
    print(f"{tally.caches} caches resumed to the end, every one equal to the uninterrupted build "
          f"({sum(tally.killed.values())} kills, {time.perf_counter() - start:.0f} s)")
    print(f"\n{'--overwrite case':<24} {'outcome':<9} {'runs':>5}   (every user file byte-identical after each)")
    for (case, outcome), n in sorted(overwrites.items()):
        print(f"{case:<24} {outcome:<9} {n:>5}")


if __name__ == "__main__":
    main()
