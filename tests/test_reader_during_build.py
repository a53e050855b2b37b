"""A reader during a build: a process that opens the cache while a build runs sees exactly
the committed shards, never the shard in flight, and what it has opened stays readable
and unchanged while new shards land.

The build runs in a forked child that pauses whenever a new shard has received its first
sample (a pipe handshake wrapped around the writer's shard `add`): the shards before it
are committed and the new one is a half-filled temporary directory, and the reader looks
at every such stage.
"""

from __future__ import annotations

import os

import numpy as np

from alignkd.cache.teacher.build import BuildConfig, build_cache
from alignkd.cache.catalog import run_sql
from alignkd.cache.reader import open_cache
from alignkd.cache.shard_format import committed_shards
from bench import torture
from tests.support.world import make_image, write_manifest

N, SHARD = 7, 2


def _build_pausing_in_each_shard(cfg) -> tuple[int, int, int]:
    """Fork a build that writes one byte when a shard gets its first sample and waits for one back."""
    done_r, done_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            from alignkd.cache import shard_commit

            add = shard_commit.ShardInProgress.add

            def add_then_pause(shard, rec, encoded, store_images):
                add(shard, rec, encoded, store_images)
                if len(shard.rows) == 1:
                    os.write(done_w, b"c")
                    os.read(go_r, 1)

            shard_commit.ShardInProgress.add = add_then_pause
            build_cache(cfg)
            code = 0
        finally:
            os.write(done_w, b"e")
            os._exit(code)
    # Only the child holds the write end now: if it dies without a word, the parent's
    # read returns b"" (and the test fails) instead of waiting forever.
    os.close(done_w)
    os.close(go_r)
    return pid, done_r, go_w


def _samples(reader) -> dict:
    return {sid: reader[i] for i, sid in enumerate(reader.sample_ids)}


def _same(a, b) -> bool:
    return all(np.array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f))) for f in torture.TENSORS)


def test_reader_sees_only_committed_shards_and_stays_valid(tmp_path, tiny_llava_dir):
    conv = [{"from": "human", "value": "<image>\nwhat is the colour of this image ?"}, {"from": "gpt", "value": "red"}]
    for i in range(N):
        make_image(tmp_path / "images" / f"{i}.png", seed=i)
    data = write_manifest(tmp_path / "data.json", [{"id": f"s{i}", "image": f"{i}.png", "conversations": conv}
                                                   for i in range(N)])
    out = tmp_path / "cache"
    cfg = BuildConfig(teacher=str(tiny_llava_dir), data=str(data), images=str(tmp_path / "images"), out=str(out),
                      batch_size=1, shard_size=SHARD, progress=False)
    pid, done_r, go_w = _build_pausing_in_each_shard(cfg)
    opened: list[tuple[object, dict]] = []  # readers opened at earlier stages, with what they read then
    pauses = 0
    while os.read(done_r, 1) == b"c":
        pauses += 1
        commits = len(committed_shards(out))
        assert commits == pauses - 1  # every earlier shard, not the one being filled
        assert len(list((out / "shards").glob(".tmp-shard-*"))) == 1  # which is on disk, half written
        reader = open_cache(out)
        assert len(reader) == commits * SHARD == len(set(reader.sample_ids))
        assert run_sql(out, "SELECT count(*) AS n FROM samples").to_pylist() == [{"n": len(reader)}]
        now = _samples(reader)
        for old_reader, old_read in opened:  # earlier readers still read the same bytes
            again = _samples(old_reader)
            assert again.keys() == old_read.keys()
            assert all(_same(again[s], old_read[s]) for s in again)
            assert all(_same(now[s], old_read[s]) for s in old_read)
        opened.append((reader, now))
        os.write(go_w, b"g")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert pauses == -(-N // SHARD)
    final = open_cache(out)
    assert len(final) == N
    for old_reader, old_read in opened:
        assert all(_same(_samples(final)[s], old_read[s]) for s in old_read)
