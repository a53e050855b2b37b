"""The Align-KD objective: the student plus its two adapters, returning every loss term.

`AlignKDObjective` is the `nn.Module` the trainer optimises. Keeping the adapters on
the module (not on the trainer, as the official code does) is what makes them train;
`adapters="frozen"` reproduces the official behaviour for the ablation.

Two loss scales (docs/method.md):
- `normalized` (this class's default; `alignkd distill` defaults to `paper`, see
  docs/efficacy.md): every term is in units that do not depend on the teacher's
  feature scale. L_vis maps the student's tokens to the teacher's width and regresses
  the teacher's tokens standardised per channel (a fixed target); L_attn is the
  row-normalised KL over the vision columns (nats, like CE and L_logit).
- `paper` (`alignkd distill`'s default): the paper's exact forms, mse(P F_T, F_S) and
  the MSE on attention probabilities, whose scales are the teacher's feature scale and
  ~1/L^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

TERMS = ("ce", "logit", "vis", "attn")
LOSS_SCALES = ("normalized", "paper")


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
                 logit_mode: str, logit_samples: int, temperature: float = 1.0, vision_topk: int | None = None,
                 attn_loss: str = "kl", adapters: str = "trainable", loss_scale: str = "normalized",
                 vision_stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        from alignkd.distill.losses import HeadAdapter, ProjectorAdapter, StudentToTeacherAdapter

        super().__init__()
        if loss_scale not in LOSS_SCALES:
            raise ValueError(f"loss_scale must be one of {LOSS_SCALES}, got {loss_scale!r}")
        self.student = student
        text = student.config.get_text_config()
        self.head_adapter = HeadAdapter(teacher_heads, text.num_attention_heads)
        if loss_scale == "normalized":
            mean, std = vision_stats if vision_stats is not None else (None, None)
            self.projector_adapter = StudentToTeacherAdapter(text.hidden_size, teacher_dim, mean, std)
        else:
            self.projector_adapter = ProjectorAdapter(teacher_dim, text.hidden_size)
        if adapters == "frozen":
            for p in [*self.head_adapter.parameters(), *self.projector_adapter.parameters()]:
                p.requires_grad_(False)
        if attn_loss == "kl":
            # The KL mixes teacher heads convexly (`HeadAdapter.mix`) and never reads the
            # bias; a parameter that gets no gradient would stall DDP's reducer.
            self.head_adapter.bias.requires_grad_(False)
        self.weights = weights
        self.logit_mode = logit_mode
        self.logit_samples = logit_samples
        self.temperature = temperature
        self.vision_topk = vision_topk
        self.attn_loss = attn_loss
        self.loss_scale = loss_scale
        # A cache built with --attn-store layer0 stores no attention rows: `layer0_kit(device)` returns
        # its teacher's layer-0 kit there (loaded once per process), and each step recomputes the
        # batch's rows with it. A plain attribute, not a submodule: the kit is the teacher's, never trained.
        self.layer0_kit = None

    # Our loss is a per-batch mean; this stops the HF Trainer from rescaling it by a
    # token count it would pass as `num_items_in_batch`.
    accepts_loss_kwargs = False

    # Set by the trainer on the steps where each term's gradient share is logged.
    measure_grad_shares = False

    def forward(self, **batch) -> dict:
        from alignkd.distill.dataset import widen_targets
        from alignkd.models import capture_forward

        batch = widen_targets(batch)  # cached targets arrive in their stored width
        if self.weights.attn > 0 and "t_attn" not in batch:
            batch["t_attn"] = self.teacher_rows(batch)
        model_inputs = {k: v for k, v in batch.items() if not k.startswith("t_") and k != "labels"}
        cap = capture_forward(self.student, model_inputs, keep_graph=True)
        terms = self.loss_terms(cap, batch)
        total = sum(getattr(self.weights, name) * value for name, value in terms.items())
        out = {"loss": total, **{f"loss_{k}": v.detach() for k, v in terms.items()}}
        if self.measure_grad_shares and self.training:
            out.update({f"gshare_{k}": v for k, v in self.gradient_shares(terms).items()})
        return out

    def teacher_rows(self, batch: dict) -> torch.Tensor:
        """[B, T, H, Nv] teacher rows of a layer0 cache's batch: one layer-0 forward of the kit on
        the batch's device, under no_grad, from the teacher's ids, columns and vision tokens."""
        from alignkd.cache.layer0_store import kit_inputs

        if self.layer0_kit is None:
            raise RuntimeError("the batch carries no teacher attention rows and no layer-0 kit was given")
        kit = self.layer0_kit(batch["input_ids"].device)
        columns = {k: batch.get(k) for k in ("token_type_ids", "mm_token_type_ids")}
        columns["image_grid_thw"] = batch.get("t_image_grid_thw")
        inputs = kit_inputs(batch["input_ids"], batch["attention_mask"], columns)
        return kit.text_vision_rows(inputs, batch["t_vision"], batch["t_text_positions"])

    def gradient_shares(self, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each weighted term's gradient norm on the student's trainable parameters, as a
        share of their sum: the measure of whether one term swamps the others."""
        params = [p for p in self.student.parameters() if p.requires_grad]
        norms = {}
        for name, value in terms.items():
            grads = torch.autograd.grad(getattr(self.weights, name) * value, params, retain_graph=True,
                                        allow_unused=True)
            squares = [g.float().pow(2).sum() for g in grads if g is not None]
            # a term that reaches no student parameter (all None) has norm 0, not a crash
            norms[name] = torch.stack(squares).sum().sqrt() if squares else value.new_zeros(()).float()
        total = sum(norms.values()) + 1e-30
        return {name: (norm / total).detach() for name, norm in norms.items()}

    def loss_terms(self, cap, batch: dict) -> dict[str, torch.Tensor]:
        """Every enabled term from a student capture and the cached teacher targets."""
        from alignkd.distill.losses import (ce_loss, default_vision_topk, normalized_vision_loss, sparse_kl_sampled,
                                            sparse_kl_topk, temper_topk_target, vision_loss)

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
                tail = batch["t_logit_tail"][rows, cols]
                if self.temperature != 1.0:  # the cache holds the teacher at temperature 1
                    values, tail = temper_topk_target(values, ids, tail, self.temperature, logits.shape[-1])
                terms["logit"] = sparse_kl_topk(logits, ids, values, tail, self.temperature)
            else:
                terms["logit"] = sparse_kl_sampled(logits, ids, values, self.logit_samples, self.temperature)
        if w.vis > 0:
            vis_loss = normalized_vision_loss if self.loss_scale == "normalized" else vision_loss
            mask = batch.get("t_vision_mask")
            topk = self.vision_topk or default_vision_topk(batch["t_vision"].shape[1] if mask is None else mask.sum(1))
            terms["vis"] = vis_loss(cap.vision_tokens.float(), batch["t_vision"], batch["t_focus"],
                                    self.projector_adapter, topk=topk, vision_mask=mask)
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
