"""Batch rendered samples: pad the token tensors, stack the image inputs.

Image inputs are concatenated along the batch dimension in sample order, and only
samples that have an image contribute; that is how LLaVA-style models consume them
(the image tokens in input_ids are filled from pixel_values in order). Image tensors
whose trailing shapes differ (LLaVA-NeXT's per-image patch count, Idefics3's tile count,
Pixtral's image size) are zero-padded to the largest: each family's forward reads the
real extent from its own size inputs (image_sizes, pixel_attention_mask) or drops
all-zero tiles, exactly as when its processor pads a batch itself.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from alignkd.data.sample import IGNORE_INDEX


def collate(samples, pad_token_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad input_ids (pad id), attention_mask (0) and labels (-100); concat image inputs.

    `samples` are RenderedSample objects or mappings with the same keys.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    if not samples:
        raise ValueError("collate needs at least one sample")
    length = max(len(_get(s, "input_ids")) for s in samples)
    batch = {
        "input_ids": _pad([_get(s, "input_ids") for s in samples], length, pad_token_id, padding_side),
        "attention_mask": _pad([_get(s, "attention_mask") for s in samples], length, 0, padding_side),
        "labels": _pad([_get(s, "labels") for s in samples], length, IGNORE_INDEX, padding_side),
    }
    for key in _token_input_keys(samples):
        rows = [_get(s, "token_inputs")[key] for s in samples]
        batch[key] = _pad(rows, length, 0, padding_side)
    per_key: dict[str, list[torch.Tensor]] = {}
    for s in samples:
        for key, value in (_get(s, "image_inputs") or {}).items():
            per_key.setdefault(key, []).append(value)
    batch.update({key: concat_padded(values) for key, values in per_key.items()})
    return batch


def _token_input_keys(samples) -> list[str]:
    """Per-token inputs every sample has (a key only some samples carry cannot be batched)."""
    keys = [set(_optional(s, "token_inputs") or ()) for s in samples]
    return sorted(set.intersection(*keys))


def concat_padded(values: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat along dim 0, zero-padding every other dim to the largest size first."""
    shape = [max(v.shape[d] for v in values) for d in range(1, values[0].dim())]
    padded = []
    for v in values:
        if list(v.shape[1:]) != shape:
            out = v.new_zeros((v.shape[0], *shape))
            out[(slice(None), *(slice(0, n) for n in v.shape[1:]))] = v
            v = out
        padded.append(v)
    return torch.cat(padded, dim=0)


def _optional(sample, key: str):
    return sample.get(key) if isinstance(sample, Mapping) else getattr(sample, key, None)


def _get(sample, key: str):
    return sample[key] if isinstance(sample, Mapping) else getattr(sample, key)


def _pad(rows: list[torch.Tensor], length: int, value: int, side: str) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if side == "right":
            out[i, : len(row)] = row
        else:
            out[i, length - len(row):] = row
    return out
