"""`--attn-store layer0`: attention recomputed from the cache's layer-0 kit equals the stored maps.

Per family (all 12 tiny teachers): a maps cache (float16 attention and vision) and a layer0
cache (float16 vision) of the same teacher and data, built in padded batches of 2. Every
sample's recomputed rows (one by one through the reader, and all samples in one padded
batch through the kit) equal the stored maps within the float16 storage step: one-image
samples of three sizes, a two-image sample and a text-only one. Each family's quirk is
shown to be in force: without Qwen's mm_token_type_ids (1-D positions instead of mrope) or
Gemma3's / PaliGemma's token_type_ids (no bidirectional image block / prefix) the rows
differ, and PaliGemma2's layer 0 (Gemma2: softcapping, an 8-key sliding window) gives
zero weight beyond its window. Then distill from both caches agrees step for step, and a
damaged kit is named by verify and refused by distill.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from alignkd.cache.teacher.build import BuildConfig, build_cache
from alignkd.cache.layer0_store import kit_inputs
from alignkd.cache.reader import open_cache
from alignkd.cache.inspection.stats import cache_stats
from alignkd.cache.verify import verify_cache
from alignkd.errors import AlignKDError, ConfigError
from alignkd.storage_schemas import REPLAYED_COLUMNS
from families_tiny import FAMILY_NAMES, build_family
from test_families import _data

FP16_STEP = 2.0 ** -10  # float16's relative step: the maps' storage error
QUIRK_INPUT = {"qwen2_vl": "mm_token_type_ids", "qwen2_5_vl": "mm_token_type_ids", "qwen3_vl": "mm_token_type_ids",
               "gemma3": "token_type_ids", "paligemma": "token_type_ids", "paligemma2": "token_type_ids"}


def _build(teacher, data, images, out, store: str, **kw) -> None:
    build_cache(BuildConfig(teacher=str(teacher), data=str(data), images=str(images), out=str(out), batch_size=2,
                            logit_k=8, attn_dtype="float16", vision_dtype="float16", attn_store=store,
                            progress=False, **kw))


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def caches(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"l0-{request.param}")
    teacher = build_family(request.param, root / "teacher", "teacher", seed=0)
    data, images = _data(root)
    for store in ("maps", "layer0"):
        _build(teacher, data, images, root / store, store)
    return {"family": request.param, "maps": open_cache(root / "maps"), "layer0": open_cache(root / "layer0"),
            "root": root}


def _batch(reader, indices):
    """The kit's inputs for samples `indices` of a cache, right-padded as the training step gets them."""
    recs = [reader.get(i, attn=False) for i in indices]
    L = max(len(r.input_ids) for r in recs)
    nv = max(len(r.vision_positions) for r in recs)
    T = max(len(r.text_positions) for r in recs)

    def pad(rows, width, value=0):
        return torch.tensor(np.stack([np.pad(np.asarray(r, np.int64), (0, width - len(r)), constant_values=value)
                                      for r in rows]))

    columns = {k: pad([getattr(r, k) for r in recs], L) for k in REPLAYED_COLUMNS[:2]
               if all(len(getattr(r, k)) for r in recs)}
    grids = [np.asarray(r.image_grid_thw).reshape(-1, 3) for r in recs]
    columns["image_grid_thw"] = torch.tensor(np.concatenate(grids)) if sum(map(len, grids)) else None
    vision = torch.zeros(len(recs), nv, recs[0].vision.shape[1])
    for b, r in enumerate(recs):
        vision[b, : len(r.vision)] = torch.from_numpy(r.vision)
    inputs = kit_inputs(pad([r.input_ids for r in recs], L), pad([np.ones(len(r.input_ids)) for r in recs], L),
                        columns)
    return inputs, vision, pad([r.text_positions for r in recs], T, -1), recs


def _assert_rows_match(got: np.ndarray, stored: np.ndarray) -> None:
    """Equal within float16 storage: one step of the stored value, plus the vision tokens' rounding."""
    np.testing.assert_allclose(got, stored, rtol=2 * FP16_STEP, atol=2e-6)


def test_recomputed_rows_equal_stored_maps(caches):
    maps, layer0 = caches["maps"], caches["layer0"]
    assert verify_cache(maps.path) == [] and verify_cache(layer0.path) == []
    assert maps.sample_ids == layer0.sample_ids and len(maps) >= 3
    for i in range(len(maps)):  # one by one through the reader: the text-only sample has no rows
        stored, got = maps[i], layer0[i]
        assert got.attn.shape == stored.attn.shape, stored.sample_id
        _assert_rows_match(got.attn, stored.attn)
        np.testing.assert_array_equal(got.focus, stored.focus)
    assert any(maps[i].n_images > 1 for i in range(len(maps))) or caches["family"].startswith("paligemma")
    assert any(maps[i].n_images == 0 for i in range(len(maps))) or caches["family"].startswith("paligemma")
    # every sample in one right-padded batch: the rows do not depend on what the sample is batched with
    kit = layer0.layer0_kit()
    inputs, vision, text, recs = _batch(layer0, range(len(layer0)))
    rows = kit.text_vision_rows(inputs, vision, text).numpy()
    for b, rec in enumerate(recs):
        T, Nv = len(rec.text_positions), len(rec.vision_positions)
        _assert_rows_match(rows[b, :T, :, :Nv], maps[b].attn)
        assert not rows[b, T:].any() and not rows[b, :, :, Nv:].any()


