"""Trust around the cache directory (issue 23): `--overwrite` deletes only what alignkd wrote,
a cache leading outside itself (a symbolic link) is refused by every reader and named by
`cache verify`, verify during a running build reports only real damage, and `cache show`
reads with its checksums on and writes PNG only.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from alignkd.cache.teacher.build import BuildConfig, build_cache
from alignkd.cache.lock import CacheLock, build_in_progress
from alignkd.cache.reader import open_cache
from alignkd.cache.storage import OutsideCacheError
from alignkd.cli import main
from tests.support.files import plant_user_files, snapshot
from tests.support.world import make_image, write_manifest

CONV = [{"from": "human", "value": "<image>\nwhat is the colour of this image ?"}, {"from": "gpt", "value": "red"}]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def error_line(result) -> str:
    """The one `error: ...` sentence of a refused command, exit 1, no traceback."""
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip() and "Loading weights" not in ln]
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].endswith("."), lines
    return lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llava_dir):
    root = tmp_path_factory.mktemp("trust")
    for i in range(4):
        make_image(root / "images" / f"{i}.png", seed=i)
    data = write_manifest(root / "data.json", [{"id": f"s{i}", "image": f"{i}.png", "conversations": CONV}
                                               for i in range(4)])
    cfg = BuildConfig(teacher=str(tiny_llava_dir), data=str(data), images=str(root / "images"),
                      out=str(root / "cache"), batch_size=1, shard_size=2, progress=False)
    build_cache(cfg)
    return {"root": root, "cache": root / "cache", "teacher": tiny_llava_dir, "data": data,
            "images": root / "images"}


def build_args(world, out, *extra):
    return ["cache", "build", "--teacher", world["teacher"], "--data", world["data"], "--images", world["images"],
            "--out", out, "--no-progress", *extra]


# ---------------------------------------------------------------- 1. --overwrite
@pytest.mark.parametrize("text", ["{}", "not json", '{"format": "my-notes"}', "[1, 2]"])
def test_overwrite_refuses_a_foreign_cache_json_and_touches_nothing(world, tmp_path, text):
    out = tmp_path / "home"
    plant_user_files(out)
    (out / "cache.json").write_text(text)
    before = snapshot(out)
    line = error_line(cli(*build_args(world, out, "--overwrite")))
    assert f"{out}/cache.json does not describe an alignkd cache" in line and "deleted nothing" in line
    assert snapshot(out) == before  # not even a lock file


def test_overwrite_of_a_cache_deletes_only_what_alignkd_wrote(world, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(world["cache"], out)
    plant_user_files(out)
    (out / "shards" / "README").write_text("the user's, inside shards/\n")
    user = {rel: h for rel, h in snapshot(out).items() if rel in
            ("thesis.txt", "src/m.py", ".notes", "shards/README")}
    # leftovers of killed builds are alignkd's, and go too
    (out / "catalog.duckdb.tmp-4242").write_bytes(b"half a catalog")
    (out / "shards" / ".tmp-shard-000009").mkdir()
    result = cli(*build_args(world, out, "--overwrite", "--shard-size", 3))
    assert result.exit_code == 0, result.output
    after = snapshot(out)
    assert {rel: after.get(rel) for rel in user} == user
    assert not (out / "catalog.duckdb.tmp-4242").exists() and not (out / "shards" / ".tmp-shard-000009").exists()
    assert sorted(p.name for p in (out / "shards").glob("shard-*")) == ["shard-000000", "shard-000001"]
    assert sorted(open_cache(out).sample_ids) == ["s0", "s1", "s2", "s3"]
    assert cli("cache", "verify", out).exit_code == 0
    # what the cache holds once is alignkd's own entries, never the user's files beside them
    assert "thesis" not in result.output and "src" not in result.output.split("once (")[1]
    from alignkd.cache.inspection.stats import build_footprint

    assert set(build_footprint(out)["fixed"]) == {"cache.json", "catalog.duckdb", "tokenizer"}


def test_overwrite_refuses_an_out_that_is_a_symbolic_link(world, tmp_path):
    real = tmp_path / "real"
    shutil.copytree(world["cache"], real)
    plant_user_files(real)
    before = snapshot(real)
    (tmp_path / "link").symlink_to(real)
    line = error_line(cli(*build_args(world, tmp_path / "link", "--overwrite")))
    assert f"--out {tmp_path / 'link'} is a symbolic link (to {real})" in line
    assert snapshot(real) == before


@pytest.mark.parametrize("overwrite", [True, False])
def test_build_refuses_a_cache_whose_shards_lead_outside(world, tmp_path, overwrite):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(world["cache"] / "shards", elsewhere)
    plant_user_files(elsewhere)
    out = tmp_path / "cache"
    shutil.copytree(world["cache"], out, ignore=shutil.ignore_patterns("shards"))
    (out / "shards").symlink_to(elsewhere)
    before, before_out = snapshot(elsewhere), snapshot(out)
    line = error_line(cli(*build_args(world, out, *(["--overwrite"] if overwrite else []))))
    assert f"{out}/shards leads outside the cache (to {elsewhere})" in line
    assert snapshot(elsewhere) == before and snapshot(out) == before_out


@pytest.mark.parametrize("link", [".lock", ".tmp-cache.json", "shards/.tmp-shard-000000", "catalog.duckdb"])
def test_a_build_never_writes_through_a_link_in_the_cache(world, tmp_path, link):
    """The hidden files a build writes or deletes (its lock, a temporary cache.json, a stale
    temporary shard) and the catalog: a link there is refused or removed, never followed."""
    victim = tmp_path / "home"
    plant_user_files(victim)
    before = snapshot(victim)
    out = tmp_path / "cache"
    if link.startswith("shards/") or link == "catalog.duckdb":  # only a cache has these
        shutil.copytree(world["cache"], out)
        (out / link).unlink(missing_ok=True)
    (out / link).parent.mkdir(parents=True, exist_ok=True)
    (out / link).symlink_to(victim if link.startswith("shards/") else victim / "thesis.txt")
    result = cli(*build_args(world, out))
    if link in (".lock", "catalog.duckdb"):
        line = error_line(result)
        assert f"{out}/{link}" in line and ("symbolic link" in line or "leads outside" in line)
    else:
        assert result.exit_code == 0, result.output
        assert not (out / link).is_symlink()
    assert snapshot(victim) == before


# ---------------------------------------------------------------- 2. links leading outside
def _link_shards(cache: Path, outside: Path) -> str:
    shutil.move(cache / "shards", outside / "shards")
    (cache / "shards").symlink_to(outside / "shards")
    return "shards"


def _link_file(rel: str):
    def link(cache: Path, outside: Path) -> str:
        target = outside / rel.replace("/", "_")
        shutil.move(cache / rel, target)  # the same bytes, only no longer inside the cache
        (cache / rel).symlink_to(target)
        return rel
    return link


LINKS = {
    "shards/": _link_shards,
    "a shard directory": _link_file("shards/shard-000000"),
    "shard.json": _link_file("shards/shard-000000/shard.json"),
    "samples.parquet": _link_file("shards/shard-000000/samples.parquet"),
    "a zarr chunk file": _link_file("shards/shard-000000/attn/c/0"),
    "an array directory": _link_file("shards/shard-000000/vision"),
    "cache.json": _link_file("cache.json"),
}
# what each reader touches: sql and stats read cache.json, the shards' shard.json and Parquet files
LISTED = {"shards/", "a shard directory", "shard.json", "samples.parquet", "cache.json"}


@pytest.mark.parametrize("where", list(LINKS))
def test_every_reader_refuses_a_cache_leading_outside_and_verify_names_it(world, tmp_path, where):
    cache, outside = tmp_path / "cache", tmp_path / "outside"
    shutil.copytree(world["cache"], cache)
    outside.mkdir()
    rel = LINKS[where](cache, outside)

    def refused(line: str) -> bool:  # names the link (or the file opened through it)
        return f"error: {cache}/{rel}" in line and "leads outside the cache" in line

    with pytest.raises(OutsideCacheError, match="leads outside the cache"):
        reader = open_cache(cache)
        [reader[i] for i in range(len(reader))]
    assert refused(error_line(cli("cache", "show", cache, "s0", "--out", tmp_path / "s0.png")))
    if where in LISTED:
        assert refused(error_line(cli("cache", "sql", cache, "SELECT count(*) FROM samples")))
        assert refused(error_line(cli("cache", "stats", cache)))
    verify = cli("cache", "verify", cache)
    assert verify.exit_code == 1 and f"{rel}: leads outside the cache" in verify.output, verify.output
    assert not (tmp_path / "s0.png").exists()


def test_the_reported_escape_reads_nothing(world, tmp_path, tiny_student_dir):
    """The issue's reproduction: a cache.json beside `shards -> /` read /etc/shadow through
    `cache sql`; here a secret file stands in for it, and distill refuses the cache too."""
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2\n")
    cache = tmp_path / "e"
    cache.mkdir()
    shutil.copy(world["cache"] / "cache.json", cache)
    (cache / "shards").symlink_to("/")
    result = cli("cache", "sql", cache, f"SELECT content FROM read_text('{secret}')")
    assert f"{cache}/shards leads outside the cache (to /)" in error_line(result)
    assert "hunter2" not in result.output
    for flag in ("--verify", "--no-verify"):
        line = error_line(cli("distill", "--student", tiny_student_dir, "--cache", cache, "--out", tmp_path / "s",
                              "--max-steps", 1, "--no-progress", flag))
        assert "shards" in line and "leads outside the cache" in line
    verify = cli("cache", "verify", cache)
    assert verify.exit_code == 1 and "shards: leads outside the cache (to /)" in verify.output


def test_a_link_inside_the_cache_is_no_escape(world, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(world["cache"], cache)
    shutil.move(cache / "shards", cache / "data")
    (cache / "shards").symlink_to("data")  # relative, and inside
    assert len(open_cache(cache)) == 4
    assert cli("cache", "sql", cache, "SELECT count(*) AS n FROM samples").exit_code == 0


def test_show_refuses_a_tokenizer_kept_outside_the_cache(world, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(world["cache"], cache)
    shutil.move(cache / "tokenizer", tmp_path / "tokenizer")
    (cache / "tokenizer").symlink_to(tmp_path / "tokenizer")
    line = error_line(cli("cache", "show", cache, "s0", "--out", tmp_path / "s0.png"))
    assert f"{cache}/tokenizer leads outside the cache" in line
    verify = cli("cache", "verify", cache)
    assert verify.exit_code == 1 and "tokenizer: leads outside the cache" in verify.output


# ---------------------------------------------------------------- 3. verify during a build
def _fork_build(cfg) -> int:
    """A real build in a forked child (no second interpreter to start), as test_reader_during_build does."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            build_cache(cfg)
            code = 0
        finally:
            os._exit(code)
    return pid


