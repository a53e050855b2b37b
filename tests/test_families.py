"""Every supported model family end to end, on a tiny real teacher/student pair per family.

Per family: the probe's layer-0 rows equal a full-eager `output_attentions` forward (with
the family's masks in force: Gemma3's sliding window and bidirectional image block), the
cache equals the live teacher sample by sample within its stored dtype, `cache verify`
passes, `distill` runs a few steps, and the exported student reloads through
`AutoModelForImageTextToText`. Images have different sizes, so dynamic-resolution
families give each sample its own vision-token count.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from alignkd.cache.teacher.build import BuildConfig, build_cache
from alignkd.cache.catalog import run_sql
from alignkd.cache.reader import open_cache
from alignkd.cache.teacher.teacher_pass import model_inputs_of
from alignkd.cache.verify import verify_cache
from alignkd.data import collate, read_manifest, render_sample
from alignkd.distill.run import DistillConfig, distill
from alignkd.models import capture_forward, load_vlm
from tests.support.world import make_image, write_manifest
from families_tiny import FAMILY_NAMES, MODEL_TYPES, RAGGED, build_family

BF16_RTOL = 2.0 ** -8
SIZES = [(40, 40), (32, 64), (64, 48)]  # (height, width): three vision-token counts where Nv varies


def _data(root: Path) -> tuple[Path, Path]:
    """One record per image size, then a two-image record (sizes 0 and 1) and a text-only one."""
    from PIL import Image

    images = root / "images"
    images.mkdir(parents=True)
    records = []
    for i, (h, w) in enumerate(SIZES):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / f"{i}.png")
        conv = [{"from": "human", "value": "<image>\nwhat is the colour of this image ?"},
                {"from": "gpt", "value": ["red", "blue circle", "green square"][i]}]
        records.append({"id": f"f{i}", "image": f"{i}.png", "conversations": conv})
    records.append({"id": "two", "image": ["0.png", "1.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nwhat is the colour of this image ?"},
        {"from": "gpt", "value": "red"}]})
    records.append({"id": "text", "conversations": [{"from": "human", "value": "how many ?"},
                                                    {"from": "gpt", "value": "3"}]})
    return write_manifest(root / "data.json", records), images


def _expected_rejects(vlm) -> dict[str, str]:
    """What a family refuses of `_data`: several images, or (PaliGemma) no image."""
    out = {} if vlm.family.multi_image else {"two": "multi_image_unsupported"}
    if vlm.family.prompt_format == "prefix_lm":
        out["text"] = "no_image"
    return out


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def pair(request, tmp_path_factory):
    """A family's teacher and student directories, its data, and a cache built with batch 2."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    teacher = build_family(family, root / "teacher", "teacher", seed=0)
    student = build_family(family, root / "student", "student", seed=1)
    data, images = _data(root)
    cache = root / "cache"
    # bf16 attention: these tests compare the cache with the live teacher at bf16 tolerance
    build_cache(BuildConfig(teacher=str(teacher), data=str(data), images=str(images), out=str(cache),
                            batch_size=2, logit_k=8, attn_dtype="bfloat16", vision_dtype="bfloat16", progress=False))
    return {"family": family, "root": root, "teacher": teacher, "student": student, "data": data,
            "images": images, "cache": cache}


def _rendered(vlm, pair, image_only: bool = True):
    """The records the family takes; `image_only` leaves out the text-only one."""
    skip = set(_expected_rejects(vlm)) | ({"text"} if image_only else set())
    return [render_sample(r, vlm.processor, pair["images"], 512, vlm.family.render_rules(vlm.model.config))
            for r in read_manifest(pair["data"]) if r.sample_id not in skip]


def test_probe_rows_equal_full_eager(pair):
    """Layer-0 text→vision rows and vision tokens on a mixed-size batch vs full eager."""
    from transformers import AutoModelForImageTextToText

    vlm = load_vlm(pair["teacher"])
    batch = model_inputs_of(collate(_rendered(vlm, pair), vlm.processor.tokenizer.pad_token_id), vlm.family)
    cap = capture_forward(vlm.model, batch, return_full_layer0=True)
    eager = AutoModelForImageTextToText.from_pretrained(pair["teacher"], attn_implementation="eager").eval()
    with torch.no_grad():
        ref = eager(**batch, output_attentions=True, use_cache=False)
    full = ref.attentions[0]
    valid = batch["attention_mask"].bool()
    for b in range(full.shape[0]):
        keep = valid[b]
        torch.testing.assert_close(cap.layer0_attn[b][:, keep][:, :, keep], full[b][:, keep][:, :, keep],
                                   rtol=0, atol=4e-6)
        nv = int(cap.vision_mask[b].sum())
        pos = cap.vision_positions[b, :nv]
        assert nv == int((batch["input_ids"][b] == vlm.family.get_image_token_id(vlm.model.config)).sum())
        torch.testing.assert_close(cap.attn_text_vision[b][:, :, :nv], full[b][:, :, pos], rtol=0, atol=4e-6)
        assert not cap.attn_text_vision[b][:, :, nv:].any()
    torch.testing.assert_close(cap.logits, ref.logits, rtol=1e-4, atol=1e-4)


