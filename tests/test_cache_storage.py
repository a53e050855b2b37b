"""The storage half of the cache: writer, reader, catalog, verify and lock, on synthetic records."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest

from alignkd.cache.catalog import SQLRefusedError, rebuild_catalog, run_sql
from alignkd.cache.encodings import decode, encode, widen
from alignkd.cache.lock import CacheLockedError
from alignkd.cache.reader import open_cache
from alignkd.cache.shard_format import CacheFormatError, open_array, read_array_info, read_index, read_parquet, read_raw
from alignkd.cache.storage import open_store
from alignkd.cache.verify import verify_cache
from alignkd.cache.writer import CacheWriter, SampleRecord
from alignkd.errors import ConfigError
from alignkd.storage_schemas import ARRAY_KINDS, FORMAT_NAME, SCALE_OF, SCHEMA_VERSION

REPO = Path(__file__).resolve().parents[1]
# a child process imports this worktree's alignkd and tests, not an installed copy
WITH_REPO = {**os.environ, "PYTHONPATH": str(REPO)}
SCALES = set(SCALE_OF.values()) | {"attn_ids", "attn_tail"}  # empty unless scaled / --attn-topk
DATA_KINDS = [k for k in ARRAY_KINDS if k not in SCALES]  # arrays with bytes in the bf16 `cache` fixture
META = {"teacher": {"path": "tiny", "config_sha256": "c0ffee"}, "build_options": {"logit_mode": "topk"}}


def make_record(i: int, *, T=6, H=3, Nv=20, D=24, P=5, K=4, sampled=False, seed=None) -> SampleRecord:
    rng = np.random.default_rng(i if seed is None else seed)
    logits = rng.normal(0, 2, (T, H, Nv + 30))  # 30 non-vision keys take part of the mass
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    attn = probs[..., :Nv].astype(np.float32)
    ids = rng.choice(1000, size=(P, K), replace=False).astype(np.int64)
    if sampled:  # ragged unique ids, left-packed, -1 padded; values are counts
        nnz = rng.integers(1, K + 1, P)
        ids[np.arange(K) >= nnz[:, None]] = -1
        values = np.where(ids >= 0, rng.integers(1, 9, (P, K)), 0).astype(np.float32)
        tail = np.zeros(P, np.float32)
    else:
        values = np.sort(rng.normal(-3, 1, (P, K)), axis=1)[:, ::-1].astype(np.float32)
        tail = (1 - np.exp(values).sum(1)).astype(np.float32)
    L = 40
    return SampleRecord(
        sample_id=f"s{i:03d}", manifest_row=i, input_ids=rng.integers(0, 1000, L).astype(np.int32),
        label_mask=np.arange(L) > 30, vision_positions=np.arange(2, 2 + Nv, dtype=np.int32),
        text_positions=np.arange(L - T, L, dtype=np.int32), attn=attn,
        vision=rng.normal(0, 0.3, (Nv, D)).astype(np.float32), focus=attn.mean(1).sum(0),
        logit_positions=np.arange(L - P - 1, L - 1, dtype=np.int32), logit_ids=ids, logit_values=values,
        logit_tail=tail, teacher_ce=1.0 + i, teacher_entropy=2.0, teacher_tail_mass=float(tail.mean()),
        image_paths=(f"img/{i}.png",), image_sha256=(hashlib.sha256(b"%d" % i).hexdigest(),),
        image_bytes=(b"PNG%d" % i,), image_n_vision=np.array([Nv], np.int32))


def write_cache(path, n=5, *, rejects=(), shard_size=2, **kw) -> list[SampleRecord]:
    recs = [make_record(i) for i in range(n)]
    with CacheWriter(path, META, shard_size=shard_size, **kw) as w:
        for r in recs:
            w.add(r)
        for row in rejects:
            w.reject(f"bad{row}", row, "too_long", f"sample bad{row} is longer than 2048 tokens")
    return recs


def tree_digest(path: Path) -> dict:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("c") / "cache"
    recs = write_cache(path, rejects=(7, 8))
    return path, recs


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize("attn_dtype,vision_dtype", [("bfloat16", "bfloat16"), ("float16", "float16"),
                                                     ("uint8-sqrt", "bfloat16"), ("uint8-log", "int8-channel"),
                                                     ("uint4-log", "int4-channel")])
def test_round_trip_each_dtype(tmp_path, attn_dtype, vision_dtype):
    """Whole-cache round trip; each encoding's own bound is checked in test_encodings.py."""
    recs = write_cache(tmp_path / "c", n=3, attn_dtype=attn_dtype, vision_dtype=vision_dtype, background=False)
    reader = open_cache(tmp_path / "c")
    assert len(reader) == 3 and reader.sample_ids == ["s000", "s001", "s002"]
    for rec, got in zip(recs, (reader[i] for i in range(3))):
        for kind, enc in (("attn", attn_dtype), ("vision", vision_dtype)):
            stored, scale = encode(getattr(rec, kind), enc)
            want = decode(stored, enc, scale, getattr(rec, kind).shape)
            np.testing.assert_array_equal(getattr(got, kind), want, err_msg=kind)
        assert got.attn.dtype == got.vision.dtype == np.float32
        np.testing.assert_array_equal(got.logit_values, rec.logit_values.astype(np.float16).astype(np.float32))
        np.testing.assert_allclose(got.logit_tail, rec.logit_tail, rtol=np.abs(np.log(rec.logit_tail)).max() * 2 ** -10)
        for name in ("focus", "logit_ids", "input_ids", "label_mask",
                     "vision_positions", "text_positions", "logit_positions"):
            np.testing.assert_array_equal(getattr(got, name), getattr(rec, name), err_msg=name)
        assert (got.sample_id, got.manifest_row, got.teacher_ce, got.image_paths, got.image_bytes) == \
               (rec.sample_id, rec.manifest_row, rec.teacher_ce, rec.image_paths, rec.image_bytes)


