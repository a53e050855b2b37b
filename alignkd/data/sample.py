"""A rendered sample and the rules every renderer shares (label value, truncation).

Both renderers (`render` for chat templates, `prefix_lm` for PaliGemma) build a
`RenderedSample`; keeping it here, below both, is what lets them not import each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from alignkd.data.errors import SampleError

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips


@dataclass(frozen=True)
class LoadedImage:
    image: object       # PIL.Image.Image in RGB
    data: bytes         # the encoded bytes, as stored in the cache
    sha256: str
    name: str | None = None  # the manifest's path for it (None for bytes without a path)


@dataclass
class RenderedSample:
    """A tokenised sample; tensors are 1-D except image_inputs (the processor's image batch).

    `images` are the sample's images in placeholder order (none for a text-only record) and
    `image_token_counts[k]` is how many image tokens image k put into `input_ids`, so the
    vision-token axis splits into one contiguous range per image.
    """

    sample_id: str
    row: int
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    image_inputs: dict = field(default_factory=dict)
    token_inputs: dict = field(default_factory=dict)  # per-token model inputs, e.g. mm_token_type_ids [L]
    images: tuple[LoadedImage, ...] = ()
    image_token_counts: tuple[int, ...] = ()
    truncated: bool = False


def truncate(sid, row, ids, mask, labels, image_pos, max_length):
    """Keep the head of the sequence; never cut through image tokens or drop every answer token."""
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        if len(image_pos) and int(image_pos.max()) >= max_length:
            raise SampleError(sid, row, "image_tokens_truncated",
                              f"needs {int(image_pos.max()) + 1} tokens to hold its images but max_length is {max_length}")
        ids, mask, labels = ids[:max_length], mask[:max_length], labels[:max_length]
    if not (labels != IGNORE_INDEX).any():
        raise SampleError(sid, row, "no_answer_tokens",
                          f"has no answer tokens left within max_length {max_length} ({len(ids)} tokens kept)")
    return ids, mask.long(), labels, truncated
