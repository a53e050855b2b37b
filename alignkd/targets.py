"""Targets both stages agree on: which positions are distilled and where the text looks.

The cache builder computes these from the teacher and stores them; the distill stage
recomputes them for the student and for the live-teacher checks. They live below both
stages so that `alignkd.cache` never imports `alignkd.distill`.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

IGNORE_INDEX = -100


def select_positions(
    labels: Tensor, text_query_mask: Tensor, attention_mask: Tensor, policy: str
) -> Tensor:
    """Bool [B, L]: the positions t whose next-token distribution is distilled.

    labels [B, L] unshifted (-100 = no CE); text_query_mask [B, L] true on text
    positions after the (last) image, all false for a text-only sample; attention_mask
    [B, L] 1 on real tokens. `response`: the labelled answer positions; `text`: every text
    position after the image, or every position of a text-only sample. Works for
    left and right padding alike because it only looks at masks.
    """
    real = attention_mask.bool()
    nxt = torch.zeros_like(real)
    if policy == "response":
        nxt[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        return nxt & real
    if policy == "text":
        nxt[:, :-1] = real[:, 1:]
        text = text_query_mask.bool()
        # a text-only sample has no image to come after: all of its text is distilled
        text = text | ~text.any(dim=1, keepdim=True)
        return nxt & real & text
    raise ValueError(f"logit position policy must be 'response' or 'text', got {policy!r}")


def text_focus(attn: Tensor, row_mask: Tensor | None = None) -> Tensor:
    """focus[j] = sum_i mean_h A[h, i, j] over the text query rows i.

    Per-sample cache layout: attn [T, H, N_v] (every row valid) -> [N_v].
    Batched model layout: attn [B, H, T, N_v] with row_mask [B, T] -> [B, N_v].
    """
    if attn.dim() == 3:
        return attn.float().mean(1).sum(0)
    if attn.dim() == 4 and row_mask is not None:
        per_row = attn.float().mean(1)  # [B, T, N_v]
        return torch.where(row_mask.bool()[..., None], per_row, 0.0).sum(1)
    raise ValueError(f"text_focus takes [T, H, N_v] or [B, H, T, N_v] + row_mask, got {tuple(attn.shape)}")


def sample_seed(seed: int, sample_id: str) -> int:
    """A per-sample RNG seed, so sampled logits do not depend on batching or resume."""
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
