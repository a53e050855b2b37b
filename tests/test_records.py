"""The data people have: every record shape from every source through `cache build` and `distill`.

One logical dataset (eight records that are kept, three that are rejects) is written four
ways: a LLaVA JSON list, a JSONL of chat messages, a Parquet file with image bytes and a
directory of two Parquet files whose images are lists of structs. Each is cached through the
CLI with exact sample and reject counts, the caches agree sample by sample, and a student
distils from each. Then: a two-image record's cached terms equal the live teacher's, a batch
mixing text-only and image samples gives each term exactly what its image samples give, a
Parquet dataset streams one row group at a time, Parquet resumes, and a template that cannot
take a system turn makes a reject naming the family.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from alignkd.cache.catalog import run_sql
from alignkd.cache.reader import open_cache
from alignkd.cli import main
from tests.support.world import make_image

Q = "what is the colour of this image ?"
MAX_LENGTH = 64  # two images' 32 tokens plus a short prompt fit; the long answer does not
LONG = " ".join(["red"] * 80)

# (id, images, turns as (role, text) with <image> placeholders): the shapes of issue 16's table
KEPT = [
    ("first", ["a.png"], [("user", f"<image>\n{Q}"), ("assistant", "red")]),
    ("multi", ["b.png"], [("user", f"<image>\n{Q}"), ("assistant", "blue"), ("user", "how many ?"),
                          ("assistant", "2")]),
    ("after", ["c.png"], [("user", f"{Q} <image>"), ("assistant", "green")]),
    (7, ["a.png"], [("user", f"<image>\n{Q}"), ("assistant", "circle")]),
    ("long", ["b.png"], [("user", f"<image>\n{Q}"), ("assistant", LONG)]),
    ("text", [], [("user", "how many ?"), ("assistant", "3")]),
    ("system", ["c.png"], [("system", "answer in one word ."), ("user", f"<image>\n{Q}"), ("assistant", "red")]),
    ("two", ["a.png", "c.png"], [("user", f"<image>\n<image>\n{Q}"), ("assistant", "left")]),
]
REJECTED = {
    "late-system": (["a.png"], [("user", f"<image>\n{Q}"), ("assistant", "red"), ("system", "be brief"),
                                ("user", "how many ?"), ("assistant", "1")], "bad_conversation"),
    "one-for-two": (["a.png", "b.png"], [("user", f"<image>\n{Q}"), ("assistant", "red")],
                    "image_without_placeholder"),
}
# a second record with an earlier record's id (LLaVA-665K asks about one COCO image in several
# conversations, all under the image's id): kept, under the key "first#2"
REPEATED = [("first", ["a.png"], [("user", f"<image>\n{Q}"), ("assistant", "blue")])]
IMAGES = {"a.png": 1, "b.png": 2, "c.png": 3}


def _records():
    rows = [(sid, imgs, turns) for sid, imgs, turns in KEPT]
    rows += [(sid, imgs, turns) for sid, (imgs, turns, _) in REJECTED.items()]
    return rows + REPEATED


def _llava(sid, imgs, turns) -> dict:
    rec = {"id": sid, "conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(r, r), "value": t}
                                        for r, t in turns]}
    if imgs:
        rec["image"] = imgs[0] if len(imgs) == 1 else imgs
    return rec


def _chat(sid, imgs, turns) -> dict:
    """Chat messages: user turns as content lists with image items, the rest as strings."""
    def content(role, text):
        if role != "user":
            return text
        items = []
        for k, part in enumerate(text.split("<image>")):
            if k:
                items.append({"type": "image"})
            if part.strip():
                items.append({"type": "text", "text": part.strip()})
        return items
    rec = {"id": sid, "messages": [{"role": r, "content": content(r, t)} for r, t in turns]}
    if imgs:
        rec["images"] = imgs
    return rec


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("records")
    images = root / "images"
    for name, seed in IMAGES.items():
        make_image(images / name, seed=seed)
    data = {}
    data["json"] = root / "llava.json"
    data["json"].write_text(json.dumps([_llava(*r) for r in _records()]))
    data["jsonl"] = root / "chat.jsonl"
    data["jsonl"].write_text("".join(json.dumps(_chat(*r)) + "\n" for r in _records()))
    blob = {name: (images / name).read_bytes() for name in IMAGES}
    # a Parquet file as Hugging Face datasets publish one: an image struct column, LLaVA turns
    table = pa.table({
        "id": [str(r[0]) for r in _records()],
        "image": [({"bytes": blob[r[1][0]], "path": r[1][0]} if r[1] else None) for r in _records()],
        "conversations": [_llava(*r)["conversations"] for r in _records()],
    })
    data["parquet"] = root / "data.parquet"
    pq.write_table(table, data["parquet"], row_group_size=4)
    # the two-image record has no place in a single-struct column: its own file in the directory
    # layout below, where images are lists of structs and turns are chat messages
    listed = [{"id": str(r[0]), "images": [{"bytes": blob[n], "path": None} for n in r[1]],
               "messages": _chat(*r)["messages"]} for r in _records()]
    (root / "pq").mkdir()
    half = len(listed) // 2
    for k, part in enumerate((listed[:half], listed[half:])):
        _write_messages(part, root / "pq" / f"part-{k:02d}.parquet")
    data["parquet-dir"] = root / "pq"
    return {"root": root, "images": images, "data": data}


def _write_messages(rows: list[dict], path: Path) -> None:
    """Chat contents are a string or a list of items: Parquet needs one type, so every content
    is written as a list of {type, text} items (a string becomes one text item)."""
    item = pa.struct([("type", pa.string()), ("text", pa.string())])
    rows = copy.deepcopy(rows)
    for row in rows:
        for msg in row["messages"]:
            c = msg["content"]
            msg["content"] = [{"type": "text", "text": c}] if isinstance(c, str) else \
                [{"type": i["type"], "text": i.get("text")} for i in c]
    schema = pa.schema([("id", pa.string()),
                        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
                        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.list_(item))])))])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=3)


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def caches(world, tiny_llava_dir):
    out = {}
    for name, data in world["data"].items():
        cache = world["root"] / f"cache-{name}"
        images = ["--images", world["images"]] if name in ("json", "jsonl") else []
        result = _cli("cache", "build", "--teacher", tiny_llava_dir, "--data", data, *images, "--out", cache,
                      "--max-length", MAX_LENGTH, "--batch-size", 3, "--shard-size", 4, "--attn-dtype", "float16",
                      "--vision-dtype", "float16", "--no-progress")
        assert result.exit_code == 0, result.output
        out[name] = (cache, result.output)
    return out


@pytest.mark.parametrize("source", ["json", "jsonl", "parquet", "parquet-dir"])
def test_every_shape_from_every_source_is_cached_with_exact_counts(caches, source):
    cache, output = caches[source]
    kept = [str(sid) for sid, _, _ in KEPT] + ["first#2"]
    expected = {(sid, reason) for sid, (_, _, reason) in REJECTED.items()}
    if source == "parquet":  # one image struct per row: "two" keeps no image, "one-for-two" only its first
        kept = [k for k in kept if k != "two"] + ["one-for-two"]
        expected = expected - {("one-for-two", "image_without_placeholder")} | {("two", "placeholder_without_image")}
    assert output.splitlines()[-1].startswith(f"cached {len(kept)} samples (0 rows already done), rejects: ")
    rows = {r["sample_id"]: r for r in run_sql(cache, "SELECT sample_id, record_id, manifest_row, n_images, "
                                                      "n_vision, image_n_vision, n_text, len(input_ids) AS n "
                                                      "FROM samples")
            .to_pylist()}
    assert sorted(rows) == sorted(kept)
    rejects = {(r["sample_id"], r["reason"]) for r in run_sql(cache, "SELECT sample_id, reason FROM rejects")
               .to_pylist()}
    assert rejects == expected
    assert rows["text"]["n_images"] == rows["text"]["n_vision"] == rows["text"]["n_text"] == 0
    assert rows["first"]["image_n_vision"] == [16] and rows["first"]["manifest_row"] == 0
    assert rows["first#2"]["record_id"] == "first" and rows["first"]["record_id"] == "first"
    assert rows["7"]["manifest_row"] == 3  # an integer id is kept, as a string
    assert rows["long"]["n"] == MAX_LENGTH  # kept, cut
    if "two" in rows:
        assert rows["two"]["image_n_vision"] == [16, 16] and rows["two"]["n_vision"] == 32
    assert _cli("cache", "verify", cache).exit_code == 0


def test_the_sources_agree_sample_by_sample(caches):
    readers = {name: open_cache(cache) for name, (cache, _) in caches.items()}
    ref = readers.pop("json")
    for name, reader in readers.items():
        for sid in set(reader.sample_ids) & set(ref.sample_ids):
            a, b = ref[ref.index_of(sid)], reader[reader.index_of(sid)]
            np.testing.assert_array_equal(a.input_ids, b.input_ids, err_msg=f"{name} {sid}")
            np.testing.assert_array_equal(a.label_mask, b.label_mask, err_msg=f"{name} {sid}")
            np.testing.assert_array_equal(a.attn, b.attn, err_msg=f"{name} {sid}")
            assert a.image_sha256 == b.image_sha256, (name, sid)


@pytest.mark.parametrize("source", ["json", "jsonl", "parquet", "parquet-dir"])
def test_a_student_distils_from_every_source(caches, world, tiny_student_dir, source):
    cache, _ = caches[source]
    out = world["root"] / f"run-{source}"
    result = _cli("distill", "--student", tiny_student_dir, "--cache", cache, "--out", out, "--max-steps", 2,
                  "--batch-size", 8, "--workers", 0, "--no-progress")
    assert result.exit_code == 0, result.output
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in logged if "loss_ce" in r][-1]
    assert all(np.isfinite(last[f"loss_{t}"]) for t in ("ce", "logit", "vis", "attn"))


def test_two_image_record_equals_the_live_teacher(caches, world, tiny_llava_dir):
    """Each image's vision tokens and the attention rows over both images, against a live forward."""
    from alignkd.cache.teacher.teacher_pass import model_inputs_of
    from alignkd.data import collate, open_source, render_sample
    from alignkd.models import capture_forward, load_vlm

    vlm = load_vlm(tiny_llava_dir)
    [rec] = [r for r in open_source(world["data"]["json"]).records() if r.sample_id == "two"]
    sample = render_sample(rec, vlm.processor, world["images"], MAX_LENGTH, vlm.family.render_rules(vlm.model.config))
    cap = capture_forward(vlm.model, model_inputs_of(collate([sample], 0), vlm.family))
    reader = open_cache(caches["json"][0])
    got = reader[reader.index_of("two")]
    text = cap.text_query_mask[0].nonzero().squeeze(-1)
    np.testing.assert_allclose(got.attn, cap.attn_text_vision[0][:, text].permute(1, 0, 2).numpy(),
                               rtol=2 ** -10, atol=1e-7)
    np.testing.assert_allclose(got.vision, cap.vision_tokens[0].numpy(), rtol=2 ** -10, atol=1e-6)
    (a0, a1), (b0, b1) = got.vision_ranges()
    assert (a0, a1, b0, b1) == (0, 16, 16, 32)
    # image 2 alone gives the vision tokens the cache keeps in image 2's range: the ranges are right
    [alone] = [r for r in open_source(world["data"]["json"]).records() if r.sample_id == "after"]
    solo = capture_forward(vlm.model, model_inputs_of(collate([render_sample(
        alone, vlm.processor, world["images"], MAX_LENGTH, vlm.family.render_rules(vlm.model.config))], 0), vlm.family))
    np.testing.assert_allclose(got.vision[b0:b1], solo.vision_tokens[0].numpy(), rtol=2 ** -10, atol=1e-6)


