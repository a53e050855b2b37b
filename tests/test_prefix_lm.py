"""PaliGemma 1/2: prefix-LM rendering and the prefix-LM mask in the layer-0 capture.

The end-to-end build/verify/distill runs for both are in test_families.py; this file
checks what is particular to them: the rendered layout and labels, the multi-turn rule,
that the captured rows carry the bidirectional prefix and the causal suffix, and that
PaliGemma2's Gemma2 LM runs eager in every layer.
"""

from __future__ import annotations

import pytest
import torch

from alignkd.cache.teacher.teacher_pass import model_inputs_of
from alignkd.data import IGNORE_INDEX, SampleError, collate, render_sample
from alignkd.data.manifest import ImageRef, ManifestRecord
from alignkd.models import capture_forward, load_vlm
from alignkd.models.attention_probe import probe_state
from tests.support.world import make_image
from families_tiny import build_family

QUESTION = "<image>\nwhat is the colour of this image ?"


@pytest.fixture(scope="module")
def paligemma(tmp_path_factory):
    root = tmp_path_factory.mktemp("paligemma")
    make_image(root / "images" / "a.png", size=48)
    return load_vlm(build_family("paligemma", root / "teacher")), root / "images"


def _render(vlm, images, *values, image="a.png"):
    conv = [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]
    rec = ManifestRecord(row=0, sample_id="p0", images=(ImageRef(image),) if image else (), turns=conv)
    return render_sample(rec, vlm.processor, images, 256, vlm.family.render_rules(vlm.model.config))


def _tokens(vlm, ids) -> list[str]:
    return vlm.processor.tokenizer.convert_ids_to_tokens(ids.tolist())


def test_prefix_is_image_bos_prompt_and_the_suffix_is_the_labelled_answer(paligemma):
    vlm, images = paligemma
    sample = _render(vlm, images, QUESTION, "blue circle")
    tokens = _tokens(vlm, sample.input_ids)
    assert tokens == ["<image>"] * 16 + ["<s>", "what", "is", "the", "colour", "of", "this", "image", "?",
                                         "blue", "circle", "</s>"]
    suffix = sample.token_inputs["token_type_ids"] == 1
    assert suffix.tolist() == [False] * 25 + [True] * 3
    assert (sample.labels != IGNORE_INDEX).tolist() == suffix.tolist()
    assert torch.equal(sample.labels[suffix], sample.input_ids[suffix])
    assert "labels" not in sample.image_inputs  # the processor's own labels are not an image input


def test_multi_turn_folds_earlier_turns_into_the_prefix(paligemma):
    vlm, images = paligemma
    sample = _render(vlm, images, QUESTION, "red", "how many ?", "3")
    tokens = _tokens(vlm, sample.input_ids)
    assert tokens[16:] == ["<s>", "what", "is", "the", "colour", "of", "this", "image", "?", "red", "how", "many",
                           "?", "3", "</s>"]
    labelled = _tokens(vlm, sample.input_ids[sample.labels != IGNORE_INDEX])
    assert labelled == ["3", "</s>"]  # the earlier answer "red" is prefix context, not a target
    assert sample.token_inputs["token_type_ids"].tolist() == [0] * 29 + [1] * 2


def test_truncation_keeps_the_head_of_the_answer(paligemma):
    vlm, images = paligemma
    conv = [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": "blue circle"}]
    rec = ManifestRecord(row=0, sample_id="p0", images=(ImageRef("a.png"),), turns=conv)
    cut = render_sample(rec, vlm.processor, images, 26, vlm.family.render_rules(vlm.model.config))
    assert cut.truncated and _tokens(vlm, cut.input_ids[cut.labels != IGNORE_INDEX]) == ["blue"]
    assert cut.token_inputs["token_type_ids"].tolist() == [0] * 25 + [1]
    with pytest.raises(SampleError) as err:  # a cut inside the prompt leaves no answer
        render_sample(rec, vlm.processor, images, 25, vlm.family.render_rules(vlm.model.config))
    assert err.value.reason == "no_answer_tokens"


def test_record_without_image_is_rejected_with_a_reason(paligemma):
    vlm, images = paligemma
    with pytest.raises(SampleError, match="has 0 images, and paligemma") as err:
        _render(vlm, images, "how many ?", "3", image=None)
    assert err.value.reason == "no_image"


def test_rows_carry_bidirectional_prefix_and_causal_suffix(paligemma):
    """Layer-0 rows with token_type_ids in force: the image and the prompt see each other
    both ways, the suffix is causal; the batch mixes a single- and a multi-turn sample."""
    vlm, images = paligemma
    samples = [_render(vlm, images, QUESTION, "blue circle"), _render(vlm, images, QUESTION, "red", "how many ?", "3")]
    batch = model_inputs_of(collate(samples, vlm.processor.tokenizer.pad_token_id), vlm.family)
    cap = capture_forward(vlm.model, batch, return_full_layer0=True)
    for b, sample in enumerate(samples):
        weights = cap.layer0_attn[b]  # [H, L, L]
        types = sample.token_inputs["token_type_ids"]
        last_prefix, first_suffix = int((types == 0).nonzero()[-1]), int((types == 1).nonzero()[0])
        last = len(types) - 1
        assert (weights[:, 0, last_prefix] > 0).all()  # the first image token sees the end of the prompt
        assert (weights[:, 16, last_prefix] > 0).all()  # the first text query row (<bos>) too
        assert (weights[:, first_suffix, last] == 0).all()  # the answer is causal
        assert (weights[:, last_prefix, first_suffix] == 0).all()  # the prefix does not see the answer
        assert (weights[:, first_suffix, :first_suffix] > 0).all()  # ... which sees the whole prefix
        # text query rows: <bos>, the prompt and the answer, i.e. everything after the image
        assert cap.text_query_mask[b].nonzero().squeeze(-1).tolist() == list(range(16, len(types)))


def test_paligemma2_runs_eager_in_every_layer(tmp_path):
    """Gemma2's softcapping: transformers refuses sdpa for it, so the model loads eager and the
    probe runs the model file's eager attention in the other layers too (sdpa would raise)."""
    from transformers import AutoModelForImageTextToText

    teacher = build_family("paligemma2", tmp_path / "teacher")
    with pytest.raises(ValueError, match="does not support an attention implementation through"):
        AutoModelForImageTextToText.from_pretrained(teacher, attn_implementation="sdpa")
    vlm = load_vlm(teacher)
    text = vlm.model.config.text_config
    assert text.model_type == "gemma2" and text.attn_logit_softcapping is not None
    make_image(tmp_path / "images" / "a.png")
    sample = _render(vlm, tmp_path / "images", QUESTION, "red")
    batch = model_inputs_of(collate([sample], vlm.processor.tokenizer.pad_token_id), vlm.family)
    capture_forward(vlm.model, batch)
    state = probe_state(vlm.model)
    assert (state.eager_calls, state.sdpa_calls) == (text.num_hidden_layers, 0)
