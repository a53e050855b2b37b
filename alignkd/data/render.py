"""Render one manifest record into model inputs and a label mask.

Label mask method, independent of any particular template:
1. Render the conversation with the processor's own chat template. For each assistant
   turn k, render messages[:k] with the generation prompt and messages[:k+1]; the
   characters between the two renders are that turn's answer plus whatever the template
   appends to end the turn (e.g. "</s>"), which we want labelled so the model learns to
   stop. Both renders must be prefixes of the full text, or the template is refused.
   A template that ends a turn with no special token gets the tokenizer's EOS after the
   answer (`close_answers`; recorded as `answer_end` in the cache's build options).
2. Tokenise through the processor itself, asking it for the fast tokenizer's offsets and
   for where each image placeholder was expanded. The label mask then comes from the very
   ids the processor produced: there is no second tokenisation that could disagree.
3. Shift the answer spans past the expanded placeholders (checking that each answer is
   found in the expanded text where we expect it) and label every token that overlaps a
   span.

Families without a chat template that train as a prefix-LM (PaliGemma) are rendered by
`alignkd.data.prefix_lm` instead; the family row's `prompt_format` says which.

A record may have no image (text only: CE and logit KD still apply) or several, each an
`<image>` placeholder or image item; the processor takes them in order, and each image's
expansion is found in its record of replacements so the vision-token axis splits into one
range per image. A system turn goes to the template, which must print it: a template that
refuses or drops it makes the record a reject that names the family.

Truncation keeps the head of the sequence (prompt, images, first answers) and cuts the tail,
but never through image tokens: the model cannot take part of an image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from alignkd.data.conversation import to_messages
from alignkd.data.errors import ProcessorError, SampleError
from alignkd.data.images import image_inputs_of, image_refusals_as_rejects, load_image
from alignkd.data.manifest import ManifestRecord
from alignkd.data.sample import IGNORE_INDEX, RenderedSample, truncate
from alignkd.storage_schemas import TOKEN_INPUT_COLUMNS


# How each assistant turn's labels end; cache.json's build_options records it.
ANSWER_END = "eos-if-template-has-none"


@dataclass(frozen=True)
class RenderRules:
    """What the model family allows (`alignkd.models.families.VLMFamily` carries the same facts)."""

    family: str = "this model"
    prompt_format: str = "chat_template"   # or "prefix_lm"
    multi_image: bool = True
    # the id the model fills with vision tokens (Gemma3's <image_soft_token>, where the processor's
    # own image_token_id is <start_of_image>); None: the processor's
    image_token_id: int | None = None


def render_sample(record: ManifestRecord, processor, images_root: str | Path | None,
                  max_length: int | None, rules: RenderRules = RenderRules()) -> RenderedSample:
    """Validate, render, tokenise and label `record`; raise SampleError on bad input."""
    if rules.prompt_format == "prefix_lm":
        from alignkd.data.prefix_lm import render_prefix_lm

        return render_prefix_lm(record, processor, images_root, max_length, rules.family)
    if rules.prompt_format != "chat_template":
        raise ValueError(f"unknown prompt_format {rules.prompt_format!r}")
    sid, row = record.sample_id, record.row
    messages = to_messages(record, getattr(processor, "image_token", None))
    if len(record.images) > 1 and not rules.multi_image:
        raise SampleError(sid, row, "multi_image_unsupported",
                          f"has {len(record.images)} images, but alignkd takes one image per sample for {rules.family}")
    loaded = [load_image(images_root, ref, sid, row) for ref in record.images]
    text, spans = render_with_spans(processor, messages, sid, row, rules.family)
    with image_refusals_as_rejects(processor, loaded, sid, row):
        out = _encode(processor, text, loaded)
    ids, offsets = out["input_ids"][0].long(), out["offset_mapping"][0]
    replacements = _image_replacements(out)
    if len(replacements) != len(loaded):
        raise ProcessorError(f"{type(processor).__name__} reported {len(replacements)} image expansions for "
                             f"{len(loaded)} images, so alignkd cannot place the labels.")
    spans = _expanded_spans(processor, text, spans, replacements, messages)
    labels = _labels(ids, offsets, spans, processor)
    image_pos = _image_positions(ids, offsets, replacements, processor)
    per_image = _tokens_per_image(ids, offsets, replacements, rules.image_token_id or _image_token_id(processor))
    ids, mask, labels, truncated = truncate(sid, row, ids, out["attention_mask"][0], labels, image_pos, max_length)
    return RenderedSample(
        sample_id=sid, row=row, input_ids=ids, attention_mask=mask, labels=labels,
        image_inputs=image_inputs_of(out) if loaded else {},
        token_inputs={k: out[k][0][: len(ids)].long() for k in TOKEN_INPUT_COLUMNS if k in out},
        images=tuple(loaded), image_token_counts=per_image, truncated=truncated,
    )


def render_with_spans(processor, messages: list[dict], sample_id: str, row: int,
                      family: str = "this model") -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of every assistant turn."""
    full = _apply(processor, messages, False, sample_id, row, family)
    system = [_text(m) for m in messages if m["role"] == "system"]
    if any(text.strip() not in full for text in system):
        raise SampleError(sample_id, row, "system_unsupported",
                          f"has a system turn that the chat template of {family} leaves out of the prompt")
    spans = []
    for k, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = _apply(processor, messages[:k], True, sample_id, row, family)
        upto = _apply(processor, messages[: k + 1], False, sample_id, row, family)
        answer = msg["content"][0]["text"].strip()
        if not (upto.startswith(prompt) and full.startswith(upto) and answer in upto[len(prompt):]):
            raise ProcessorError(
                f"The chat template of {type(processor).__name__} does not render conversations prefix by prefix, "
                "so alignkd cannot tell which tokens are the assistant's.")
        spans.append((len(prompt), len(upto)))
    return close_answers(processor, messages, full, spans)