def test_text_only_samples_leave_the_image_terms_as_the_image_samples_give_them(caches, tiny_student_dir):
    """[image, text-only, image] gives vis and attn exactly as [image, image] does; CE averages
    over every answer token and the logit term over every cached position, the text-only
    sample's included."""
    from alignkd.distill.dataset import CachedDistillDataset
    from alignkd.distill.objective import AlignKDObjective, LossWeights
    from alignkd.models import load_vlm

    cache, _ = caches["json"]
    student = load_vlm(tiny_student_dir)
    reader = open_cache(cache)
    torch.manual_seed(0)
    obj = AlignKDObjective(student.model, teacher_heads=reader.meta["teacher_shapes"]["num_heads"],
                           teacher_dim=reader.meta["teacher_shapes"]["hidden_size"], weights=LossWeights(),
                           logit_mode="topk", logit_samples=0, loss_scale="normalized")
    ds = CachedDistillDataset(str(cache), student.processor)
    item = {sid: ds[reader.index_of(sid)] for sid in ("first", "text", "two")}

    def terms(*ids):
        out = obj(**ds.collate([item[i] for i in ids]))
        return {k.removeprefix("loss_"): float(v) for k, v in out.items() if k.startswith("loss_")}

    mixed, images, text = terms("first", "text", "two"), terms("first", "two"), terms("text")
    assert mixed["vis"] == pytest.approx(images["vis"], rel=1e-5)
    assert mixed["attn"] == pytest.approx(images["attn"], rel=1e-5)
    assert text["vis"] == text["attn"] == 0.0
    # CE averages over answer tokens, the logit term over the cached logit positions
    n = {"ce": {sid: int((item[sid]["labels"][1:] != -100).sum()) for sid in item},
         "logit": {sid: len(reader[reader.index_of(sid)].logit_positions) for sid in item}}
    assert n["logit"]["text"] > n["ce"]["text"]  # --logit-positions text: the prompt's positions too
    alone = {sid: terms(sid) for sid in item}
    for term in ("ce", "logit"):
        weighted = sum(alone[s][term] * n[term][s] for s in item) / sum(n[term].values())
        assert mixed[term] == pytest.approx(weighted, rel=1e-5), term