def test_query_projection_runs_on_query_rows_only(caches):
    """The kit projects q at the batch's text rows alone (keys at every position), and the rows
    equal the full projection's: counted at the real linear layers of a family's tiny kit."""
    layer0 = caches["layer0"]
    kit = layer0.layer0_kit()
    inputs, vision, text, recs = _batch(layer0, range(len(layer0)))
    attention = kit.family.get_attention_modules(kit.model)[0]
    seen: dict[str, int] = {}

    def count(name):
        return lambda _module, args: seen.__setitem__(name, seen.get(name, 0) + args[0].shape[:-1].numel())

    hooks = [m.register_forward_pre_hook(count(n.split(".")[0])) for n, m in attention.named_modules()
             if isinstance(m, torch.nn.Linear)]
    try:
        rows = kit.text_vision_rows(inputs, vision, text)
        cut = dict(seen)
        seen.clear()
        kit.project_query_rows = False
        full = kit.text_vision_rows(inputs, vision, text)
    finally:
        kit.project_query_rows = True
        for hook in hooks:
            hook.remove()
    B, L = inputs["input_ids"].shape
    assert cut == {"q_proj": sum(len(r.text_positions) for r in recs), "k_proj": B * L} and cut["q_proj"] < B * L
    assert seen == {"q_proj": B * L, "k_proj": B * L}
    torch.testing.assert_close(rows, full, rtol=1e-5, atol=1e-7)


def test_family_quirk_is_in_force(caches):
    """The family's positions or masks matter here, so the equality above is their test too."""
    family, layer0, maps = caches["family"], caches["layer0"], caches["maps"]
    kit = layer0.layer0_kit()
    i = next(i for i in range(len(layer0)) if layer0[i].n_images)
    inputs, vision, text, _ = _batch(layer0, [i])
    if family == "gemma3":  # the image block is bidirectional: its first token sees its last, with token types only
        first, last = layer0[i].vision_positions[[0, -1]]
        assert kit.layer0_weights(inputs, vision)[0][:, first, last].all()
        inputs.pop("token_type_ids")
        assert not kit.layer0_weights(inputs, vision)[0][:, first, last].any()
    elif family in QUIRK_INPUT:  # Qwen's mrope positions, PaliGemma's bidirectional prefix move the rows
        inputs.pop(QUIRK_INPUT[family])
        if family.startswith("qwen"):  # no mrope without the token types: 1-D positions
            inputs.pop("image_grid_thw")
        plain = kit.text_vision_rows(inputs, vision, text)[0].numpy()
        assert np.abs(plain - maps[i].attn).max() > 1e-3, family
    if family == "paligemma2":  # Gemma2's layer 0 slides over 8 keys: nothing further back
        inputs, vision, _, rec = _batch(layer0, [i])
        weights = kit.layer0_weights(inputs, vision)[0]
        last = len(rec[0].input_ids) - 1
        assert last > 8 and not weights[:, last, : last - 8].any() and weights[:, last, last - 7:].all()
        assert kit.config.text_config.attn_logit_softcapping is not None


def test_distill_from_layer0_matches_maps(tiny_llava_dir, tiny_student_dir, small_dataset, tmp_path):
    from alignkd.distill.run import DistillConfig, distill

    manifest, images = small_dataset
    steps = {}
    for store in ("maps", "layer0"):
        _build(tiny_llava_dir, manifest, images, tmp_path / store, store)
        out = tmp_path / f"out-{store}"
        distill(DistillConfig(student=str(tiny_student_dir), cache=str(tmp_path / store), out=str(out), max_steps=20,
                              batch_size=3, logging_steps=1, save_steps=1000, progress=False, workers=0,
                              loss_scale="normalized"))
        steps[store] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    _assert_layer0_stores_no_rows(tmp_path / "maps", tmp_path / "layer0")
    terms = [k for k in steps["maps"][0] if k.startswith("loss_")]
    assert "loss_attn" in terms and len([s for s in steps["maps"] if "loss_attn" in s]) == 20
    for a, b in zip(steps["maps"], steps["layer0"]):
        for k in terms:
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=5e-3, abs=1e-7), (a.get("step"), k)


