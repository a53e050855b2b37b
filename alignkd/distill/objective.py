"""The Align-KD objective: the student plus its two adapters, returning every loss term.

`AlignKDObjective` is the `nn.Module` the trainer optimises. Keeping the adapters on
the module (not on the trainer, as the official code does) is what makes them train;
`adapters="frozen"` reproduces the official behaviour for the ablation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

TERMS = ("ce", "logit", "vis", "attn")


@dataclass(frozen=True)
class LossWeights:
    ce: float = 1.0
    logit: float = 1.0
    vis: float = 1.0
    attn: float = 1.0

    def enabled(self) -> tuple[str, ...]:
        return tuple(t for t in TERMS if getattr(self, t) > 0)


class AlignKDObjective(nn.Module):
    def __init__(self, student: nn.Module, *, teacher_heads: int, teacher_dim: int, weights: LossWeights,
                 logit_mode: str, logit_samples: int, temperature: float = 1.0, vision_topk: int = 16,
                 attn_loss: str = "mse", adapters: str = "trainable") -> None:
        from alignkd.distill.losses import HeadAdapter, ProjectorAdapter

        super().__init__()
        self.student = student
        text = student.config.get_text_config()
        self.head_adapter = HeadAdapter(teacher_heads, text.num_attention_heads)
        self.projector_adapter = ProjectorAdapter(teacher_dim, text.hidden_size)
        if adapters == "frozen":
            for p in [*self.head_adapter.parameters(), *self.projector_adapter.parameters()]:
                p.requires_grad_(False)
        self.weights = weights
        self.logit_mode = logit_mode
        self.logit_samples = logit_samples
        self.temperature = temperature
        self.vision_topk = vision_topk
        self.attn_loss = attn_loss

    # Our loss is a per-batch mean; this stops the HF Trainer from rescaling it by a
    # token count it would pass as `num_items_in_batch`.
    accepts_loss_kwargs = False

    def forward(self, **batch) -> dict:
        from alignkd.models import capture_forward

        model_inputs = {k: v for k, v in batch.items() if not k.startswith("t_") and k != "labels"}
        cap = capture_forward(self.student, model_inputs, keep_graph=True)
        terms = self.loss_terms(cap, batch)
        total = sum(getattr(self.weights, name) * value for name, value in terms.items())
        return {"loss": total, **{f"loss_{k}": v.detach() for k, v in terms.items()}}

    def loss_terms(self, cap, batch: dict) -> dict[str, torch.Tensor]:
        """Every enabled term from a student capture and the cached teacher targets."""
        from alignkd.distill.losses import (attention_loss, ce_loss, sparse_kl_sampled, sparse_kl_topk,
                                            vision_loss)

        terms: dict[str, torch.Tensor] = {}
        w = self.weights
        if w.ce > 0:
            terms["ce"] = ce_loss(cap.logits, batch["labels"])
        if w.logit > 0:
            rows, cols = _valid_index(batch["t_logit_positions"])
            logits = cap.logits[rows, batch["t_logit_positions"][rows, cols]].float()
            ids = batch["t_logit_ids"][rows, cols]
            values = batch["t_logit_values"][rows, cols]
            if self.logit_mode == "topk":
                terms["logit"] = sparse_kl_topk(logits, ids, values, batch["t_logit_tail"][rows, cols],
                                                self.temperature)
            else:
                terms["logit"] = sparse_kl_sampled(logits, ids, values, self.logit_samples, self.temperature)
        if w.vis > 0:
            terms["vis"] = vision_loss(cap.vision_tokens.float(), batch["t_vision"], batch["t_focus"],
                                       self.projector_adapter, topk=self.vision_topk,
                                       vision_mask=batch.get("t_vision_mask"))
        if w.attn > 0:
            terms["attn"] = self._attention_term(cap, batch)
        return terms

    def _attention_term(self, cap, batch: dict) -> torch.Tensor:
        from alignkd.distill.losses import attention_loss

        positions = batch["t_text_positions"]                      # [B, T], -1 = padding
        row_mask = positions >= 0
        gather = positions.clamp(min=0)                            # [B, T]
        student = cap.attn_text_vision                             # [B, Hs, L, Nv]
        idx = gather[:, None, :, None].expand(-1, student.shape[1], -1, student.shape[-1])
        student_rows = student.gather(2, idx).float()              # [B, Hs, T, Nv]
        teacher_rows = batch["t_attn"].permute(0, 2, 1, 3)         # [B, Ht, T, Nv]
        return attention_loss(student_rows, teacher_rows, row_mask, self.head_adapter, mode=self.attn_loss,
                              vision_mask=batch.get("t_vision_mask"))


def _valid_index(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, slot) indices of the real entries of a -1-padded position table."""
    rows, cols = (positions >= 0).nonzero(as_tuple=True)
    return rows, cols