@pytest.mark.parametrize("attn_dtype", ["bfloat16", "uint8-log"])
def test_attn_topk_round_trip(tmp_path, attn_dtype):
    """--attn-topk 5 of 20 columns: the reader gives back each row's 5 largest values in their
    columns, the rest of the row's vision mass spread evenly, and the ids with widen=False."""
    recs = write_cache(tmp_path / "c", n=3, attn_dtype=attn_dtype, attn_topk=5, background=False)
    reader = open_cache(tmp_path / "c")
    tol = {"bfloat16": 2 ** -8, "uint8-log": 0.03}[attn_dtype]
    for i, rec in enumerate(recs):
        got, narrow = reader[i], reader.get(i, widen=False)
        assert got.attn.shape == rec.attn.shape and narrow.attn.shape == (*rec.attn.shape[:2], 5)
        want_ids = np.argsort(-rec.attn, -1, kind="stable")[..., :5]
        np.testing.assert_array_equal(np.sort(narrow.attn_ids, -1), np.sort(want_ids, -1))
        kept = np.take_along_axis(got.attn, want_ids, -1)
        np.testing.assert_allclose(kept, np.take_along_axis(rec.attn, want_ids, -1), rtol=tol)
        rest = rec.attn.sum(-1) - np.take_along_axis(rec.attn, want_ids, -1).sum(-1)
        np.testing.assert_allclose(narrow.attn_tail, rest, rtol=2 ** -10, atol=1e-7)
        others = np.ones_like(rec.attn, bool)
        np.put_along_axis(others, want_ids, False, -1)
        np.testing.assert_allclose(got.attn[others].reshape(*rec.attn.shape[:2], 15),
                                   np.broadcast_to((rest / 15)[..., None], (*rec.attn.shape[:2], 15)),
                                   rtol=2 ** -10, atol=1e-7)
    assert run_sql(tmp_path / "c", "SELECT DISTINCT attn_k FROM samples").to_pylist() == [{"attn_k": 5}]


def test_attn_topk_refusals(tmp_path):
    with pytest.raises(ConfigError, match="--attn-topk.*uint4-log"):
        CacheWriter(tmp_path / "a", META, attn_dtype="uint4-log", attn_topk=4)
    write_cache(tmp_path / "b", n=1, attn_dtype="bfloat16", attn_topk=4, background=False)
    with pytest.raises(ConfigError, match="--attn-topk=4 but this run asks for 0"):
        CacheWriter(tmp_path / "b", META, attn_dtype="bfloat16")