def test_verify_during_a_build_reports_no_false_damage_and_says_a_build_runs(world, tmp_path):
    for i in range(12):
        make_image(tmp_path / "images" / f"{i}.png", seed=i)
    data = write_manifest(tmp_path / "data.json", [{"id": f"b{i}", "image": f"{i}.png", "conversations": CONV}
                                                   for i in range(12)])
    out = tmp_path / "cache"
    pid = _fork_build(BuildConfig(teacher=str(world["teacher"]), data=str(data), images=str(tmp_path / "images"),
                                  out=str(out), batch_size=1, shard_size=1, progress=False))
    runs, during, status = [], 0, None
    try:
        deadline = time.monotonic() + 120
        while not (out / "cache.json").is_file() and time.monotonic() < deadline:
            time.sleep(0.01)
        while status is None:
            result = cli("cache", "verify", out)
            runs.append(result)
            during += "a build is in progress" in result.output
            time.sleep(0.1)  # leave the build a core
            if os.waitpid(pid, os.WNOHANG)[0]:
                status = "ended"
    finally:
        if status is None:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
    failed = [r.output for r in runs if r.exit_code != 0]
    assert not failed, f"{len(failed)} of {len(runs)} verify runs failed during the build: {failed[0]}"
    assert during >= 3, f"only {during} of {len(runs)} runs saw the build"
    assert len(open_cache(out)) == 12 and build_in_progress(out) is None
    assert "a build is in progress" not in cli("cache", "verify", out).output


