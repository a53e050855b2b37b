"""Render one manifest record into model inputs and a label mask.

Label mask method, independent of any particular template:
1. Render the conversation with the processor's own chat template. For each assistant
   turn k, render messages[:k] with the generation prompt and messages[:k+1]; the
   characters between the two renders are that turn's answer plus whatever the template
   appends to end the turn (e.g. "</s>"), which we want labelled so the model learns to
   stop. Both renders must be prefixes of the full text, or the template is refused.
2. Tokenise through the processor itself, asking it for the fast tokenizer's offsets and
   for where each image placeholder was expanded. The label mask then comes from the very
   ids the processor produced: there is no second tokenisation that could disagree.
3. Shift the answer spans past the expanded placeholders (checking that each answer is
   found in the expanded text where we expect it) and label every token that overlaps a
   span.

Families without a chat template that train as a prefix-LM (PaliGemma) are rendered by
`alignkd.data.prefix_lm` instead; the family row's `prompt_format` says which.

Truncation keeps the head of the sequence (prompt, image, first answers) and cuts the tail,
but never through image tokens: the model cannot take part of an image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkd.data.conversation import to_messages
from alignkd.data.errors import ProcessorError, SampleError
from alignkd.data.images import TOKEN_INPUT_KEYS, LoadedImage, image_inputs_of, load_image
from alignkd.data.manifest import ManifestRecord
from alignkd.errors import ConfigError

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips


@dataclass
class RenderedSample:
    """A tokenised sample; tensors are 1-D except image_inputs (batch dim 1)."""

    sample_id: str
    row: int
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    image_inputs: dict = field(default_factory=dict)
    token_inputs: dict = field(default_factory=dict)  # per-token model inputs, e.g. mm_token_type_ids [L]
    image_sha256: str | None = None
    image_bytes: bytes | None = None
    truncated: bool = False


def render_sample(record: ManifestRecord, processor, images_root: str | Path | None,
                  max_length: int | None, prompt_format: str = "chat_template") -> RenderedSample:
    """Validate, render, tokenise and label `record`; raise SampleError on bad input.

    `prompt_format` is the model family's (`VLMFamily.prompt_format`).
    """
    if prompt_format == "prefix_lm":
        from alignkd.data.prefix_lm import render_prefix_lm

        return render_prefix_lm(record, processor, images_root, max_length)
    if prompt_format != "chat_template":
        raise ValueError(f"unknown prompt_format {prompt_format!r}")
    sid, row = record.sample_id, record.row
    messages = to_messages(record, getattr(processor, "image_token", None))
    if record.image is not None and images_root is None:
        raise ConfigError(f"sample {sid!r} names an image but no images directory was given.")
    loaded = load_image(images_root, record.image, sid, row) if record.image is not None else None
    text, spans = render_with_spans(processor, messages, sid, row)
    out = _encode(processor, text, loaded)
    ids, offsets = out["input_ids"][0].long(), out["offset_mapping"][0]
    replacements = (out.get("text_replacement_offsets") or [[]])[0]
    spans = _expanded_spans(processor, text, spans, replacements, messages, has_image=loaded is not None)
    labels = _labels(ids, offsets, spans, processor)
    image_pos = _image_positions(ids, offsets, replacements, processor)
    ids, mask, labels, truncated = truncate(sid, row, ids, out["attention_mask"][0], labels, image_pos, max_length)
    return RenderedSample(
        sample_id=sid, row=row, input_ids=ids, attention_mask=mask, labels=labels,
        image_inputs=image_inputs_of(out),
        token_inputs={k: out[k][0][: len(ids)].long() for k in TOKEN_INPUT_KEYS if k in out},
        image_sha256=loaded.sha256 if loaded else None,
        image_bytes=loaded.data if loaded else None,
        truncated=truncated,
    )


def render_with_spans(processor, messages: list[dict], sample_id: str, row: int) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of every assistant turn."""
    full = _apply(processor, messages, False, sample_id, row)
    spans = []
    for k, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = _apply(processor, messages[:k], True, sample_id, row)
        upto = _apply(processor, messages[: k + 1], False, sample_id, row)
        answer = msg["content"][0]["text"].strip()
        if not (upto.startswith(prompt) and full.startswith(upto) and answer in upto[len(prompt):]):
            raise ProcessorError(
                f"The chat template of {type(processor).__name__} does not render conversations prefix by prefix, "
                "so alignkd cannot tell which tokens are the assistant's.")
        spans.append((len(prompt), len(upto)))
    return full, spans


