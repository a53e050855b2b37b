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
from alignkd.data.images import image_inputs_of, image_refusals_as_rejects, load_image
from alignkd.data.manifest import ManifestRecord
from alignkd.data.sample import IGNORE_INDEX, RenderedSample, truncate
from alignkd.storage_schemas import TOKEN_INPUT_COLUMNS

SUFFIX_TYPE = 1  # token_type_ids value of the causal suffix


def render_prefix_lm(record: ManifestRecord, processor, images_root: str | Path | None,
                     max_length: int | None, family: str = "PaliGemma") -> RenderedSample:
    """Validate, render, tokenise and label `record` as prefix (prompt) + suffix (last answer).

    One image per record: the processor puts the image tokens first, as PaliGemma was
    trained, and refuses text without an image; a system turn is folded into the prefix
    as its first line, like every earlier turn.
    """
    sid, row = record.sample_id, record.row
    messages = to_messages(record, getattr(processor, "image_token", None))
    if len(record.images) != 1:
        reason = "no_image" if not record.images else "multi_image_unsupported"
        raise SampleError(sid, row, reason, f"has {len(record.images)} images, and {family} (a prefix-LM) "
                          "takes exactly one image per sample")
    loaded = load_image(images_root, record.images[0], sid, row)
    prompt, answer = split_prompt(messages)
    with image_refusals_as_rejects(processor, [loaded], sid, row):
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
        token_inputs={k: out[k][0][: len(ids)].long() for k in TOKEN_INPUT_COLUMNS if k in out},
        images=(loaded,), image_token_counts=(len(image_pos),), truncated=truncated,
    )


def split_prompt(messages: list[dict]) -> tuple[str, str]:
    """(prefix text, suffix text): every turn but the last answer, one per line; the last answer."""
    lines = [_text_of(m) for m in messages]
    return "\n".join(line for line in lines[:-1] if line), lines[-1]


def _text_of(message: dict) -> str:
    # the image item is dropped: the processor puts the image tokens first, as PaliGemma was trained
    return " ".join(item["text"].strip() for item in message["content"] if item["type"] == "text")