def close_answers(processor, messages: list[dict], text: str,
                  spans: list[tuple[int, int]]) -> tuple[str, list[tuple[int, int]]]:
    """Put the tokenizer's EOS after every answer whose turn the template does not close.

    Some published templates end an assistant turn with nothing (llava-1.5-7b-hf: "ASSISTANT:
    blue USER: ..."), so the labels would end in the answer's last word and the student
    would never be taught to stop. SFT trainers append EOS there; so do we, inside the
    turn's span so it is labelled. A turn already holding a special token (</s>, <|im_end|>,
    <end_of_turn>) is left as the template wrote it.
    """
    tok = getattr(processor, "tokenizer", processor)
    eos = getattr(tok, "eos_token", None)
    if not eos:
        return text, spans
    specials = _special_strings(tok)
    answers = [m["content"][0]["text"].strip() for m in messages if m["role"] == "assistant"]
    out, shift, pieces, last = [], 0, [], 0
    for (start, end), answer in zip(spans, answers):
        turn = text[start:end]
        if any(sp in turn for sp in specials):
            out.append((start + shift, end + shift))
            continue
        at = start + turn.rfind(answer) + len(answer)
        pieces += [text[last:at], eos]
        last = at
        out.append((start + shift, end + shift + len(eos)))
        shift += len(eos)
    return "".join(pieces) + text[last:], out


def _special_strings(tok) -> set[str]:
    """Every special token's text, the end-of-turn markers that are not the EOS included."""
    specials = set(getattr(tok, "all_special_tokens", []) or [])
    for added in (getattr(tok, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            specials.add(str(added))
    return {sp for sp in specials if sp}


def _text(message: dict) -> str:
    return " ".join(item["text"] for item in message["content"] if item["type"] == "text")


def _apply(processor, messages, add_generation_prompt: bool, sample_id: str, row: int, family: str) -> str:
    from jinja2.exceptions import TemplateError

    try:
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as err:  # e.g. a template's raise_exception("...roles must alternate...")
        if messages and messages[0]["role"] == "system":
            raise SampleError(sample_id, row, "system_unsupported",
                              f"has a system turn, which the chat template of {family} refuses ({err})") from None
        raise SampleError(sample_id, row, "template_rejected", f"is refused by the chat template ({err})") from None


def _encode(processor, text: str, loaded: list):
    kwargs = {"return_tensors": "pt", "return_offsets_mapping": True, "return_text_replacement_offsets": True}
    bos = getattr(processor.tokenizer, "bos_token", None)
    if bos and text.startswith(bos):  # the template wrote BOS already; same rule as transformers
        kwargs["add_special_tokens"] = False
    out = processor(text=[text], images=[img.image for img in loaded] or None, **kwargs)
    if "offset_mapping" not in out:
        raise ProcessorError(
            f"{type(processor).__name__} returned no offset mapping; alignkd needs a processor with a fast "
            "tokenizer that passes return_offsets_mapping through.")
    return out


def _image_replacements(out) -> list[dict]:
    """The processor's record of where it expanded each image placeholder (none for text only:
    some processors then return an empty tensor instead of an empty list)."""
    reps = out.get("text_replacement_offsets")
    rows = list(reps[0]) if reps is not None and len(reps) else []
    return [rep for rep in rows if isinstance(rep, dict) and rep["type"] == "image"]


def _expanded_spans(processor, text, spans, replacements, messages) -> list[tuple[int, int]]:
    """Answer spans moved onto the placeholder-expanded text the offsets refer to.

    The expanded text is rebuilt from the processor's own replacement record and each
    answer is checked to sit inside its moved span, so a processor that expands images
    some other way fails loudly instead of shifting every label.
    """
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
    """Positions of every token the processor put in for the images (wrappers included)."""
    hit = torch.zeros_like(ids, dtype=torch.bool)
    for rep in replacements:
        hit |= _overlapping(offsets, *rep["new_span"])
    token_id = _image_token_id(processor)
    if token_id is not None:
        hit |= ids == token_id
    return hit.nonzero().flatten()


def _tokens_per_image(ids: torch.Tensor, offsets: torch.Tensor, replacements: list[dict],
                      token_id: int | None) -> tuple[int, ...]:
    """How many image tokens (`token_id`, the id the model fills with vision tokens) each image's expansion holds."""
    if token_id is None or not replacements:
        return ()
    counts = tuple(int(((ids == token_id) & _overlapping(offsets, *rep["new_span"])).sum()) for rep in replacements)
    if sum(counts) != int((ids == token_id).sum()):
        raise ProcessorError("the processor put image tokens outside the expansions it reported; "
                             "alignkd cannot tell which vision tokens belong to which image.")
    return counts


def _image_token_id(processor) -> int | None:
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None and getattr(processor, "image_token", None):
        token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return token_id
