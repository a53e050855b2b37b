"""The Align-KD objective: the student plus its two adapters, summing the enabled loss terms.

`AlignKDObjective` is the `nn.Module` the trainer optimises. Keeping the adapters on
the module (not on the trainer, as the official code does) is what makes them train;
`adapters="frozen"` reproduces the official behaviour for the ablation. The terms are
the components of `alignkd.distill.terms` (one table); this module only runs the student
once and sums the terms whose weight is positive.

Two loss scales (docs/method.md); `alignkd distill`'s default is `DistillConfig.loss_scale`,
and a caller of this class names one:
- `normalized`: every term is in units that do not depend on the teacher's
  feature scale. L_vis maps the student's tokens to the teacher's width and regresses
  the teacher's tokens standardised per channel (a fixed target); L_attn is the
  row-normalised KL over the vision columns (nats, like CE and L_logit).
- `paper`: the paper's exact forms, mse(P F_T, F_S) and the MSE on attention
  probabilities, whose scales are the teacher's feature scale and ~1/L^2.
"""

from __future__ import annotations

import torch
from torch import nn

from alignkd.distill.terms import LOSS_TERMS, LossWeights, resolve_attn_loss

LOSS_SCALES = ("normalized", "paper")
ATTN_LOSSES = ("auto", "mse", "kl")


class AlignKDObjective(nn.Module):
    def __init__(self, student: nn.Module, *, teacher_heads: int, teacher_dim: int, weights: LossWeights,
                 logit_mode: str, logit_samples: int, loss_scale: str, temperature: float = 1.0,
                 vision_topk: int | None = None, attn_loss: str = "auto", adapters: str = "trainable",
                 vision_stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        from alignkd.distill.losses import HeadAdapter, ProjectorAdapter, StudentToTeacherAdapter

        super().__init__()
        if loss_scale not in LOSS_SCALES:
            raise ValueError(f"loss_scale must be one of {LOSS_SCALES}, got {loss_scale!r}")
        if attn_loss not in ATTN_LOSSES:
            raise ValueError(f"attn_loss must be one of {ATTN_LOSSES}, got {attn_loss!r}")
        attn_loss = resolve_attn_loss(attn_loss, loss_scale)
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
        self.weights = weights  # read each step: a caller may swap them between steps
        self.logit_mode = logit_mode
        self.logit_samples = logit_samples
        self.temperature = temperature
        self.vision_topk = vision_topk
        self.attn_loss = attn_loss
        self.loss_scale = loss_scale
        # A cache built with --attn-store layer0 stores no attention rows: `layer0_kit(device)` returns
        # its teacher's layer-0 kit there (loaded once per process), and each step that computes the
        # attention term recomputes the batch's rows with it. A plain attribute, not a submodule: the
        # kit is the teacher's, never trained.
        self.layer0_kit = None
        # Every term of the table is built (cheap, no parameters of its own) so that weights swapped
        # later find it; only the enabled ones run. A plain dict: the adapters are registered above.
        self.terms = {name: spec.term.from_objective(self) for name, spec in LOSS_TERMS.items()}

    # Our loss is a per-batch mean; this stops the HF Trainer from rescaling it by a
    # token count it would pass as `num_items_in_batch`.
    accepts_loss_kwargs = False

    # Set by the trainer on the steps where each term's gradient share is logged.
    measure_grad_shares = False

    def forward(self, **batch) -> dict:
        from alignkd.distill.dataset import widen_targets
        from alignkd.models import capture_forward

        enabled = self.weights.enabled()
        # cached targets arrive in their stored width; those only disabled terms read are never widened
        batch = widen_targets(drop_unread_targets(batch, [self.terms[name] for name in enabled]))
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
        from alignkd.storage_schemas import TOKEN_INPUT_COLUMNS

        if self.layer0_kit is None:
            raise RuntimeError("the batch carries no teacher attention rows and no layer-0 kit was given")
        kit = self.layer0_kit(batch["input_ids"].device)
        columns = {k: batch.get(k) for k in TOKEN_INPUT_COLUMNS}
        columns["image_grid_thw"] = batch.get("t_image_grid_thw")
        inputs = kit_inputs(batch["input_ids"], batch["attention_mask"], columns)
        return kit.text_vision_rows(inputs, batch["t_vision"], batch["t_text_positions"])

    def gradient_shares(self, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each weighted term's gradient norm on the student's trainable parameters, as a
        share of their sum: the measure of whether one term swamps the others."""
        from alignkd.distill.fidelity import per_term_gradients

        params = [p for p in self.student.parameters() if p.requires_grad]
        weighted = {name: getattr(self.weights, name) * value for name, value in terms.items()}
        norms = {}
        for name, grads in per_term_gradients(weighted, params, keep_graph=True).items():
            squares = [g.float().pow(2).sum() for g in grads if g is not None]
            # a term that reaches no student parameter (all None) has norm 0, not a crash
            norms[name] = torch.stack(squares).sum().sqrt() if squares else terms[name].new_zeros(()).float()
        total = sum(norms.values()) + 1e-30
        return {name: (norm / total).detach() for name, norm in norms.items()}

    def loss_terms(self, cap, batch: dict) -> dict[str, torch.Tensor]:
        """Every enabled term (weight > 0) from a student capture and the teacher targets, in table order."""
        return {name: self.terms[name](cap, batch) for name in self.weights.enabled()}


def drop_unread_targets(batch: dict, terms: list) -> dict:
    """The batch without the teacher targets (`t_*` keys) that none of `terms` reads."""
    reads = tuple(prefix for term in terms for prefix in term.reads)
    return {k: v for k, v in batch.items() if not k.startswith("t_") or k.startswith(reads)}
