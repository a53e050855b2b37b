"""One storage seam: the same reader, verify and SQL assertions on a local cache and on an
s3:// cache (the moto server of conftest), and no module outside alignkd/cache/storage/
that asks where a cache lives.

Each cache is written by `CacheWriter` from synthetic records (test_cache_storage), with a
tiny tokenizer stored through the seam, and damaged through the test's own access to its
bytes (a path, or the bucket), never through alignkd.
"""

from __future__ import annotations

import itertools
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from alignkd.cache.catalog import SQLRefusedError, run_sql
from alignkd.cache.encodings import decode, encode
from alignkd.cache.reader import SampleNotFoundError, open_cache
from alignkd.cache.inspection.stats import cache_stats
from alignkd.cache.storage import open_store
from alignkd.cache.verify import verify_cache
from test_cache_build import cli
from test_cache_storage import write_cache

REPO = Path(__file__).resolve().parents[1]
_names = itertools.count()


def save_tiny_tokenizer(into: Path) -> None:
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"[UNK]": 0, "red": 1}, unk_token="[UNK]")).save(str(into / "tokenizer.json"))


class Place:
    """Where a test cache lives, and the test's own hands on its bytes."""

    def __init__(self, location: str, fs=None) -> None:
        self.location, self.fs = location, fs

    def _key(self, rel: str) -> str:
        return f"{self.location.removeprefix('s3://')}/{rel}"

    def read(self, rel: str) -> bytes:
        return self.fs.cat_file(self._key(rel)) if self.fs else (Path(self.location) / rel).read_bytes()

    def write(self, rel: str, data: bytes) -> None:
        if self.fs:
            self.fs.pipe_file(self._key(rel), data)
        else:
            (Path(self.location) / rel).write_bytes(data)

    def delete(self, rel: str) -> None:
        self.fs.rm(self._key(rel)) if self.fs else (Path(self.location) / rel).unlink()


def make_place(kind: str, request, tmp_path: Path) -> Place:
    if kind == "local":
        return Place(str(tmp_path / f"seam-{next(_names)}"))
    s3 = request.getfixturevalue("s3")
    return Place(s3["url"](f"seam-{next(_names)}"), s3["fs"])


def build(place: Place):
    recs = write_cache(place.location, n=5, rejects=(7, 8))  # shards of 2, 2 and 1 samples
    open_store(place.location).write_dir("tokenizer", save_tiny_tokenizer)
    return recs


@pytest.fixture(scope="module")
def pristine(s3, tmp_path_factory):
    """One cache of each kind, never damaged: for the tests that only read."""
    places = {"local": Place(str(tmp_path_factory.mktemp("seam") / "local")),
              "s3": Place(s3["url"]("seam-pristine"), s3["fs"])}
    return {kind: (place, build(place)) for kind, place in places.items()}


@pytest.fixture(params=["local", "s3"])
def built(request, pristine):
    return pristine[request.param]


# ---------------------------------------------------------------- the reader
def test_reader_returns_what_was_written(built):
    place, recs = built
    reader = open_cache(place.location, check_crc=True)
    assert reader.sample_ids == [r.sample_id for r in recs] and reader.path == place.location
    for i, rec in enumerate(recs):
        got = reader[i]
        for kind in ("attn", "vision"):  # bfloat16 storage: exactly the encoding's round trip
            stored, scale = encode(getattr(rec, kind), "bfloat16")
            np.testing.assert_array_equal(getattr(got, kind), decode(stored, "bfloat16", scale, getattr(rec, kind).shape))
        for name in ("focus", "logit_ids", "input_ids", "label_mask", "text_positions"):
            np.testing.assert_array_equal(getattr(got, name), getattr(rec, name), err_msg=name)
        assert (got.image_bytes, got.manifest_row) == (rec.image_bytes, rec.manifest_row)
        assert reader.get(i, widen=False).attn.dtype == np.uint16  # bf16 bits, for the GPU to widen
    with pytest.raises(SampleNotFoundError, match=re.escape(f"sample nope is not in cache {place.location}.")):
        reader.index_of("nope")


def test_reader_crosses_pickle_and_fork_with_its_own_handles(built):
    """A DataLoader worker gets the reader pickled (spawn) or forked, and opens its own files
    (and its own S3 client) there."""
    place, _ = built
    reader = open_cache(place.location)
    want = reader[3].vision.tobytes()
    assert pickle.loads(pickle.dumps(reader))[3].vision.tobytes() == want
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if reader[3].vision.tobytes() == want and reader[0].image_bytes == (b"PNG0",) else 1
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


