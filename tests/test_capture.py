"""The capture layer against live transformers forwards on tiny real LLaVA models.

References are a second copy of the same weights loaded with full eager attention
(`output_attentions=True`) or plain sdpa, so every comparison is model-vs-model.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from alignkd.errors import AlignKDError
from alignkd.models import capture_forward, check_gradient_checkpointing, load_vlm, probe_state

QUESTIONS = ["what is the colour ?", "how many red circle are there left of the blue square ?"]


def make_batch(processor, questions=QUESTIONS, padding_side="left", seed=0) -> dict:
    """Processor output for one image per question, padded to the longest."""
    images = [
        Image.fromarray(np.random.default_rng(seed + i).integers(0, 255, (40, 40, 3), dtype=np.uint8))
        for i in range(len(questions))
    ]
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            add_generation_prompt=True,
        )
        for q in questions
    ]
    processor.tokenizer.padding_side = padding_side
    return dict(processor(text=texts, images=images, return_tensors="pt", padding=True))


def reference(model_dir, attn: str):
    return AutoModelForImageTextToText.from_pretrained(model_dir, attn_implementation=attn).eval()


@pytest.fixture(scope="module")
def teacher(tiny_llava_dir):
    return load_vlm(tiny_llava_dir)


@pytest.fixture(scope="module")
def eager_teacher(tiny_llava_dir):
    return reference(tiny_llava_dir, "eager")


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_layer0_matches_full_eager_on_padded_batch(teacher, eager_teacher, tiny_llava_dir, padding_side):
    batch = make_batch(teacher.processor, padding_side=padding_side)
    valid = batch["attention_mask"].bool()
    assert not valid.all()  # the two samples really have different lengths
    capture_forward(teacher.model, batch)  # installs the probe
    state = probe_state(teacher.model)
    before = (state.eager_calls, state.sdpa_calls)

    cap = capture_forward(teacher.model, batch, return_full_layer0=True)
    with torch.no_grad():
        eager = eager_teacher(**batch, output_attentions=True)
        sdpa = reference(tiny_llava_dir, "sdpa")(**batch)

    rows = valid[:, None, :].expand(-1, cap.layer0_attn.shape[1], -1)  # [B, H, L] valid query rows
    assert torch.allclose(cap.layer0_attn[rows], eager.attentions[0][rows], atol=1e-5, rtol=0)
    assert torch.allclose(cap.layer0_attn[rows].sum(-1), torch.ones(()), atol=1e-5)
    assert torch.allclose(cap.logits[valid], sdpa.logits[valid], atol=1e-5, rtol=0)
    # attn_text_vision is layer 0 sliced to the vision key columns, for every row.
    index = cap.vision_positions[:, None, None, :].expand(-1, 4, batch["input_ids"].shape[1], -1)
    assert torch.equal(cap.attn_text_vision, cap.layer0_attn.gather(3, index))
    assert cap.attn_text_vision.shape == (2, 4, batch["input_ids"].shape[1], 16)
    # One eager call (layer 0) and sdpa for the other layer, per forward.
    state = probe_state(teacher.model)
    num_layers = teacher.model.config.text_config.num_hidden_layers
    assert (state.eager_calls - before[0], state.sdpa_calls - before[1]) == (1, num_layers - 1)


def test_masks_and_positions(teacher):
    batch = make_batch(teacher.processor, padding_side="left")
    cap = capture_forward(teacher.model, batch)
    ids, attn = batch["input_ids"], batch["attention_mask"].bool()
    image_id = teacher.model.config.image_token_id
    assert torch.equal(cap.image_mask, ids == image_id)
    assert cap.vision_positions.dtype == torch.long and cap.vision_positions.shape == (2, 16)
    for b in range(2):
        positions = torch.nonzero(ids[b] == image_id).flatten()
        assert torch.equal(cap.vision_positions[b], positions)
        expected = torch.zeros_like(attn[b])
        expected[int(positions.max()) + 1:] = True
        assert torch.equal(cap.text_query_mask[b], expected & attn[b])
    assert cap.text_query_mask.sum() > 0
    assert cap.layer0_attn is None and not cap.logits.requires_grad


def test_unpadded_batch_uses_causal_mask(teacher, eager_teacher):
    # Equal lengths: sdpa_mask returns None (is_causal path) and the probe builds the mask.
    batch = make_batch(teacher.processor, questions=["what is the colour ?"] * 2)
    assert batch["attention_mask"].all()
    cap = capture_forward(teacher.model, batch, return_full_layer0=True)
    with torch.no_grad():
        eager = eager_teacher(**batch, output_attentions=True)
    assert torch.allclose(cap.layer0_attn, eager.attentions[0], atol=1e-5, rtol=0)


def test_vision_tokens_equal_projector_output(teacher, tiny_llava_dir):
    batch = make_batch(teacher.processor, padding_side="right")
    cap = capture_forward(teacher.model, batch)
    with torch.no_grad():
        plain = reference(tiny_llava_dir, "sdpa")(**batch)
    expected = torch.stack(list(plain.image_outputs.pooler_output))
    assert cap.vision_tokens.shape == expected.shape == (2, 16, 64)
    assert torch.allclose(cap.vision_tokens, expected, atol=1e-6, rtol=0)


def test_labels_pass_through_as_loss(teacher):
    batch = make_batch(teacher.processor)
    batch["labels"] = batch["input_ids"].masked_fill(~batch["attention_mask"].bool(), -100)
    cap = capture_forward(teacher.model, batch)
    assert cap.loss is not None and torch.isfinite(cap.loss)


def attention_loss_grad(model, batch) -> torch.Tensor:
    cap = capture_forward(model, batch, keep_graph=True)
    rows = cap.text_query_mask[:, None, :, None].expand_as(cap.attn_text_vision)
    target = torch.full_like(cap.attn_text_vision, 1.0 / cap.attn_text_vision.shape[-1])
    torch.nn.functional.mse_loss(cap.attn_text_vision[rows], target[rows]).backward()
    return model.model.multi_modal_projector.linear_1.weight.grad


def test_student_attention_loss_reaches_projector(tiny_student_dir):
    student = load_vlm(tiny_student_dir)
    grad = attention_loss_grad(student.model.train(), make_batch(student.processor))
    assert grad is not None and grad.abs().sum() > 0


def test_teacher_and_student_do_not_mix(teacher, eager_teacher, tiny_student_dir):
    student = load_vlm(tiny_student_dir)
    batch = make_batch(teacher.processor)
    t1 = capture_forward(teacher.model, batch, return_full_layer0=True)
    s = capture_forward(student.model, batch, return_full_layer0=True)
    t2 = capture_forward(teacher.model, batch, return_full_layer0=True)
    assert probe_state(teacher.model) is not probe_state(student.model)
    assert t1.attn_text_vision.shape[1] == 4 and s.attn_text_vision.shape[1] == 2
    assert torch.equal(t1.layer0_attn, t2.layer0_attn)
    with torch.no_grad():
        student_eager = reference(tiny_student_dir, "eager")(**batch, output_attentions=True)
    valid = batch["attention_mask"].bool()[:, None, :].expand(-1, 2, -1)
    assert torch.allclose(s.layer0_attn[valid], student_eager.attentions[0][valid], atol=1e-5, rtol=0)
    assert s.vision_tokens.shape[-1] == 32 and t1.vision_tokens.shape[-1] == 64


def test_reentrant_checkpointing_refused_non_reentrant_works(tiny_student_dir):
    vlm = load_vlm(tiny_student_dir)
    model = vlm.model.train()
    batch = make_batch(vlm.processor)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(AlignKDError, match="must be non-reentrant"):
        capture_forward(model, batch, keep_graph=True)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    check_gradient_checkpointing(model)
    grad = attention_loss_grad(model, batch)
    assert grad is not None and grad.abs().sum() > 0


def test_batch_without_images_captures_no_vision(teacher):
    """A text-only batch: no vision tokens or columns, and the logits of a plain forward."""
    batch = dict(teacher.processor.tokenizer(["USER: what is the colour ?"], return_tensors="pt"))
    cap = capture_forward(teacher.model, batch)
    assert cap.vision_positions.shape == (1, 0) and cap.attn_text_vision.shape[-1] == 0
    assert cap.vision_tokens.shape[:2] == (1, 0) and not cap.vision_mask.any()
    with torch.no_grad():
        plain = teacher.model(**batch).logits
    torch.testing.assert_close(cap.logits, plain)


def test_load_vlm_errors(tmp_path, tiny_llava_dir):
    with pytest.raises(AlignKDError, match="does not exist"):
        load_vlm(tmp_path / "nope")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(tiny_llava_dir / "config.json", no_weights / "config.json")
    (no_weights / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(AlignKDError, match="no .safetensors weights"):
        load_vlm(no_weights)
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (other / "model.safetensors").write_bytes(b"")
    with pytest.raises(AlignKDError, match="'bert' is not supported .*llava"):
        load_vlm(other)


def test_load_vlm_returns_eval_model_and_processor(teacher, tiny_llava_dir):
    assert not teacher.model.training
    assert teacher.family.name == "llava" and teacher.path == tiny_llava_dir
    assert teacher.processor.tokenizer.convert_tokens_to_ids("<image>") == teacher.model.config.image_token_id
