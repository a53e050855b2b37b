"""Render a record for a prefix-LM family (PaliGemma 1 and 2), which has no chat template.

PaliGemma is trained on `image tokens + <bos> + prompt + "\\n"` as a bidirectional prefix
and `answer + <eos>` as a causal suffix; `token_type_ids` (0 prefix, 1 suffix) make the
model build that mask. The processor produces exactly this layout when it is given the
answer as `suffix=`, so the record is rendered through that call: the prompt and answer
strings are all alignkd chooses, and the labels are read off the processor's own
`token_type_ids` (every suffix token, the `<eos>` included, nothing else).

A multi-turn record folds its earlier turns into the prefix, one turn per line
(question, answer, question, ...), and only the last answer is the suffix and carries
labels. PaliGemma has no multi-turn format of its own; folding keeps such records usable
(the earlier answers become context, read bidirectionally like the rest of the prompt)
instead of rejecting most of a LLaVA-Instruct-style manifest.
"""

from __future__ import annotations

from pathlib import Path

import torch

from alignkd.data.conversation import to_messages
from alignkd.data.errors import ProcessorError, SampleError
from alignkd.data.images import TOKEN_INPUT_KEYS, image_inputs_of, load_image
from alignkd.data.manifest import ManifestRecord
from alignkd.data.render import IGNORE_INDEX, RenderedSample, truncate
from alignkd.errors import ConfigError

SUFFIX_TYPE = 1  # token_type_ids value of the causal suffix


def render_prefix_lm(record: ManifestRecord, processor, images_root: str | Path | None,
                     max_length: int | None) -> RenderedSample:
    """Validate, render, tokenise and label `record` as prefix (prompt) + suffix (last answer)."""
    sid, row = record.sample_id, record.row
    messages = to_messages(record, getattr(processor, "image_token", None))
    if record.image is None:  # the processor refuses text without an image
        raise SampleError(sid, row, "no_image", "has no image, and a prefix-LM family (PaliGemma) needs one")
    if images_root is None:
        raise ConfigError(f"sample {sid!r} names an image but no images directory was given.")
    loaded = load_image(images_root, record.image, sid, row)
    prompt, answer = split_prompt(messages)
    out = processor(text=[processor.image_token + prompt], images=[loaded.image], suffix=[answer],
                    return_tensors="pt")
    ids, types = out["input_ids"][0].long(), out.get("token_type_ids")
    if types is None:
        raise ProcessorError(f"{type(processor).__name__} returned no token_type_ids, so alignkd cannot tell "
                             "the prefix from the answer.")
    types = types[0].long()
    labels = torch.where(types == SUFFIX_TYPE, ids, torch.full_like(ids, IGNORE_INDEX))
    image_pos = (ids == processor.image_token_id).nonzero().flatten()
    ids, mask, labels, truncated = truncate(sid, row, ids, out["attention_mask"][0], labels, image_pos, max_length)
    return RenderedSample(
        sample_id=sid, row=row, input_ids=ids, attention_mask=mask, labels=labels,
        image_inputs=image_inputs_of(out),
        token_inputs={k: out[k][0][: len(ids)].long() for k in TOKEN_INPUT_KEYS if k in out},
        image_sha256=loaded.sha256, image_bytes=loaded.data, truncated=truncated,
    )


def split_prompt(messages: list[dict]) -> tuple[str, str]:
    """(prefix text, suffix text): every turn but the last answer, one per line; the last answer."""
    lines = [_text_of(m) for m in messages]
    return "\n".join(line for line in lines[:-1] if line), lines[-1]


def _text_of(message: dict) -> str:
    # the image item is dropped: the processor puts the image tokens first, as PaliGemma was trained
    return " ".join(item["text"].strip() for item in message["content"] if item["type"] == "text")