def _records_repeating_images(n: int) -> list[SampleRecord]:
    """Samples 0, 2, 4, ... each ask about a new image; 1, 3, 5, ... ask about sample 0's
    image again (its tokens, since vision tokens depend on the image alone)."""
    recs = [make_record(i) for i in range(n)]
    first = recs[0]
    for i in range(1, n, 2):
        recs[i].vision, recs[i].image_sha256, recs[i].image_paths = \
            first.vision, first.image_sha256, first.image_paths
    return recs


def _write(path, recs, **kw) -> None:
    with CacheWriter(path, META, shard_size=2, background=False, **kw) as w:
        for r in recs:
            w.add(r)


@pytest.mark.parametrize("vision_dtype", ["bfloat16", "int8-channel"])
def test_repeated_images_store_their_vision_tokens_once(tmp_path, vision_dtype):
    recs = _records_repeating_images(7)
    _write(tmp_path / "shared", recs, vision_dtype=vision_dtype)
    _write(tmp_path / "plain", recs, vision_dtype=vision_dtype, share_vision=False)
    shared, plain = open_cache(tmp_path / "shared"), open_cache(tmp_path / "plain")
    for i in range(7):
        for widen in (True, False):
            a, b = shared.get(i, widen=widen), plain.get(i, widen=widen)
            for name in ("vision", "vision_scale", "attn", "focus", "logit_ids", "input_ids"):
                x, y = getattr(a, name), getattr(b, name)
                assert (x is None) == (y is None), name
                if x is not None:
                    np.testing.assert_array_equal(x, y, err_msg=f"{name} of sample {i}")
    rows = run_sql(tmp_path / "shared", "SELECT sample_id, vision_from FROM samples ORDER BY sample_id").to_pylist()
    assert [r["vision_from"] for r in rows] == ["", "s000", "", "s000", "", "s000", ""]
    # the plain cache stores 7 samples' tokens, the shared one 4 (0, 2, 4, 6)
    vision_bytes = {name: sum(f.stat().st_size for f in (tmp_path / name / "shards").glob("*/vision/c/0"))
                    for name in ("shared", "plain")}
    assert vision_bytes["shared"] < vision_bytes["plain"] * 5 / 7
    assert verify_cache(tmp_path / "shared") == []
    from alignkd.cache.inspection.stats import cache_stats
    assert cache_stats(tmp_path / "shared")["images"]["samples_sharing_vision"] == 3


def test_samples_without_image_hashes_never_share(tmp_path):
    """Nothing says two such samples saw the same image, so each keeps its own tokens."""
    recs = [make_record(i) for i in range(3)]
    for r in recs:
        r.image_sha256, r.image_paths, r.image_bytes, r.image_n_vision = (), (), None, np.zeros(0, np.int32)
    _write(tmp_path / "c", recs, store_images=False)
    assert run_sql(tmp_path / "c", "SELECT count(*) AS n FROM samples WHERE vision_from <> ''").to_pylist() == \
        [{"n": 0}]
    reader = open_cache(tmp_path / "c")
    for i, r in enumerate(recs):
        stored, _ = encode(r.vision, "bfloat16")
        np.testing.assert_array_equal(reader[i].vision, decode(stored, "bfloat16", None, r.vision.shape))


def test_a_resumed_build_shares_with_samples_committed_before(tmp_path):
    recs = _records_repeating_images(6)
    _write(tmp_path / "c", recs[:3])           # s000 (holder), s001 -> s000, s002 own
    _write(tmp_path / "c", recs[3:])           # resumed: s003 and s005 point at the committed s000
    reader = open_cache(tmp_path / "c")
    assert run_sql(tmp_path / "c", "SELECT sample_id FROM samples WHERE vision_from = 's000' ORDER BY 1").to_pylist() \
        == [{"sample_id": "s001"}, {"sample_id": "s003"}, {"sample_id": "s005"}]
    for i in (1, 3, 5):
        np.testing.assert_array_equal(reader[reader.index_of(f"s00{i}")].vision, reader[0].vision)
    with pytest.raises(ConfigError, match="--share-vision=True but this run asks for False"):
        CacheWriter(tmp_path / "c", META, attn_dtype="bfloat16", share_vision=False)
    # the holder's shard lost: verify names every sample left without its tokens, the reader refuses
    (tmp_path / "c" / "shards" / "shard-000000" / "shard.json").unlink()
    lost = [str(p) for p in verify_cache(tmp_path / "c") if "vision tokens of sample s000" in p.message]
    assert len(lost) == 2 and "s003" in lost[0] + lost[1] and "s005" in lost[0] + lost[1]
    with pytest.raises(CacheFormatError, match="shares the vision tokens of sample s000"):
        open_cache(tmp_path / "c")