def test_a_probe_of_the_lock_does_not_refuse_a_build_starting_at_that_moment(tmp_path):
    import fcntl

    (tmp_path / ".lock").write_text("")
    fd = os.open(tmp_path / ".lock", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)  # what build_in_progress holds for an instant
    threading.Timer(0.05, lambda: os.close(fd)).start()
    lock = CacheLock(tmp_path).acquire()
    try:
        assert build_in_progress(tmp_path) == str(os.getpid())
    finally:
        lock.release()
    assert build_in_progress(tmp_path) is None


# ---------------------------------------------------------------- 4. cache show
def test_show_refuses_a_sample_that_fails_its_crc32(world, tmp_path):
    import pyarrow.parquet as pq

    cache = tmp_path / "cache"
    shutil.copytree(world["cache"], cache)
    shard = cache / "shards" / "shard-000000"
    first = pq.read_table(shard / "samples.parquet", columns=["sample_id"]).column(0)[0].as_py()
    chunks = shard / "attn" / "c" / "0"  # uint8-log attention is stored raw: a flipped byte decodes
    data = bytearray(chunks.read_bytes())
    data[3] ^= 0xFF
    chunks.write_bytes(bytes(data))
    line = error_line(cli("cache", "show", cache, first, "--out", tmp_path / "x.png"))
    assert f"sample {first}: attn fails its crc32 in shard-000000" in line
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("name", ["x.json", "x", "figure.pdf"])
def test_show_writes_png_only(world, tmp_path, name):
    line = error_line(cli("cache", "show", world["cache"], "s0", "--out", tmp_path / name))
    assert f"--out {tmp_path / name} must name a .png file" in line
    assert list(tmp_path.iterdir()) == []


def test_show_refuses_a_directory_and_names_the_file_it_wrote(world, tmp_path):
    line = error_line(cli("cache", "show", world["cache"], "s0", "--out", tmp_path))
    assert f"--out {tmp_path} is a directory" in line
    assert list(tmp_path.iterdir()) == []
    result = cli("cache", "show", world["cache"], "s0", "--out", tmp_path / "s0.PNG")
    assert result.exit_code == 0 and result.output.strip().endswith(f"wrote {tmp_path / 's0.PNG'}")
    assert (tmp_path / "s0.PNG").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