def test_every_answer_ends_with_the_token_the_model_stops_on(pair):
    """The last labelled token of each record (text-only included) is one the model's
    generation stops on, so a student is taught to stop (issue 25)."""
    vlm = load_vlm(pair["teacher"])
    stops = vlm.model.generation_config.eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops])
    for sample in _rendered(vlm, pair, image_only=False):
        labelled = sample.input_ids[sample.labels != -100]
        assert int(labelled[-1]) in stops, (sample.sample_id, vlm.processor.tokenizer.decode(labelled))


def test_cache_equals_live_teacher_per_sample(pair):
    """Each cached sample equals the teacher run on that sample alone (no batch padding): the
    one-image samples, the two-image sample where the family takes several images (each image's
    share of the vision tokens included) and the text-only one (no vision tokens, no rows)."""
    vlm = load_vlm(pair["teacher"])
    reader = open_cache(pair["cache"])
    assert verify_cache(pair["cache"]) == []
    rejects = {r["sample_id"]: r["reason"] for r in run_sql(pair["cache"], "SELECT * FROM rejects").to_pylist()}
    assert rejects == _expected_rejects(vlm)
    assert len(reader) == len(SIZES) + 2 - len(rejects)
    pad = vlm.processor.tokenizer.pad_token_id
    for sample in _rendered(vlm, pair, image_only=False):
        cap = capture_forward(vlm.model, model_inputs_of(collate([sample], pad), vlm.family))
        got = reader[reader.index_of(sample.sample_id)]
        assert got.n_images == len(sample.images) and list(got.image_n_vision) == list(sample.image_token_counts)
        assert sum(got.image_n_vision) == len(got.vision_positions)
        text = (cap.text_query_mask[0] & bool(sample.images)).nonzero().squeeze(-1)
        live_attn = cap.attn_text_vision[0][:, text].permute(1, 0, 2).numpy()
        np.testing.assert_array_equal(got.input_ids, sample.input_ids.numpy())
        np.testing.assert_array_equal(got.vision_positions, cap.vision_positions[0].numpy())
        np.testing.assert_array_equal(got.text_positions, text.numpy())
        np.testing.assert_allclose(got.attn, live_attn, rtol=BF16_RTOL, atol=2e-6)
        np.testing.assert_allclose(got.vision, cap.vision_tokens[0].numpy(), rtol=BF16_RTOL, atol=2e-6)
        for key in vlm.family.token_inputs:  # replayed inputs are the teacher's own
            np.testing.assert_array_equal(getattr(got, key), sample.token_inputs[key].numpy())
        if "image_grid_thw" in sample.image_inputs:
            np.testing.assert_array_equal(got.image_grid_thw, sample.image_inputs["image_grid_thw"].reshape(-1))
    counts = [r["n_vision"] for r in run_sql(pair["cache"], "SELECT n_vision FROM samples WHERE sample_id LIKE 'f%' "
                                                        "ORDER BY sample_id").to_pylist()]
    assert counts == [len(reader[reader.index_of(f"f{i}")].vision_positions) for i in range(len(SIZES))]
    if pair["family"] in RAGGED:  # images of different sizes -> each sample its own Nv, in one batch
        assert counts[0] != counts[1], counts  # the first build batch holds f0 and f1