def test_reader_keeps_at_most_max_open_shards_open(tmp_path, monkeypatch):
    """A uniform order over many shards must not hold a descriptor per shard file: open shards
    are closed least recently used first, and a closed shard reads the same again."""
    from alignkd.cache import reader as reader_module

    recs = write_cache(tmp_path / "c", n=12, shard_size=2, background=False)  # 6 shards
    monkeypatch.setattr(reader_module, "MAX_OPEN_SHARDS", 2)
    reader = open_cache(tmp_path / "c", prefetch_shards=True)
    fds = lambda: len(os.listdir("/proc/self/fd"))  # noqa: E731
    gc.collect()  # files the writer left to the garbage collector close now, not mid-count
    before = fds()
    order = [0, 11, 3, 7, 5, 1, 9, 0, 11]
    per_shard = None
    for i in order:
        got = reader[i]
        np.testing.assert_array_equal(got.logit_ids, recs[i].logit_ids)
        assert got.sample_id == recs[i].sample_id
        assert len(reader._open) <= 2
        if len(reader._open) == 1:
            per_shard = fds() - before
    assert per_shard and fds() - before <= 2 * per_shard
    reader.close()
    assert fds() == before


def test_stored_width_read(tmp_path):
    """get(widen=False) hands back the stored bytes and scales; widening them gives the float32 read."""
    import torch

    write_cache(tmp_path / "c", n=2, attn_dtype="uint8-log", vision_dtype="int8-channel", background=False)
    reader = open_cache(tmp_path / "c")
    full, raw = reader[1], reader.get(1, widen=False)
    assert (raw.attn.dtype, raw.vision.dtype, raw.logit_values.dtype) == (np.uint8, np.int8, np.float16)
    assert raw.attn_scale.shape == raw.attn.shape[:2] and raw.vision_scale.shape == raw.vision.shape[1:]
    assert raw.encodings == {"attn": "uint8-log", "vision": "int8-channel", "logit_values": "float16"}
    attn = widen(torch.from_numpy(raw.attn), "uint8-log", torch.from_numpy(raw.attn_scale))
    vision = widen(torch.from_numpy(raw.vision), "int8-channel", torch.from_numpy(raw.vision_scale))
    np.testing.assert_allclose(attn.numpy(), full.attn, rtol=1e-6)
    np.testing.assert_allclose(vision.numpy(), full.vision, rtol=1e-6)
    assert full.encodings is None and full.attn_scale is None


def test_8bit_arrays_are_stored_raw_and_read_by_zarr_python(tmp_path):
    """uint8/int8 codes skip blosc (zarr.json lists only the bytes codec), bf16 keeps it; the
    raw chunks read straight into the output equal what zarr-python reads, crc32 included."""
    import zarr

    recs = [make_record(i, T=7 + i, Nv=20 + 4 * i) for i in range(3)]  # ragged T and Nv
    with CacheWriter(tmp_path / "c", META, shard_size=3, attn_dtype="uint8-log", vision_dtype="int8-channel") as w:
        for r in recs:
            w.add(r)
    shard = tmp_path / "c" / "shards" / "shard-000000"
    codecs = {k: json.loads((shard / k / "zarr.json").read_text())["codecs"][0]["configuration"]["codecs"]
              for k in ("attn", "vision", "logit_values")}
    assert codecs["attn"] == codecs["vision"] == [{"name": "bytes"}]
    assert "blosc" in [c["name"] for c in codecs["logit_values"]]
    # raw padding is stored as is, so raw arrays use 4 KB chunks: one per small sample, plus
    # 16 index bytes per chunk and the index's crc32c
    assert (shard / "attn" / "c" / "0").stat().st_size == 3 * 4096 + 3 * 16 + 4
    group = zarr.open_group(shard, mode="r")
    reader = open_cache(tmp_path / "c", check_crc=True)
    rows = read_parquet(shard, "samples.parquet").to_pylist()
    for i, row in enumerate(rows):
        got = reader.get(i, widen=False)
        for kind, value in (("attn", got.attn), ("vision", got.vision)):
            start = row[f"{kind}_offset"]
            np.testing.assert_array_equal(group[kind][start:start + value.size], value.ravel())
        np.testing.assert_allclose(reader[i].attn, recs[i].attn, rtol=0.025, atol=1e-6 * recs[i].attn.max())


