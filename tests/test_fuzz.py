"""Property-based fuzzing of the data layer (hypothesis): the manifest parser, the
conversation renderer and the image loader.

The promise: a manifest file either fails as a whole with a ManifestError, or every
record in it becomes exactly one sample or one reject with a known reason code. Nothing
else may escape (no KeyError, TypeError, ValueError, PIL or tokenizer exception), and
`rows = samples + rejects` holds for a real cache build over a fuzzed manifest.
"""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from alignkd.data import REASONS, ManifestError, SampleError, read_manifest, render_sample
from alignkd.data.images import decode_image, load_image
from alignkd.data.manifest import ImageRef, image_refs, record_from_fields

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

# ---------------------------------------------------------------- strategies
odd_text = st.one_of(st.text(max_size=40), st.text(alphabet="<image>\n \u202e\u0000é漢🙂", max_size=30),
                     st.just("x" * 100_000), st.just("<image>" * 50))
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), odd_text)
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(odd_text, inner, max_size=4)),
                          max_leaves=12)
roles = st.one_of(st.sampled_from(["human", "gpt", "user", "assistant", "system", "HUMAN", "", "bot"]), json_leaf)
turn = st.one_of(st.fixed_dictionaries({"from": roles, "value": st.one_of(odd_text, json_leaf)}), json_value)
IMAGE_NAMES = ["ok.png", "empty.png", "truncated.png", "bomb.png", "garbage.png", "link-out.png", "missing.png",
               "../outside.png", "/etc/passwd", "sub/../ok.png", "dir", "", "a\u0000b.png", "x" * 5000]
content_item = st.one_of(st.fixed_dictionaries({"type": st.just("image")}),
                         st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(odd_text, json_leaf)}),
                         json_value)
message = st.one_of(st.fixed_dictionaries({"role": roles, "content": st.one_of(
    odd_text, st.lists(content_item, max_size=4), json_leaf)}), json_value)
