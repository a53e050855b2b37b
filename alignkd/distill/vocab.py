"""Distil over the ids both heads share when teacher and student differ only in padding rows.

Qwen2.5-VL-7B pads its embedding to 152,064 rows and the 3B to 151,936, with one
tokenizer. The tokenizer's ids are below both widths, so the only teacher ids the student
has no row for are padding rows the teacher almost never ranks; `restrict_logits` drops
them from the cached targets. A real tokenizer mismatch is refused before this
(`alignkd.distill.checks.check_vocabulary`).
"""

from __future__ import annotations

import torch


def restrict_logits(ids: torch.Tensor, values: torch.Tensor, tail: torch.Tensor,
                    vocab_size: int, logit_mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop the cached logit entries with id >= vocab_size. ids [P, K] (-1 = padding).

    Top-k rows hold teacher log-probs: a dropped entry's probability moves into the tail
    bucket, so the row still sums to the teacher's full mass. Sampled rows hold counts: a
    dropped draw simply goes (the estimate stays unbiased over the shared ids, up to that
    draw's share of n). Either way the table is left-packed again.
    """
    outside = ids >= vocab_size
    if not bool(outside.any()):
        return ids, values, tail
    if logit_mode == "topk":  # values are log-probs
        tail = tail + torch.where(outside, values.exp(), 0.0).sum(-1)
    keep = (ids >= 0) & ~outside
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    ids = torch.where(keep, ids, -1).gather(1, order)
    values = torch.where(keep, values, 0.0).gather(1, order)
    return ids, values, tail