def test_logit_ids_use_uint16_below_65536_and_uint32_above(tmp_path):
    for vocab, dtype in ((32000, "uint16"), (65536, "uint16"), (151936, "uint32"), (None, "uint32")):
        path = tmp_path / f"c{vocab}"
        meta = {**META, "teacher_shapes": {"vocab_size": vocab}} if vocab else META
        rec = make_record(0)
        with CacheWriter(path, meta, background=False) as w:
            w.add(rec)
        assert json.loads((path / "cache.json").read_text())["storage"]["logit_id_dtype"] == dtype
        assert read_array_info(path / "shards/shard-000000", "logit_ids").dtype == np.dtype(dtype)
        np.testing.assert_array_equal(open_cache(path)[0].logit_ids, rec.logit_ids)


def test_sampled_ragged_logits_round_trip(tmp_path):
    recs = [make_record(i, sampled=True, K=8, P=7) for i in range(4)]
    with CacheWriter(tmp_path / "c", META, shard_size=3) as w:
        for r in recs:
            w.add(r)
    reader = open_cache(tmp_path / "c", check_crc=True)
    for i, rec in enumerate(recs):
        got = reader[i]
        np.testing.assert_array_equal(got.logit_ids, rec.logit_ids)
        np.testing.assert_array_equal(got.logit_values, rec.logit_values)  # counts are exact in fp16
        assert got.logit_ids.dtype == np.int64


def test_direct_reader_equals_zarr_python(cache):
    import zarr

    path, recs = cache
    reader = open_cache(path)
    for shard_dir in sorted((path / "shards").iterdir()):
        group = zarr.open_group(shard_dir, mode="r")
        for kind in ARRAY_KINDS:
            info = read_array_info(shard_dir, kind)
            whole = group[kind][:]
            if not info.length:  # an unused scale array: zarr.json only
                assert whole.size == 0 and not (shard_dir / info.rel).exists()
                continue
            handle = open_array(open_store(shard_dir), info)
            try:
                ours = read_raw(handle, info, read_index(handle, info), 0, info.length)
            finally:
                handle.close()
            np.testing.assert_array_equal(ours, whole, err_msg=f"{shard_dir.name}/{kind}")
    # and one sample, through the public reader, against zarr-python's slice
    s = reader[3]
    row = run_sql(path, "SELECT attn_offset, vision_offset FROM samples WHERE sample_id = 's003'").to_pylist()[0]
    group = zarr.open_group(path / "shards" / "shard-000001", mode="r")
    n_attn, n_vis = s.attn.size, s.vision.size
    raw_attn = group["attn"][row["attn_offset"]:row["attn_offset"] + n_attn]
    raw_vis = group["vision"][row["vision_offset"]:row["vision_offset"] + n_vis]
    np.testing.assert_array_equal((raw_attn.astype(np.uint32) << 16).view(np.float32), s.attn.ravel())
    np.testing.assert_array_equal((raw_vis.astype(np.uint32) << 16).view(np.float32), s.vision.ravel())


# ---------------------------------------------------------------- what is written
def test_exact_files(cache):
    path, _ = cache
    # bf16 attention and vision have no scales: their scale arrays are a zarr.json only
    arrays = {f"{k}/{f}" for k in ARRAY_KINDS for f in ("zarr.json", "c/0") if f == "zarr.json" or k not in SCALES}
    shard = {"zarr.json", "samples.parquet", "rejects.parquet", "shard.json"} | arrays
    expected = {"cache.json", "catalog.duckdb", ".lock"}
    expected |= {f"shards/shard-{i:06d}/{f}" for i in range(3) for f in shard}
    got = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert got == expected