def test_distill_runs_and_student_reloads(pair):
    from transformers import AutoModelForImageTextToText

    out = pair["root"] / "distilled"
    summary = distill(DistillConfig(student=str(pair["student"]), cache=str(pair["cache"]), out=str(out),
                                    max_steps=2, batch_size=len(SIZES) + 2, logging_steps=1, save_steps=100,
                                    progress=False))  # every sample, the text-only one too, in each step
    assert summary.steps == 2
    assert all(np.isfinite(v) and v > 0 for v in summary.final_losses.values()), summary.final_losses
    reloaded = AutoModelForImageTextToText.from_pretrained(out)
    assert reloaded.config.model_type == MODEL_TYPES.get(pair["family"], pair["family"])
    assert reloaded.config.get_text_config().num_attention_heads == 2
    vlm = load_vlm(out)  # the exported processor loads too (stock, or assembled without video)
    sample = _rendered(vlm, pair)[0]
    batch = model_inputs_of(collate([sample], vlm.processor.tokenizer.pad_token_id), vlm.family)
    assert torch.isfinite(capture_forward(vlm.model, batch).logits).all()


def test_eval_scores_every_family(pair):
    """`alignkd eval` renders with the family's prompt format and generates with the prompt's
    per-token inputs (Qwen's mm_token_type_ids, Gemma3's and PaliGemma's token_type_ids)."""
    from alignkd.distill.evaluate import EvalConfig, evaluate

    result = evaluate(EvalConfig(model=str(pair["teacher"]), data=str(pair["data"]), images=str(pair["images"]),
                                 max_new_tokens=2, progress=False))
    vlm = load_vlm(pair["teacher"])
    rendered = _rendered(vlm, pair, image_only=False)
    assert (result.samples, result.skipped) == (len(rendered), len(SIZES) + 2 - len(rendered))
    batch = collate(rendered, vlm.processor.tokenizer.pad_token_id)
    logits = capture_forward(vlm.model, model_inputs_of(batch, vlm.family)).logits
    target = batch["labels"][:, 1:]
    live = torch.nn.functional.cross_entropy(logits[:, :-1][target != -100], target[target != -100])
    assert result.answer_ce == pytest.approx(float(live), rel=1e-4)


def test_gemma3_rows_keep_window_and_bidirectional_image_block(tmp_path):
    """The probe's layer-0 rows carry both Gemma3 masks: image tokens see later image tokens
    (token_type_ids passed), and layer 0's 8-key sliding window hides early keys from late rows."""
    teacher = build_family("gemma3", tmp_path / "teacher", "teacher")
    data, images = _data(tmp_path)
    vlm = load_vlm(teacher)
    sample = _rendered(vlm, {"data": data, "images": images})[0]
    batch = model_inputs_of(collate([sample], vlm.processor.tokenizer.pad_token_id), vlm.family)
    assert "token_type_ids" in batch
    weights = capture_forward(vlm.model, batch, return_full_layer0=True).layer0_attn[0]  # [H, L, L]
    image = (batch["input_ids"][0] == vlm.family.get_image_token_id(vlm.model.config)).nonzero().squeeze(-1)
    first, last = int(image[0]), int(image[-1])
    assert (weights[:, first, last] > 0).all()  # bidirectional inside the image block
    length = weights.shape[-1]
    assert (weights[:, length - 1, : length - 8] == 0).all() and (weights[:, length - 1, length - 8:] > 0).all()
    # without token_type_ids the image block is causal again: the probe sees the model's own masks
    plain = {k: v for k, v in batch.items() if k != "token_type_ids"}
    causal = capture_forward(vlm.model, plain, return_full_layer0=True).layer0_attn[0]
    assert (causal[:, first, last] == 0).all()


