"""A 1.4B-shaped student stand-in for judging stored targets by the gradient they give, at 7B shapes.

A real 1.4B student cannot run a backward pass per storage choice on a 2-core box, so the
student's *outputs* are the trainable parameters here, shaped like MobileLLaMA-1.4B's
(16 heads, d = 2048, vocabulary 32000): per sample, hidden states H [L, 256] times a shared
unembedding E [32000, 256] give the logits; vision tokens [Nv, 2048] and layer-0 attention
[16, L, Nv] are parameters too. The objective is the real `AlignKDObjective.loss_terms`
with its real adapters (teacher 32 heads / d 4096 -> student 16 / 2048), so every term,
mask and adapter gradient is the one training computes.

The objective is the `full` preset (alignkd/distill/terms.py: every term, weight 1) on the normalized
scale (`loss_scale="normalized"`: standardised teacher tokens and variance-normalised L_vis, KL
attention; `alignkd distill`'s default is the paper's scale); the MSE attention term is measured
alone too. The key `full` below is that objective's gradient, summed from the preset's weights.

Initial state, "mid training": vision tokens at unit scale (the normalized L_vis regresses
the teacher's standardised tokens from the adapter's image of them); attention = the
adapter-mixed teacher rows times exp(0.5 N(0, 1)); logits near uniform. The residuals the losses see are therefore the size
they have while a student is being trained, not zero and not random.

Gradients are linear in the loss terms, so each term's gradient is computed once per sample
and the full objective's gradient is their weighted sum.

The judge is the *student's* gradient (its parameters only). The adapters' gradient is kept
apart (key suffix `@adapters`): the head adapter's is a sum over every (head, row, column) of
the teacher's own rows, so storage noise on small probabilities moves it far more than it
moves the student's, while it trains a 512-parameter mixing that averages over the data.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from alignkd.distill.dataset import collate_distill, item_from_record, widen_targets
from alignkd.distill.fidelity import flatten, per_term_gradients
from alignkd.distill.objective import AlignKDObjective, LossWeights
from alignkd.distill.terms import AttentionAlignment, preset_weights, resolve_attn_loss

PRESET, LOSS_SCALE = "full", "normalized"

STUDENT_HEADS, STUDENT_DIM, HIDDEN = 16, 2048, 256


class StandInStudent(nn.Module):
    def __init__(self, records, vocab: int, objective_seed: int = 0) -> None:
        super().__init__()
        self.config = SimpleNamespace(get_text_config=lambda: SimpleNamespace(
            num_attention_heads=STUDENT_HEADS, hidden_size=STUDENT_DIM))
        g = torch.Generator().manual_seed(objective_seed)
        self.unembed = nn.Parameter(torch.randn(vocab, HIDDEN, generator=g) * 0.02)
        self.hidden = nn.ParameterList(
            [nn.Parameter(torch.randn(len(r.input_ids), HIDDEN, generator=g)) for r in records])
        self.vision = nn.ParameterList()
        self.attn_logits = nn.ParameterList()
        self._records = records

    def init_from_teacher(self, objective: AlignKDObjective, seed: int = 1) -> None:
        """Mid-training outputs: the adapters' image of the fp32 teacher plus noise."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for r in self._records:
                # the normalized L_vis maps the *student's* tokens to the teacher's standardised
                # ones through the adapter, so unit-scale student tokens are at the right scale
                self.vision.append(nn.Parameter(torch.randn(r.vision.shape[0], STUDENT_DIM, generator=g)))
                mixed = objective.head_adapter.mix(torch.from_numpy(r.attn).permute(1, 0, 2)[None])[0]
                L = len(r.input_ids)
                z = torch.full((STUDENT_HEADS, L, mixed.shape[-1]), -30.0)
                rows = torch.from_numpy(np.asarray(r.text_positions, dtype=np.int64))
                z[:, rows] = mixed.clamp(min=1e-12).log() + 0.5 * torch.randn(mixed.shape, generator=g)
                self.attn_logits.append(nn.Parameter(z))

    def capture(self, j: int) -> SimpleNamespace:
        return SimpleNamespace(logits=(self.hidden[j] @ self.unembed.T)[None],
                               vision_tokens=self.vision[j][None], attn_text_vision=self.attn_logits[j].exp()[None])


def build_objective(records, vocab: int, teacher_heads: int, teacher_dim: int) -> AlignKDObjective:
    """The `full` preset on the normalized scale (KL attention), standardised with the fp32 teacher's
    per-channel statistics as `alignkd distill` computes them from the cache."""
    torch.manual_seed(0)
    student = StandInStudent(records, vocab)
    vis = np.concatenate([r.vision for r in records]).astype(np.float64)
    stats = (torch.from_numpy(vis.mean(0)).float(), torch.from_numpy(vis.std(0)).float())
    objective = AlignKDObjective(student, teacher_heads=teacher_heads, teacher_dim=teacher_dim,
                                 weights=LossWeights(**preset_weights(PRESET)), logit_mode="topk", logit_samples=0,
                                 loss_scale=LOSS_SCALE,
                                 vision_stats=stats)
    student.init_from_teacher(objective)
    return objective


def standin_terms(objective: AlignKDObjective) -> dict:
    """The objective's own terms, with the attention term in both forms (`attn` the MSE, `attn_kl`)."""
    terms = {name: objective.terms[name] for name in ("ce", "logit", "vis")}
    terms["attn"] = AttentionAlignment(objective.head_adapter, "mse")
    terms["attn_kl"] = AttentionAlignment(objective.head_adapter, "kl")
    return terms


def term_gradients(objective: AlignKDObjective, j: int, record) -> dict[str, torch.Tensor]:
    """Each term's flat gradient (all trainable parameters) for sample j with `record`'s targets."""
    batch = widen_targets(collate_distill([item_from_record(record, {})], pad_token_id=0))
    student = {id(p) for p in objective.student.parameters()}
    params = [p for p in objective.parameters() if p.requires_grad]
    own = [p for p in params if id(p) in student]
    adapters = [p for p in params if id(p) not in student]
    losses = {name: term(objective.student.capture(j), batch) for name, term in standin_terms(objective).items()}
    out = {}
    for term, grads in per_term_gradients(losses, params).items():
        by_param = dict(zip(map(id, params), grads))
        out[term] = flatten([by_param[id(p)] for p in own], own)
        out[f"{term}@adapters"] = (flatten([by_param[id(p)] for p in adapters], adapters) if adapters
                                   else torch.zeros(1, dtype=torch.double))
    return out


def summed_gradients(objective, records) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for j, r in enumerate(records):
        for term, g in term_gradients(objective, j, r).items():
            total[term] = total[term] + g if term in total else g
    total[PRESET] = objective_gradient(total, "")
    total[f"{PRESET}@adapters"] = objective_gradient(total, "@adapters")
    return total


def objective_gradient(total: dict, suffix: str) -> torch.Tensor:
    """The preset's objective's gradient (`suffix` "@adapters": the adapters'): gradients are linear
    in the terms, so it is the terms' gradients weighted by the preset, attention in the scale's form."""
    attn = "attn_kl" if resolve_attn_loss("auto", LOSS_SCALE) == "kl" else "attn"
    return sum(w * total[(attn if name == "attn" else name) + suffix]
               for name, w in preset_weights(PRESET).items() if w > 0)


def cosines(stored: dict, reference: dict) -> dict[str, float]:
    return {k: float(torch.nn.functional.cosine_similarity(stored[k], reference[k], dim=0)) for k in reference}