def test_cache_json_and_shard_json(cache):
    path, _ = cache
    doc = json.loads((path / "cache.json").read_text())
    assert set(doc) == {"format", "schema_version", "alignkd_version", "created_at", "storage",
                        "teacher", "build_options"}
    assert (doc["format"], doc["schema_version"]) == (FORMAT_NAME, SCHEMA_VERSION)
    assert doc["storage"] == {"attn_dtype": "bfloat16", "vision_dtype": "bfloat16", "logit_id_dtype": "uint32",
                              "shard_size": 2, "store_images": True, "attn_topk": 0,
                              "share_vision": True, "attn_store": "maps", "skip": []}
    assert doc["teacher"] == META["teacher"] and doc["build_options"] == META["build_options"]
    assert open_cache(path).meta == doc

    shard = json.loads((path / "shards/shard-000002/shard.json").read_text())
    assert {k: shard[k] for k in ("format", "schema_version", "name", "rank", "index", "n_samples",
                                  "n_rejects", "manifest_rows")} == {
        "format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, "name": "shard-000002", "rank": 0,
        "index": 2, "n_samples": 1, "n_rejects": 2, "manifest_rows": {"min": 4, "max": 8}}
    assert shard["arrays"]["attn"] == {"length": 65536, "encoding": "bfloat16"}
    listed = {f["path"]: f for f in shard["files"]}
    on_disk = {p.relative_to(path / "shards/shard-000002").as_posix()
               for p in (path / "shards/shard-000002").rglob("*") if p.is_file()}
    assert set(listed) == on_disk - {"shard.json"}
    for rel, f in listed.items():
        data = (path / "shards/shard-000002" / rel).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (f["bytes"], f["sha256"])


# ---------------------------------------------------------------- reliability
CRASH = """
import os
from tests.test_cache_storage import make_record, META
from alignkd.cache.writer import CacheWriter
w = CacheWriter({path!r}, META, shard_size=2)
for i in range(3):
    w.add(make_record(i))
w.reject("bad9", 9, "unreadable_image", "x")
import time
shards = w.path / "shards"
while not ((shards / "shard-000000").is_dir() and (shards / ".tmp-shard-000001").is_dir()):
    time.sleep(0.01)
time.sleep(0.3)
os._exit(0)  # a crash: no close, the third sample's shard stays in flight
"""


def test_crash_leaves_temp_dir_that_reader_ignores_and_resume_cleans(tmp_path):
    path = tmp_path / "c"
    code = CRASH.format(path=str(path))
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, env=WITH_REPO)
    temp = [p.name for p in (path / "shards").iterdir() if p.name.startswith(".tmp-")]
    assert temp == [".tmp-shard-000001"]
    assert len(open_cache(path)) == 2 and verify_cache(path) == []
    with CacheWriter(path, META, shard_size=2) as w:
        assert w.existing_meta["teacher"] == META["teacher"]
        assert w.done_rows == {0, 1}
        assert not any(p.name.startswith(".tmp-") for p in (path / "shards").iterdir())
        for i in range(5):
            if i not in w.done_rows:
                w.add(make_record(i))
    reader = open_cache(path)
    assert sorted(reader.sample_ids) == [f"s{i:03d}" for i in range(5)]
    np.testing.assert_array_equal(reader[reader.index_of("s002")].vision.shape, (20, 24))
    assert sorted(p.name for p in (path / "shards").iterdir()) == [
        "shard-000000", "shard-000001", "shard-000002"]


def test_resume_done_rows_include_rejects(cache, tmp_path):
    path = tmp_path / "c"
    shutil.copytree(cache[0], path)
    with CacheWriter(path, META) as w:
        assert w.done_rows == {0, 1, 2, 3, 4, 7, 8}
        w.add(make_record(5))
    assert run_sql(path, "SELECT max(shard_index) AS m FROM shards").to_pylist() == [{"m": 3}]


def test_resume_refuses_other_attn_dtype(cache, tmp_path):
    path = tmp_path / "c"
    shutil.copytree(cache[0], path)
    with pytest.raises(Exception, match="attn-dtype=bfloat16"):
        CacheWriter(path, META, attn_dtype="uint8-sqrt")
    CacheWriter(path, META).close()  # and the lock was released


