"""Caches on object storage: a moto S3 server on 127.0.0.1 (free port), reached through fsspec/s3fs
with the standard AWS environment. Build, resume after a kill, verify, sql, distill."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from alignkd.cache.catalog import run_sql
from alignkd.cache.reader import open_cache
from alignkd.cache.verify import verify_cache
from alignkd.cache.writer import CacheWriter

from test_cache_build import cli, make_dataset
from test_cache_storage import META, make_record

REPO = Path(__file__).resolve().parents[1]


def _same_samples(a, b) -> None:
    assert a.sample_ids == b.sample_ids
    for i in range(len(a)):
        x, y = a[i], b[i]
        for name in ("attn", "vision", "focus", "logit_ids", "logit_values", "logit_tail", "input_ids"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name), err_msg=name)
        assert x.image_bytes == y.image_bytes


def test_build_on_s3_equals_local_and_verifies(s3, tmp_path, tiny_llava_dir):
    data, images = make_dataset(tmp_path, 5)
    url = s3["url"]("built")
    for out in (url, tmp_path / "local"):
        result = cli("cache", "build", "--teacher", tiny_llava_dir, "--data", data, "--images", images,
                     "--out", out, "--batch-size", "2", "--shard-size", "2", "--no-progress")
        assert result.exit_code == 0, result.output
    _same_samples(open_cache(url), open_cache(tmp_path / "local"))
    fs = s3["fs"]
    keys = {k.split("/built/", 1)[1] for k in fs.find("alignkd-test/built")}
    assert {"cache.json", "shards/shard-000000/shard.json", "shards/shard-000002/samples.parquet",
            "tokenizer/tokenizer.json"} <= keys and "catalog.duckdb" not in keys
    assert verify_cache(url) == []
    assert cli("cache", "verify", url).exit_code == 0
    stats = cli("cache", "stats", url)
    assert stats.exit_code == 0 and "samples 5 in 3 shard(s)" in stats.output
    # a flipped byte in one object is named by verify
    key = "alignkd-test/built/shards/shard-000001/vision/c/0"
    blob = bytearray(fs.cat_file(key))
    blob[len(blob) // 2] ^= 0x01
    fs.pipe_file(key, bytes(blob))
    problems = verify_cache(url)
    assert [(p.shard, p.file) for p in problems][:1] == [("shard-000001", "vision/c/0")]
    assert "sha256" in problems[0].message


def test_sql_on_s3_through_register_filesystem(s3):
    url = s3["url"]("sql")
    recs = [make_record(i) for i in range(5)]
    with CacheWriter(url, META, shard_size=2) as w:
        for r in recs:
            w.add(r)
        w.reject("bad9", 9, "too_long", "x")
    got = run_sql(url, "SELECT count(*) AS n, sum(teacher_ce) AS ce FROM samples").to_pylist()
    assert got == [{"n": 5, "ce": sum(r.teacher_ce for r in recs)}]
    assert run_sql(url, "SELECT sample_id FROM rejects").to_pylist() == [{"sample_id": "bad9"}]
    assert run_sql(url, "SELECT count(*) AS n FROM shards").to_pylist() == [{"n": 3}]
    out = cli("cache", "sql", url, "SELECT count(*) AS n FROM samples")
    assert out.exit_code == 0 and "5" in out.output


KILLED = """
import os, time
from tests.test_cache_storage import make_record, META
from alignkd.cache.storage import open_store
from alignkd.cache.writer import CacheWriter
w = CacheWriter({url!r}, META, shard_size=2)
for i in range(3):
    w.add(make_record(i))
while not open_store({url!r}).is_file("shards/shard-000000/shard.json"):
    time.sleep(0.05)
os._exit(0)  # killed: the third sample's shard is never uploaded
"""


def test_resume_after_a_kill_on_s3(s3, tmp_path):
    url = s3["url"]("resume")
    code = KILLED.format(url=url)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert open_cache(url).sample_ids == ["s000", "s001"]
    # objects of a shard whose upload died before shard.json: not part of the cache
    fs = s3["fs"]
    fs.pipe_file("alignkd-test/resume/shards/shard-000001/attn/c/0", b"partial upload")
    assert open_cache(url).sample_ids == ["s000", "s001"]
    with CacheWriter(url, META, shard_size=2) as w:
        assert w.done_rows == {0, 1}
        for i in range(2, 5):
            w.add(make_record(i))
    with CacheWriter(tmp_path / "local", META, shard_size=2) as w:
        for i in range(5):
            w.add(make_record(i))
    _same_samples(open_cache(url), open_cache(tmp_path / "local"))
    assert verify_cache(url) == []  # the stray object was replaced, not left unlisted


def test_distill_from_s3_cache(s3, tmp_path, tiny_llava_dir, tiny_student_dir, monkeypatch):
    from alignkd.distill.run import DistillConfig, distill

    data, images = make_dataset(tmp_path, 4)
    url = s3["url"]("distill")
    result = cli("cache", "build", "--teacher", tiny_llava_dir, "--data", data, "--images", images,
                 "--out", url, "--batch-size", "2", "--no-progress")
    assert result.exit_code == 0, result.output
    monkeypatch.setenv("ALIGNKD_READ_CACHE", str(tmp_path / "read-cache"))  # local read-through copies
    summary = distill(DistillConfig(student=str(tiny_student_dir), cache=url, out=str(tmp_path / "run"),
                                    batch_size=2, max_steps=3, logging_steps=1, progress=False, workers=2))
    assert summary.steps == 3 and all(np.isfinite(v) for v in summary.final_losses.values())
    assert any((tmp_path / "read-cache").iterdir())  # epochs after the first read local copies