def test_a_template_that_cannot_take_a_system_turn_is_a_reject_naming_the_family(world, tiny_llava_dir):
    from alignkd.data import RenderRules, SampleError, open_source, render_sample
    from alignkd.models import load_vlm

    processor = load_vlm(tiny_llava_dir).processor
    [rec] = [r for r in open_source(world["data"]["json"]).records() if r.sample_id == "system"]
    raising = copy.copy(processor)
    raising.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
                             "supported') }}{% endif %}" + processor.chat_template)
    dropping = copy.copy(processor)
    dropping.chat_template = processor.chat_template.replace(
        "{% for message in messages %}", "{% for message in messages if message['role'] != 'system' %}")
    assert dropping.chat_template != processor.chat_template
    for proc, words in ((raising, "refuses"), (dropping, "leaves out of the prompt")):
        with pytest.raises(SampleError, match=f"chat template of llava {words}") as info:
            render_sample(rec, proc, world["images"], MAX_LENGTH, RenderRules(family="llava"))
        assert info.value.reason == "system_unsupported"
    assert render_sample(rec, processor, world["images"], MAX_LENGTH, RenderRules(family="llava"))


def test_parquet_resumes_like_json(world, tiny_llava_dir):
    cache = world["root"] / "cache-resume"
    common = ["cache", "build", "--teacher", tiny_llava_dir, "--data", world["data"]["parquet-dir"], "--out", cache,
              "--max-length", MAX_LENGTH, "--shard-size", 2, "--no-progress"]
    first = _cli(*common, "--limit", 5)
    assert first.exit_code == 0 and first.output.splitlines()[-1].startswith("cached 5 samples (0 rows already")
    again = _cli(*common)
    assert again.exit_code == 0, again.output
    assert again.output.splitlines()[-1].startswith("cached 4 samples (5 rows already done)")
    assert len(open_cache(cache)) == len(KEPT) + len(REPEATED)