HOLD = """
import sys
from alignkd.cache.writer import CacheWriter
from alignkd.errors import AlignKDError
try:
    CacheWriter({path!r}, {{}})
except AlignKDError as e:
    print(e); sys.exit(3)
"""


def test_second_writer_is_refused(tmp_path):
    path = tmp_path / "c"
    with CacheWriter(path, META) as w:
        w.add(make_record(0))
        proc = subprocess.run([sys.executable, "-c", HOLD.format(path=str(path))],
                              capture_output=True, text=True, timeout=60, env=WITH_REPO)
        assert proc.returncode == 3
        assert proc.stdout.strip() == f"cache {path} is locked by another build (pid {os.getpid()})."
        with pytest.raises(CacheLockedError):
            CacheWriter(path, META)
    CacheWriter(path, META).close()


def test_writer_thread_error_surfaces(tmp_path):
    path = tmp_path / "c"
    w = CacheWriter(path, META, shard_size=2)
    w.add(make_record(0))
    deadline = time.time() + 10
    while not any(p.name.startswith(".tmp-") for p in (path / "shards").iterdir()) and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    temp = next(p for p in (path / "shards").iterdir() if p.name.startswith(".tmp-"))
    shutil.rmtree(temp)
    temp.write_text("not a directory")  # so committing this shard must fail on the thread
    w.add(make_record(1))
    with pytest.raises(OSError):
        w.close()
    assert open_cache(path).sample_ids == []


def test_not_a_cache_and_version_mismatch_refused(cache, tmp_path):
    with pytest.raises(CacheFormatError, match="cache.json is missing"):
        open_cache(tmp_path)
    path = tmp_path / "c"
    shutil.copytree(cache[0], path)
    doc = json.loads((path / "cache.json").read_text())
    (path / "cache.json").write_text(json.dumps({**doc, "schema_version": 99}))
    with pytest.raises(CacheFormatError, match="schema version 99"):
        open_cache(path)
    problems = verify_cache(path)
    assert len(problems) == 1 and problems[0].file == "cache.json" and "99" in problems[0].message


@pytest.mark.parametrize("old", [1, 2, 4, 5])
def test_older_cache_refused_naming_both_versions(cache, tmp_path, old):
    path = tmp_path / "c"
    shutil.copytree(cache[0], path)
    doc = json.loads((path / "cache.json").read_text())
    (path / "cache.json").write_text(json.dumps({**doc, "schema_version": old}))
    with pytest.raises(CacheFormatError) as err:
        open_cache(path)
    assert f"schema version {old}" in str(err.value) and f"version {SCHEMA_VERSION}" in str(err.value)
    with pytest.raises(CacheFormatError, match=f"schema version {old}"):
        CacheWriter(path, META)


# ---------------------------------------------------------------- catalog and SQL
def test_sql_answers_and_rejects(cache):
    path, recs = cache
    got = run_sql(path, "SELECT count(*) AS n, sum(teacher_ce) AS ce FROM samples").to_pylist()
    assert got == [{"n": 5, "ce": sum(r.teacher_ce for r in recs)}]
    got = run_sql(path, "SELECT sample_id, reason FROM rejects ORDER BY sample_id").to_pylist()
    assert got == [{"sample_id": "bad7", "reason": "too_long"}, {"sample_id": "bad8", "reason": "too_long"}]
    got = run_sql(path, "SELECT name, n_samples, n_rejects FROM shards ORDER BY name").to_pylist()
    assert [tuple(r.values()) for r in got] == [("shard-000000", 2, 0), ("shard-000001", 2, 0),
                                                ("shard-000002", 1, 2)]
    con = duckdb.connect(str(path / "catalog.duckdb"), read_only=True)  # any DuckDB client
    try:
        assert con.execute("SELECT count(*) FROM samples").fetchall() == [(5,)]
        assert con.execute("SELECT count(*) FROM rejects").fetchall() == [(2,)]
    finally:
        con.close()


@pytest.mark.parametrize("query", [
    "INSERT INTO shards VALUES ('x', 0, 0, 0, 0, 0, 0, 0, '')", "CREATE TABLE t AS SELECT 1",
    "DROP VIEW samples", "COPY (SELECT * FROM samples) TO 'leak.csv'", "ATTACH 'catalog.duckdb' AS c",
    "SELECT 1; DELETE FROM shards"])
