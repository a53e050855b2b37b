"""Batch rendered samples: pad the token tensors, stack the image inputs.

Image inputs are concatenated along the batch dimension in sample order, and only
samples that have an image contribute; that is how LLaVA-style models consume them
(the image tokens in input_ids are filled from pixel_values in order).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from alignkd.data.render import IGNORE_INDEX


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
    per_key: dict[str, list[torch.Tensor]] = {}
    for s in samples:
        for key, value in (_get(s, "image_inputs") or {}).items():
            per_key.setdefault(key, []).append(value)
    batch.update({key: torch.cat(values, dim=0) for key, values in per_key.items()})
    return batch


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
