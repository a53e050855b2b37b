"""The corruption matrix: every kind of cache file damaged in turn.

For each damage, `cache verify` names the file and the kind of damage, `distill` refuses
before its first step, and `cache sql` / `cache stats` either answer or say one sentence;
nothing ends in a traceback.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from alignkd.cache.teacher.build import BuildConfig, build_cache
from alignkd.cli import main
from tests.support.world import make_image, write_manifest


def _flip(path: Path, at: int, n: int = 8) -> None:
    """XOR n bytes at offset `at` (negative: from the end); the size stays the same."""
    data = bytearray(path.read_bytes())
    start = at % len(data)
    for i in range(start, min(start + n, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _first_shard(cache: Path) -> Path:
    return sorted((cache / "shards").glob("shard-*"))[0]


# name -> (damage, file verify must name, words verify must use for the kind of damage)
DAMAGES = {
    "parquet footer": (lambda c: _flip(_first_shard(c) / "samples.parquet", -8), "samples.parquet", "sha256"),
    "parquet truncated": (lambda c: _truncate(_first_shard(c) / "samples.parquet", 100), "samples.parquet",
                          "truncated"),
    "zarr chunk": (lambda c: _flip(_first_shard(c) / "attn" / "c" / "0", 40), "attn/c/0", "sha256"),
    "shard index": (lambda c: _flip(_first_shard(c) / "attn" / "c" / "0", -12), "attn/c/0", "sha256"),
    "zarr.json": (lambda c: (_first_shard(c) / "vision" / "zarr.json").write_text("{"), "vision/zarr.json", ""),
    "shard.json": (lambda c: (_first_shard(c) / "shard.json").write_text('{"format": '), "shard.json",
                   "cannot be read"),
    "cache.json": (lambda c: (c / "cache.json").write_text("[1, 2"), "cache.json", "cannot be read"),
    "catalog": (lambda c: _flip(c / "catalog.duckdb", 0, 4096), "catalog.duckdb", "cannot be read"),
    "tokenizer": (lambda c: (c / "tokenizer" / "tokenizer.json").write_text('{"model": '), "tokenizer/tokenizer.json",
                  "cannot be loaded"),
}


def _truncate(path: Path, n: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-n])


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_llava_dir):
    root = tmp_path_factory.mktemp("corrupt")
    conv = [{"from": "human", "value": "<image>\nwhat is the colour of this image ?"}, {"from": "gpt", "value": "red"}]
    for i in range(4):
        make_image(root / "images" / f"{i}.png", seed=i)
    data = write_manifest(root / "data.json", [{"id": f"s{i}", "image": f"{i}.png", "conversations": conv}
                                               for i in range(4)])
    build_cache(BuildConfig(teacher=str(tiny_llava_dir), data=str(data), images=str(root / "images"),
                            out=str(root / "cache"), batch_size=4, shard_size=2, progress=False))
    return root / "cache"


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_sentence_or_answer(result) -> None:
    assert isinstance(result.exception, (SystemExit, type(None))), repr(result.exception)
    assert "Traceback" not in result.output
    if result.exit_code:
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), result.output


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damage_is_named_refused_and_never_a_traceback(built, tmp_path, tiny_student_dir, damage):
    harm, named_file, kind_words = DAMAGES[damage]
    cache = tmp_path / "cache"
    shutil.copytree(built, cache)
    harm(cache)
    verify = _run("cache", "verify", cache)
    assert verify.exit_code == 1 and isinstance(verify.exception, SystemExit), verify.output
    first = verify.output.splitlines()[0]
    assert named_file in first and kind_words in first, verify.output
    distill = _run("distill", "--student", tiny_student_dir, "--cache", cache, "--out", tmp_path / "run",
                   "--max-steps", "2", "--no-progress")
    _one_sentence_or_answer(distill)
    assert distill.exit_code == 1 and not (tmp_path / "run" / "metrics.jsonl").exists()
    _one_sentence_or_answer(_run("cache", "sql", cache, "SELECT count(*) AS n FROM samples"))
    _one_sentence_or_answer(_run("cache", "stats", cache))