def test_sql_refuses_writes(cache, query):
    path, _ = cache
    before = tree_digest(path)
    with pytest.raises(SQLRefusedError, match="read-only"):
        run_sql(path, query)
    assert tree_digest(path) == before


def test_sql_on_empty_cache_and_moved_cache(cache, tmp_path):
    CacheWriter(tmp_path / "empty", META).close()
    assert run_sql(tmp_path / "empty", "SELECT count(*) AS n FROM samples").to_pylist() == [{"n": 0}]
    assert run_sql(tmp_path / "empty", "SELECT count(*) AS n FROM rejects").to_pylist() == [{"n": 0}]
    assert verify_cache(tmp_path / "empty") == []
    moved = tmp_path / "moved"
    shutil.copytree(cache[0], moved)
    assert run_sql(moved, "SELECT count(*) AS n FROM samples").to_pylist() == [{"n": 5}]


def test_catalog_rebuild_equals_original(cache, tmp_path):
    path = tmp_path / "c"
    shutil.copytree(cache[0], path)
    rebuild_catalog(path)  # views now point at the copy

    def dump():
        con = duckdb.connect(str(path / "catalog.duckdb"), read_only=True)
        try:
            return [con.sql(f"SELECT * FROM {t} ORDER BY ALL").to_arrow_table().drop_columns(
                        [c for c in ("image_bytes",) if t == "samples"]).to_pylist()
                    for t in ("shards", "samples", "rejects")]
        finally:
            con.close()

    before = dump()
    (path / "catalog.duckdb").unlink()
    rebuild_catalog(path)
    assert dump() == before and len(before[1]) == 5


# ---------------------------------------------------------------- verify
def test_verify_clean(cache):
    assert verify_cache(cache[0]) == []


def test_verify_detects_flipped_byte_in_each_tensor_file(cache, tmp_path):
    path = tmp_path / "c"
    shutil.copytree(cache[0], path)
    for kind in DATA_KINDS:
        f = path / "shards/shard-000001" / kind / "c/0"
        data = bytearray(f.read_bytes())
        data[len(data) // 3] ^= 0x10
        f.write_bytes(bytes(data))
    problems = verify_cache(path)
    for kind in DATA_KINDS:
        hits = [p for p in problems if p.shard == "shard-000001" and p.file == f"{kind}/c/0"]
        assert any("sha256" in p.message for p in hits), kind


def test_verify_detects_truncated_file_and_missing_shard(cache, tmp_path):
    path = tmp_path / "c"
    shutil.copytree(cache[0], path)
    f = path / "shards/shard-000000/vision/c/0"
    f.write_bytes(f.read_bytes()[:-100])
    shutil.rmtree(path / "shards/shard-000002")
    problems = {(p.shard, p.file): p.message for p in verify_cache(path)}
    assert "truncated" in problems[("shard-000000", "vision/c/0")]
    assert "directory is missing" in problems[("shard-000002", "")]
    assert str(verify_cache(path)[0]).startswith("shard-000000/vision/c/0: size")


# ---------------------------------------------------------------- DataLoader workers
def _collate(items):
    return [(s.sample_id, float(s.attn.sum()), s.image_bytes) for s in items]


def test_reader_under_dataloader_workers(cache):
    from torch.utils.data import DataLoader

    path, recs = cache
    reader = open_cache(path)
    reader[0]  # handles opened in the parent must not leak into the workers
    loader = DataLoader(reader, batch_size=2, num_workers=2, collate_fn=_collate)
    got = [x for batch in loader for x in batch]
    want = [(s.sample_id, float(s.attn.sum()), s.image_bytes) for s in (reader[i] for i in range(len(reader)))]
    assert got == want and [g[0] for g in got] == [r.sample_id for r in recs]


def test_a_build_killed_while_creating_the_cache_can_start_again(tmp_path):
    """Only a .tmp-cache.json is left by a kill inside creation; the next writer starts fresh."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / ".tmp-cache.json").write_text("{partial")
    with CacheWriter(cache, {"teacher": {"path": "t"}}, background=False) as writer:
        assert writer.existing_meta is None
    assert json.loads((cache / "cache.json").read_text())["format"] == "alignkd-cache"
