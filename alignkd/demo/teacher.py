"""The demo's teacher and student: specs, a plain CE training loop, and evaluation.

Both models share the world tokenizer, the 48 px / 8 px image grid (36 vision tokens)
and one pretrained, frozen CLIP tower (see vision_pretrain.py). Only the language
model and projector train. Evaluation is greedy generation of the answer, scored by
normalised exact match and broken down per question type.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from alignkd.demo import world
from alignkd.demo.tiny_models import TinyLlavaSpec, build_llava_config, build_processor, build_word_tokenizer

_GRID = dict(image_size=world.IMAGE_SIZE, patch_size=8, vision_hidden=64, vision_layers=2, vision_heads=4)
TEACHER_SPEC = TinyLlavaSpec(hidden_size=128, num_layers=4, num_heads=8, intermediate_size=512, **_GRID)
STUDENT_SPEC = TinyLlavaSpec(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256, **_GRID)
MAX_NEW_TOKENS = 6  # the longest answer, "row 1 column 2", is 4 words + </s>


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    seed: int = 0


@dataclass
class Examples:
    """Right-padded token tensors for every record plus one pixel tensor per image."""

    input_ids: "torch.Tensor"
    attention_mask: "torch.Tensor"
    labels: "torch.Tensor"
    image_index: "torch.Tensor"  # record → row of pixel_values
    pixel_values: "torch.Tensor"
    qtypes: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)


def lm_parameter_count(model) -> int:
    """Parameters that train: everything but the (shared, frozen) vision tower."""
    return sum(p.numel() for n, p in model.named_parameters() if "vision_tower" not in n)


def build_model(spec: TinyLlavaSpec, tokenizer, vision_tower_state: dict, seed: int):
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_llava_config(tokenizer, spec))
    model.model.vision_tower.load_state_dict(vision_tower_state)
    model.model.vision_tower.requires_grad_(False)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def _messages(question: str, answer: str | None) -> list[dict]:
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    if answer is None:
        return [user]
    return [user, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def prepare_examples(manifest: Path, processor, images_root: Path, limit: int | None = None) -> Examples:
    """Tokenise a single-turn world manifest once, so that training steps only index tensors."""
    import torch
    from PIL import Image

    records = json.loads(Path(manifest).read_text())[:limit]
    tok = processor.tokenizer
    image_rows: dict[str, int] = {}
    pixels, ids, labels, index = [], [], [], []
    for rec in records:
        question = rec["conversations"][0]["value"].replace("<image>\n", "")
        answer = rec["conversations"][1]["value"]
        if rec["image"] not in image_rows:
            image_rows[rec["image"]] = len(pixels)
            img = Image.open(images_root / rec["image"]).convert("RGB")
            pixels.append(processor.image_processor(img, return_tensors="pt")["pixel_values"][0])
        prompt = processor.apply_chat_template(_messages(question, None), add_generation_prompt=True)
        full = processor.apply_chat_template(_messages(question, answer))
        p_ids = _expand(tok, prompt, processor)
        f_ids = _expand(tok, full, processor)
        ids.append(f_ids)
        labels.append([-100] * len(p_ids) + f_ids[len(p_ids):])
        index.append(image_rows[rec["image"]])
    width = max(map(len, ids))
    pad = tok.pad_token_id
    return Examples(
        input_ids=torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
        attention_mask=torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
        labels=torch.tensor([x + [-100] * (width - len(x)) for x in labels]),
        image_index=torch.tensor(index),
        pixel_values=torch.stack(pixels),
        qtypes=[r.get("qtype", "all") for r in records],
        answers=[r["conversations"][1]["value"] for r in records],
    )


def _expand(tok, text: str, processor) -> list[int]:
    """Token ids with the image placeholder expanded to one token per vision patch."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    image_id = tok.convert_tokens_to_ids(processor.image_token)
    n_image = _num_image_tokens(processor)
    out = []
    for i in ids:
        out.extend([image_id] * n_image if i == image_id else [i])
    return out


def _num_image_tokens(processor) -> int:
    size = processor.image_processor.crop_size["height"]
    return (size // processor.patch_size) ** 2 + processor.num_additional_image_tokens - 1


def train_llava(model, examples: Examples, cfg: TrainConfig, log_every: int = 0) -> list[float]:
    """Plain seeded CE on the answer tokens; returns the loss of every step."""
    import torch

    gen = torch.Generator().manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_scale(s, cfg))
    model.train()
    losses, n = [], len(examples.input_ids)
    order = torch.randperm(n, generator=gen)
    for step in range(cfg.steps):
        start = (step * cfg.batch_size) % n
        if start + cfg.batch_size > n:
            order, start = torch.randperm(n, generator=gen), 0
        batch = order[start:start + cfg.batch_size]
        out = model(**_batch(examples, batch))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(out.loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1} loss {sum(losses[-log_every:]) / log_every:.4f}", flush=True)
    return losses


def _lr_scale(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def _batch(examples: Examples, rows) -> dict:
    width = int(examples.attention_mask[rows].sum(1).max())  # trim the shared right padding
    return {
        "input_ids": examples.input_ids[rows, :width],
        "attention_mask": examples.attention_mask[rows, :width],
        "labels": examples.labels[rows, :width],
        "pixel_values": examples.pixel_values[examples.image_index[rows]],
    }


def normalise_answer(text: str) -> str:
    return " ".join(text.lower().replace("?", " ").replace(".", " ").split())


def evaluate(model, processor, examples: Examples, batch_size: int = 128) -> dict[str, float]:
    """Greedy-decode every answer; accuracy per qtype plus `all`."""
    import torch

    tok = processor.tokenizer
    model.eval()
    correct: dict[str, list[int]] = {}
    prompt_len = (examples.labels == -100).logical_and(examples.attention_mask.bool()).sum(1)
    for start in range(0, len(prompt_len), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(prompt_len)))
        ids, mask = _left_pad([examples.input_ids[r, :prompt_len[r]] for r in rows], tok.pad_token_id)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask,
                                 pixel_values=examples.pixel_values[examples.image_index[rows]],
                                 max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        texts = tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        for r, text in zip(rows.tolist(), texts):
            hit = int(normalise_answer(text) == normalise_answer(examples.answers[r]))
            correct.setdefault(examples.qtypes[r], []).append(hit)
    acc = {q: sum(v) / len(v) for q, v in sorted(correct.items())}
    acc["all"] = sum(map(sum, correct.values())) / sum(map(len, correct.values()))
    return acc


def _left_pad(seqs, pad_id: int):
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = s
        mask[i, width - len(s):] = 1
    return ids, mask