STREAM_PROBE = """
import sys, pyarrow as pa
from alignkd.data import open_source
source = open_source(sys.argv[1])
pool = pa.default_memory_pool()
n = sum(len(r.images[0].data) for r in source.records())
print(n, pool.max_memory())
"""


def _big_parquet(path: Path, groups: int, per_group: int = 4) -> Path:
    rng = np.random.default_rng(0)
    schema = pa.schema([("id", pa.string()), ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())])))])
    with pq.ParquetWriter(path, schema, compression="none") as writer:
        for g in range(groups):  # incompressible 64 kB "images"
            rows = [{"id": f"r{g}-{i}", "image": {"bytes": rng.integers(0, 255, 64 * 1024, dtype=np.uint8).tobytes(),
                                                  "path": None},
                     "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}
                    for i in range(per_group)]
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))
    assert pq.ParquetFile(path).num_row_groups == groups
    return path


def _peak_arrow_bytes(path: Path) -> tuple[int, int]:
    """(image bytes streamed, the reader's peak Arrow memory), in a fresh process whose pool is ours alone."""
    proc = subprocess.run([sys.executable, "-c", STREAM_PROBE, str(path)], capture_output=True, text=True, check=True)
    total, peak = map(int, proc.stdout.split())
    return total, peak


def test_a_parquet_dataset_streams_one_row_group_at_a_time(tmp_path):
    """The reader's peak Arrow memory is a few row groups' worth whatever the file's size: 16 row
    groups of 256 kB peak no higher than 4 do, and far below the 4 MB file."""
    small_total, small_peak = _peak_arrow_bytes(_big_parquet(tmp_path / "small.parquet", groups=4))
    big_total, big_peak = _peak_arrow_bytes(_big_parquet(tmp_path / "big.parquet", groups=16))
    assert (small_total, big_total) == (4 * 4 * 64 * 1024, 16 * 4 * 64 * 1024)
    assert big_peak <= small_peak * 1.1, (small_peak, big_peak)
    assert big_peak < big_total / 5, (big_peak, big_total)