record = st.fixed_dictionaries({}, optional={
    "id": st.one_of(odd_text, st.integers(), json_leaf),
    "image": st.one_of(st.sampled_from(IMAGE_NAMES), st.lists(st.sampled_from(IMAGE_NAMES), max_size=3), json_leaf),
    "conversations": st.one_of(st.lists(turn, max_size=5), json_value,
                               st.just([{"from": "human", "value": "<image>\nwhat colour ?"},
                                        {"from": "gpt", "value": "red"}])),
    "messages": st.one_of(st.lists(message, max_size=5), json_value,
                          st.just([{"role": "system", "content": "be brief"},
                                   {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what ?"}]},
                                   {"role": "assistant", "content": "red"}])),
    "extra": json_value})


# ---------------------------------------------------------------- an image root with every kind of bad file
@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-images")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    (images / "dir").mkdir()
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    png = buf.getvalue()
    (images / "ok.png").write_bytes(png)
    (images / "empty.png").write_bytes(b"")
    (images / "truncated.png").write_bytes(png[: len(png) // 2])
    (images / "garbage.png").write_bytes(os.urandom(300))
    big = io.BytesIO()
    Image.new("RGB", (4000, 4000)).save(big, "PNG")  # 16 Mpx of zeros: a few kB on disk
    (images / "bomb.png").write_bytes(big.getvalue())
    (root / "outside.png").write_bytes(png)
    (images / "link-out.png").symlink_to(root / "outside.png")
    return images


@pytest.fixture(scope="module")
def processor(tiny_llava_dir):
    from alignkd.models import load_vlm

    return load_vlm(tiny_llava_dir).processor


@pytest.fixture
def small_bomb_limit(monkeypatch):
    # PIL refuses images over 2 x MAX_IMAGE_PIXELS; lowered so bomb.png (16 Mpx) counts as one
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)


# ---------------------------------------------------------------- the manifest parser
@FUZZ
@given(items=st.lists(st.one_of(record, json_value), max_size=6), jsonl=st.booleans())
def test_manifest_parser_never_escapes(tmp_path_factory, items, jsonl):
    path = tmp_path_factory.mktemp("m") / ("m.jsonl" if jsonl else "m.json")
    path.write_text("".join(json.dumps(i) + "\n" for i in items) if jsonl else json.dumps(items))
    try:
        records = read_manifest(path)
    except ManifestError as err:
        assert str(err).endswith(".") and "\n" not in str(err)
        return
    assert len(records) == len(items) and [r.row for r in records] == list(range(len(items)))
    assert all(r.problem is None or r.problem in REASONS for r in records)


@FUZZ
@given(data=st.binary(max_size=200))
def test_manifest_parser_on_raw_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("raw") / "m.json"
    path.write_bytes(data)
    try:
        read_manifest(path)
    except ManifestError:
        pass


# ---------------------------------------------------------------- the renderer
@FUZZ
@given(item=record, row=st.integers(0, 10))
def test_every_record_renders_or_is_a_reject(image_root, processor, small_bomb_limit, item, row):
    raw_id = item.get("id")
    rec = record_from_fields(row, raw_id, image_refs(item), item)
    try:
        sample = render_sample(rec, processor, image_root, max_length=64)
    except SampleError as err:
        assert err.reason in REASONS and err.row == row
        return
    assert sample.input_ids.ndim == 1 and len(sample.input_ids) <= 64
    assert (sample.labels != -100).any()


# ---------------------------------------------------------------- the image loader
@FUZZ
@given(data=st.one_of(st.binary(max_size=400), st.integers(0, 2000).map(lambda n: _png()[:n])))
def test_image_bytes_decode_or_are_corrupt(data):
    try:
        image = decode_image(data, "s", 0)
    except SampleError as err:
        assert err.reason == "corrupt_image"
        return
    assert image.mode == "RGB"


@FUZZ
@given(name=st.one_of(st.sampled_from(IMAGE_NAMES), odd_text))
def test_image_paths_load_or_are_rejected(image_root, small_bomb_limit, name):
    try:
        loaded = load_image(image_root, ImageRef(path=name), "s", 3)
    except SampleError as err:
        assert err.reason in {"image_outside_root", "missing_image", "corrupt_image"}, err
        return
    assert name in ("ok.png", "sub/../ok.png") and loaded.image.size == (32, 32)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- rows = samples + rejects
def test_build_over_fuzzed_manifest_accounts_for_every_row(tmp_path, image_root, tiny_llava_dir, small_bomb_limit):
    from alignkd.cache.teacher.build import BuildConfig, build_cache
    from alignkd.cache.catalog import run_sql

    good = [{"from": "human", "value": "<image>\nwhat colour ?"}, {"from": "gpt", "value": "red"}]
    rng = random.Random(0)
    records = []
    for i in range(24):
        rec = {"id": rng.choice([f"s{i}", f"s{i}", i, "", None, f"s{i - 1}"]),
               "image": rng.choice(IMAGE_NAMES[:-2] + ["ok.png", "ok.png"]),
               "conversations": rng.choice([good, good, [], good[:1], [{"from": "bot", "value": "x"}] + good,
                                            [{"from": "human", "value": "no placeholder"}, good[1]],
                                            [{"from": "human", "value": "<image>\n" + "word " * 400}, good[1]]])}
        if i % 4 == 0:  # a good record now and then, so samples and rejects interleave
            rec = {"id": f"s{i}", "image": "ok.png", "conversations": good}
        records.append({k: v for k, v in rec.items() if v is not None})
    data = tmp_path / "fuzz.json"
    data.write_text(json.dumps(records))
    summary = build_cache(BuildConfig(teacher=str(tiny_llava_dir), data=str(data), images=str(image_root),
                                      out=str(tmp_path / "cache"), batch_size=4, max_length=256, progress=False))
    samples = run_sql(tmp_path / "cache", "SELECT count(*) AS n FROM samples").to_pylist()[0]["n"]
    rejects = run_sql(tmp_path / "cache", "SELECT reason, manifest_row FROM rejects").to_pylist()
    assert samples + len(rejects) == len(records)
    assert sorted(r["manifest_row"] for r in rejects) == sorted(set(r["manifest_row"] for r in rejects))
    assert {r["reason"] for r in rejects} <= REASONS and samples == summary.samples > 0
    assert len({r["reason"] for r in rejects}) >= 5  # the fuzz reached many kinds of reject