def _apply(processor, messages, add_generation_prompt: bool, sample_id: str, row: int) -> str:
    from jinja2.exceptions import TemplateError

    try:
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as err:  # e.g. a template's raise_exception("...roles must alternate...")
        raise SampleError(sample_id, row, "template_rejected", f"is refused by the chat template ({err})") from None


def _encode(processor, text: str, loaded: LoadedImage | None):
    kwargs = {"return_tensors": "pt", "return_offsets_mapping": True, "return_text_replacement_offsets": True}
    bos = getattr(processor.tokenizer, "bos_token", None)
    if bos and text.startswith(bos):  # the template wrote BOS already; same rule as transformers
        kwargs["add_special_tokens"] = False
    out = processor(text=[text], images=[loaded.image] if loaded else None, **kwargs)
    if "offset_mapping" not in out:
        raise ProcessorError(
            f"{type(processor).__name__} returned no offset mapping; alignkd needs a processor with a fast "
            "tokenizer that passes return_offsets_mapping through.")
    return out


def _expanded_spans(processor, text, spans, replacements, messages, has_image: bool) -> list[tuple[int, int]]:
    """Answer spans moved onto the placeholder-expanded text the offsets refer to.

    The expanded text is rebuilt from the processor's own replacement record and each
    answer is checked to sit inside its moved span, so a processor that expands images
    some other way fails loudly instead of shifting every label.
    """
    if has_image and not any(rep["type"] == "image" for rep in replacements):
        raise ProcessorError(f"{type(processor).__name__} did not report where it expanded the image placeholder, "
                             "so alignkd cannot place the labels.")
    expanded, last = [], 0
    for rep in replacements:
        expanded += [text[last:rep["span"][0]], rep["replacement"]]
        last = rep["span"][1]
    expanded = "".join(expanded) + text[last:]
    answers = [m["content"][0]["text"].strip() for m in messages if m["role"] == "assistant"]
    moved = [(_expanded(a, replacements), _expanded(b, replacements)) for a, b in spans]
    if any(answer not in expanded[a:b] for answer, (a, b) in zip(answers, moved)):
        raise ProcessorError(f"{type(processor).__name__}'s placeholder expansion does not match its text; "
                             "alignkd cannot place the labels.")
    return moved


def _expanded(pos: int, replacements: list[dict]) -> int:
    """Map a character position in the rendered text to the placeholder-expanded text."""
    shift = 0
    for rep in replacements:
        (start, end), (new_start, new_end) = rep["span"], rep["new_span"]
        if end <= pos:
            shift += (new_end - new_start) - (end - start)
    return pos + shift


def _overlapping(offsets: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Tokens whose characters overlap [start, end); zero-width (added special) tokens never do."""
    lo, hi = offsets[:, 0], offsets[:, 1]
    return (lo < end) & (hi > start) & (hi > lo)


def _labels(ids: torch.Tensor, offsets: torch.Tensor, spans: list[tuple[int, int]], processor) -> torch.Tensor:
    keep = torch.zeros_like(ids, dtype=torch.bool)
    for start, end in spans:
        hit = _overlapping(offsets, start, end)
        if not hit.any():
            raise ProcessorError(f"{type(processor).__name__}'s token offsets do not cover an assistant turn; "
                                 "its tokenizer's offset mapping looks broken.")
        keep |= hit
    return torch.where(keep, ids, torch.full_like(ids, IGNORE_INDEX))


def _image_positions(ids: torch.Tensor, offsets: torch.Tensor, replacements: list[dict], processor) -> torch.Tensor:
    """Positions of every token the processor put in for the image (wrappers included)."""
    hit = torch.zeros_like(ids, dtype=torch.bool)
    for rep in replacements:
        if rep["type"] == "image":
            hit |= _overlapping(offsets, *rep["new_span"])
    token_id = getattr(processor, "image_token_id", None)
    if token_id is not None:
        hit |= ids == token_id
    return hit.nonzero().flatten()


def truncate(sid, row, ids, mask, labels, image_pos, max_length):
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        if len(image_pos) and int(image_pos.max()) >= max_length:
            raise SampleError(sid, row, "image_tokens_truncated",
                              f"needs {int(image_pos.max()) + 1} tokens to hold its image but max_length is {max_length}")
        ids, mask, labels = ids[:max_length], mask[:max_length], labels[:max_length]
    if not (labels != IGNORE_INDEX).any():
        raise SampleError(sid, row, "no_answer_tokens",
                          f"has no answer tokens left within max_length {max_length} ({len(ids)} tokens kept)")
    return ids, mask.long(), labels, truncated