def _assert_layer0_stores_no_rows(maps_cache, layer0_cache) -> None:
    """A layer0 shard's attention array is empty; the kit is in the cache once, hashed in cache.json."""
    maps, layer0 = cache_stats(maps_cache), cache_stats(layer0_cache)
    assert layer0["bytes_on_disk"]["vision"] == maps["bytes_on_disk"]["vision"]
    assert list(maps_cache.glob("shards/*/attn/c/0")) and not list(layer0_cache.glob("shards/*/attn*/c/0"))
    assert layer0["bytes_per_sample"] < maps["bytes_per_sample"]
    storage = layer0["storage"]
    assert storage["attn_store"] == "layer0" and set(storage["layer0_kit"]["files"]) == {
        "config.json", "layer0.safetensors"}
    assert maps["storage"]["attn_store"] == "maps" and "layer0_kit" not in maps["storage"]


def test_damaged_kit_named_by_verify_and_refused_by_distill(tiny_llava_dir, tiny_student_dir, small_dataset,
                                                             tmp_path):
    from alignkd.distill.run import DistillConfig, distill

    manifest, images = small_dataset
    cache = tmp_path / "layer0"
    _build(tiny_llava_dir, manifest, images, cache, "layer0", limit=2)
    weights = cache / "layer0_kit" / "layer0.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # a flipped bit in the tensors, the size unchanged
    weights.write_bytes(bytes(data))
    problems = verify_cache(cache)
    assert [(p.file, p.message) for p in problems] == [
        ("layer0_kit/layer0.safetensors", "sha256 does not match cache.json (corrupted)")]
    for verify in (True, False):  # --no-verify: the kit's own check before step one
        with pytest.raises(AlignKDError, match="layer0_kit/layer0.safetensors"):
            distill(DistillConfig(student=str(tiny_student_dir), cache=str(cache), out=str(tmp_path / "o"),
                                  max_steps=1, progress=False, workers=0, verify=verify))
    shutil.rmtree(cache / "layer0_kit")
    assert [p.file for p in verify_cache(cache)] == ["layer0_kit/config.json", "layer0_kit/layer0.safetensors"]


def test_layer0_refuses_attn_topk(tiny_llava_dir, small_dataset, tmp_path):
    manifest, images = small_dataset
    with pytest.raises(ConfigError, match="--attn-store layer0 stores none"):
        _build(tiny_llava_dir, manifest, images, tmp_path / "c", "layer0", attn_topk=4)


def test_build_refuses_a_kit_that_does_not_reproduce_the_teacher(tiny_llava_dir, small_dataset, tmp_path):
    """The build's guard: the first batch's live attention against the kit's. Here the kit comes
    from another teacher (seed 2) of the same family, which no exact recompute can match."""
    from alignkd.cache.layer0_store import check_recompute
    from alignkd.cache.teacher.teacher_pass import model_inputs_of
    from alignkd.data import collate, read_manifest, render_sample
    from alignkd.demo.tiny_models import TinyLlavaSpec, build_tiny_llava
    from alignkd.models import capture_forward, load_vlm
    from alignkd.models.layer0_kit import Layer0Kit, extract_kit

    manifest, images = small_dataset
    vlm = load_vlm(tiny_llava_dir)
    rules = vlm.family.render_rules(vlm.model.config)
    rendered = [render_sample(r, vlm.processor, images, 512, rules) for r in read_manifest(manifest)[:2]]
    batch = model_inputs_of(collate(rendered, vlm.processor.tokenizer.pad_token_id), vlm.family)
    cap = capture_forward(vlm.model, batch)
    check_recompute(Layer0Kit(extract_kit(vlm.model)), batch, cap, "llava")  # its own kit: exact
    other = load_vlm(build_tiny_llava(tmp_path / "other", TinyLlavaSpec(), seed=2))
    with pytest.raises(AlignKDError, match="model family 'llava'.*build with --attn-store maps"):
        check_recompute(Layer0Kit(extract_kit(other.model)), batch, cap, "llava")


def test_stats_count_layer0_attention_as_recomputed(tiny_llava_dir, small_dataset, tmp_path):
    """`cache stats` of a layer0 cache: no raw attention bytes (the tensor ratio is of what is
    stored), the kit among what the cache holds once, and no unused attention dtype."""
    from alignkd.cache.inspection.stats import kilobytes, render_stats

    manifest, images = small_dataset
    cache = tmp_path / "layer0"
    _build(tiny_llava_dir, manifest, images, cache, "layer0")
    stats = cache_stats(cache)
    assert stats["attn_recomputed"] and stats["bytes_raw"]["attn"] == 0
    kit = sum(f.stat().st_size for f in (cache / "layer0_kit").iterdir())
    assert stats["layer0_kit_bytes"] == kit
    text = render_stats(stats)
    once = next(line for line in text.splitlines() if line.startswith("once "))
    assert once.startswith(f"once layer0_kit {kilobytes(kit)}: ")
    attn_line = next(line for line in text.splitlines() if line.strip().startswith("attn "))
    assert attn_line.endswith("recomputed from the layer-0 kit")
    build_line = next(line for line in text.splitlines() if line.startswith("build "))
    assert "attn_store=layer0" in build_line and "attn_dtype" not in build_line