def test_unsupported_family_is_refused_by_name(tmp_path):
    """`cache build` on a Llama4 directory: one line naming the family, before any weights load."""
    from click.testing import CliRunner
    from transformers import Llama4Config

    from alignkd.cli import main

    teacher = tmp_path / "llama4"
    Llama4Config().save_pretrained(teacher)
    (teacher / "model.safetensors").write_bytes(b"never read")
    data, images = _data(tmp_path)
    result = CliRunner().invoke(main, ["cache", "build", "--teacher", str(teacher), "--data", str(data),
                                       "--images", str(images), "--out", str(tmp_path / "cache")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [
        "error: model family 'llama4' is not supported by alignkd: its chunked local attention and interleaved "
        "no-rope layers are not handled by the layer-0 probe yet."]
    assert not (tmp_path / "cache" / "cache.json").exists()


def test_student_family_must_take_the_cached_token_inputs():
    from alignkd.distill.checks import check_family
    from alignkd.errors import AlignKDError

    check_family("qwen2_vl", "qwen2_5_vl")  # both replay mm_token_type_ids
    with pytest.raises(AlignKDError, match="built by a gemma3 teacher but the student is a qwen2_vl model"):
        check_family("qwen2_vl", "gemma3")
    with pytest.raises(AlignKDError, match="built by a gemma3 teacher but the student is a paligemma model"):
        check_family("paligemma", "gemma3")  # both replay token_type_ids, with other meanings


def test_published_qwen_layout_loads_without_torchvision(tmp_path):
    """preprocessor_config.json naming Qwen2VLImageProcessor + chat_template.json, no video
    config: AutoProcessor refuses it here, alignkd assembles the same processor class."""
    import transformers

    teacher = build_family("qwen2_vl", tmp_path / "qwen", "teacher")
    names = sorted(p.name for p in teacher.iterdir())
    assert "chat_template.json" in names and not any("video" in n for n in names)
    assert json.loads((teacher / "preprocessor_config.json").read_text())["image_processor_type"] == \
        "Qwen2VLImageProcessor"
    with pytest.raises(Exception):
        transformers.AutoProcessor.from_pretrained(teacher)
    processor = load_vlm(teacher).processor
    assert isinstance(processor, transformers.Qwen2VLProcessor)
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert "<|vision_start|>" in processor.chat_template


def test_stock_processor_used_when_it_loads(tiny_llava_dir):
    import transformers

    assert type(load_vlm(tiny_llava_dir).processor) is transformers.LlavaProcessor


def test_padded_teacher_vocabulary_distils_over_shared_ids(tmp_path):
    """A teacher with embedding rows past the tokenizer (Qwen2.5-VL-7B style) distils into a
    student without them; a student with another tokenizer is refused naming both sizes."""
    from alignkd.errors import AlignKDError

    teacher = build_family("qwen2_5_vl", tmp_path / "teacher", "teacher", vocab_padding=16)
    student = build_family("qwen2_5_vl", tmp_path / "student", "student", seed=1)
    data, images = _data(tmp_path)
    cache = tmp_path / "cache"
    build_cache(BuildConfig(teacher=str(teacher), data=str(data), images=str(images), out=str(cache),
                            batch_size=3, logit_k=8, progress=False))
    widths = [load_vlm(d).model.config.get_text_config().vocab_size for d in (teacher, student)]
    assert widths[0] == widths[1] + 16
    summary = distill(DistillConfig(student=str(student), cache=str(cache), out=str(tmp_path / "out"), max_steps=1,
                                    batch_size=3, save_steps=100, progress=False))
    assert summary.steps == 1 and np.isfinite(summary.final_losses["loss_logit"])
    other = build_family("idefics3", tmp_path / "other", "student")
    with pytest.raises(AlignKDError, match=rf"has {load_vlm(other).model.config.get_text_config().vocab_size} "
                                           rf"entries and the cache's teacher has {widths[0]}, and the tokenizers differ"):
        distill(DistillConfig(student=str(other), cache=str(cache), out=str(tmp_path / "out2"), max_steps=1,
                              progress=False))


def test_mistral3_published_layout_loads_without_torchvision(tmp_path):
    """preprocessor_config.json naming PixtralImageProcessorFast + processor_config.json naming
    PixtralProcessor (which transformers cannot import without torchvision): alignkd's stand-in
    loads it on the *Pil image processor and expands each image into rows of [IMG] tokens,
    [IMG_BREAK] between rows and [IMG_END] last, one token per 16 px merged patch."""
    import transformers
    from PIL import Image

    teacher = build_family("mistral3", tmp_path / "mistral3", "teacher")
    options = json.loads((teacher / "processor_config.json").read_text())
    image_options = options.pop("image_processor")
    (teacher / "preprocessor_config.json").write_text(
        json.dumps({**image_options, "image_processor_type": "PixtralImageProcessorFast"}))
    (teacher / "processor_config.json").write_text(json.dumps(options))
    assert options["processor_class"] == "PixtralProcessor"
    with pytest.raises(Exception):
        transformers.AutoProcessor.from_pretrained(teacher)
    processor = load_vlm(teacher).processor
    assert type(processor).__module__ == "alignkd.models.pixtral_processor"
    assert type(processor.image_processor).__name__ == "PixtralImageProcessorPil"
    image = Image.fromarray(np.zeros((40, 64, 3), np.uint8))  # resized up to 48 x 64: 3 rows of 4
    out = processor(text=["[IMG]"], images=[image], add_special_tokens=False)
    row = ["[IMG]"] * 4
    assert processor.tokenizer.convert_ids_to_tokens(out["input_ids"][0].tolist()) == \
        row + ["[IMG_BREAK]"] + row + ["[IMG_BREAK]"] + row + ["[IMG_END]"]
    assert out["pixel_values"].shape[-2:] == (48, 64)