# ---------------------------------------------------------------- verify
DAMAGES = [  # what is done to the cache, and the problem verify must name: (shard, file, words)
    (lambda p: flip(p, "shards/shard-000001/vision/c/0"), ("shard-000001", "vision/c/0", "sha256")),
    (lambda p: p.write("shards/shard-000000/samples.parquet", p.read("shards/shard-000000/samples.parquet")[:-100]),
     ("shard-000000", "samples.parquet", "truncated")),
    (lambda p: p.write("shards/shard-000000/extra.bin", b"x"), ("shard-000000", "extra.bin", "not listed")),
    (lambda p: p.write("tokenizer/tokenizer.json", b'{"model": '), ("", "tokenizer/tokenizer.json", "cannot be loaded")),
]


def flip(place: Place, rel: str) -> None:
    data = bytearray(place.read(rel))
    data[len(data) // 2] ^= 0x01
    place.write(rel, bytes(data))


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_verify_names_every_damage(kind, request, tmp_path):
    place = make_place(kind, request, tmp_path)
    build(place)
    # a shard without shard.json does not exist, for every reader, and verify calls it incomplete
    place.delete("shards/shard-000002/shard.json")
    assert open_cache(place.location).sample_ids == ["s000", "s001", "s002", "s003"]
    for harm, _ in DAMAGES:
        harm(place)
    problems = verify_cache(place.location)
    for _, (shard, file, words) in DAMAGES + [(None, ("shard-000002", "shard.json", "incomplete"))]:
        assert any((p.shard, p.file) == (shard, file) and words in p.message for p in problems), (file, problems)
    result = cli("cache", "verify", place.location)
    assert result.exit_code == 1 and all(str(p) in result.output for p in problems)
    place.write("cache.json", b"[1, 2")
    (problem,) = verify_cache(place.location)
    assert problem.file == "cache.json" and problem.message.startswith(f"{place.location}/cache.json cannot be read")


# ---------------------------------------------------------------- SQL
def test_sql_answers_and_stays_in_its_sandbox(built, tmp_path):
    place, recs = built
    assert run_sql(place.location, "SELECT count(*) AS n, sum(teacher_ce) AS ce FROM samples").to_pylist() == [
        {"n": 5, "ce": sum(r.teacher_ce for r in recs)}]
    assert run_sql(place.location, "SELECT sample_id FROM rejects ORDER BY 1").to_pylist() == [
        {"sample_id": "bad7"}, {"sample_id": "bad8"}]
    assert run_sql(place.location, "SELECT name, n_samples FROM shards ORDER BY name").to_pylist() == [
        {"name": "shard-000000", "n_samples": 2}, {"name": "shard-000001", "n_samples": 2},
        {"name": "shard-000002", "n_samples": 1}]
    for query, named in (("SELECT * FROM read_csv('/etc/passwd')", "/etc/passwd"),
                         (f"SELECT * FROM read_text('{place.location}/cache.json')", f"{place.location}/cache.json")):
        with pytest.raises(SQLRefusedError, match=re.escape(named)):
            run_sql(place.location, query)
    result = cli("cache", "sql", place.location, "SELECT sample_id FROM samples ORDER BY 1", "--format", "csv")
    assert result.exit_code == 0 and result.output.split()[1:] == [f'"s00{i}"' for i in range(5)]


# ---------------------------------------------------------------- both at once
def test_local_and_s3_caches_give_the_same_answers(pristine):
    (local, _), (remote, _) = pristine["local"], pristine["s3"]
    a, b = open_cache(local.location), open_cache(remote.location)
    for i in range(len(a)):
        x, y = a.get(i, widen=False), b.get(i, widen=False)
        for name in ("attn", "vision", "focus", "logit_ids", "logit_values", "logit_tail", "input_ids"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name), err_msg=name)
    query = "SELECT * EXCLUDE (committed_at) FROM shards ORDER BY name"
    assert run_sql(local.location, query).to_pylist() == run_sql(remote.location, query).to_pylist()
    sa, sb = cache_stats(local.location), cache_stats(remote.location)
    assert sa.pop("path") == str(Path(local.location).resolve()) and sb.pop("path") == remote.location
    assert sa == sb


def test_no_module_outside_the_seam_asks_where_a_cache_lives():
    seam = REPO / "alignkd" / "cache" / "storage"
    asking = [f"{p.relative_to(REPO)}:{n}" for p in sorted((REPO / "alignkd").rglob("*.py")) if seam not in p.parents
              for n, line in enumerate(p.read_text().splitlines(), 1)
              if re.search(r"is_remote|fsspec|s3fs|://", line)]
    assert asking == []
