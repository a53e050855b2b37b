"""The four Align-KD loss terms, each a small function with a narrow signature.

Every term accepts padded batches and takes its validity from masks, never from
equal lengths (the official code's batch-size-1 limitation, docs/method.md, "Where alignkd differs", 5).

Position convention (shared with the cache builder through `alignkd.targets.select_positions`):
logits at position t are the distribution of token t+1. Labels are unshifted, as in
transformers: `labels[t]` is the target for `logits[t-1]`. A cached sparse target
row belongs to a "logit position" t, so the trainer gathers `student_logits[b, t]`
for the same t. Policies:
- `response`: positions t with `labels[t+1] != -100` (the CE positions).
- `text`: text positions after the image (`text_query_mask[t]`) whose next token
  exists and is not padding.

Temperature convention: the logit losses take q = softmax(z_s / tau) and are
multiplied by tau^2 (Hinton et al.), so the gradient scale does not shrink as tau
grows and the weights w_logit stay comparable across temperatures. The cache holds the
teacher at tau = 1; `temper_topk_target` takes a top-k target to tau (sampled targets cannot
be re-tempered, and `distill` refuses tau != 1 on them).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from alignkd.targets import IGNORE_INDEX

_MASKED = -1e30  # "minus infinity" that keeps logsumexp gradients finite
_EPS = 1e-8  # floor for attention rows in the KL variant


def _valid_mean(per_row: Tensor, valid: Tensor) -> Tensor:
    """Mean of per_row over valid rows; 0 (still on the graph) when none are valid."""
    per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
    return per_row.sum() / valid.sum().clamp(min=1)


def sparse_kl_topk(
    student_logits: Tensor, ids: Tensor, teacher_logp: Tensor, tail: Tensor, temperature: float = 1.0
) -> Tensor:
    """(k+1)-bucket forward KL: sum_S p (log p - log q) + r_p (log r_p - log r_q).

    student_logits [N, V]; ids [N, K] (-1 = padding); teacher_logp [N, K] full-vocab
    teacher log-probs (not renormalised); tail [N] = r_p. log r_q is the logsumexp of
    the student's log-probs outside S, exact even when r_q is tiny; a bucket with
    r_p = 0 contributes 0. Rows whose ids are all padding are excluded from the mean.
    """
    logq = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    valid = ids >= 0
    safe = ids.clamp(min=0)
    in_s = torch.zeros_like(logq).scatter_add_(1, safe, valid.float()) > 0
    log_rq = torch.logsumexp(logq.masked_fill(in_s, _MASKED), dim=-1)
    logp = teacher_logp.float()
    head = torch.where(valid, logp.exp() * (logp - logq.gather(1, safe)), 0.0).sum(-1)
    r_p = tail.float()
    tail_term = torch.where(r_p > 0, r_p * (r_p.clamp(min=1e-30).log() - log_rq), 0.0)
    return _valid_mean(head + tail_term, valid.any(-1)) * temperature**2


def temper_topk_target(teacher_logp: Tensor, ids: Tensor, tail: Tensor, temperature: float,
                       vocab_size: int) -> tuple[Tensor, Tensor]:
    """A top-k target stored at temperature 1 (what `cache build` writes) taken to temperature tau:
    p_i^(1/tau), renormalised. Returns (log-probs of S, tail mass), the inputs `sparse_kl_topk`
    expects at tau.

    The tail's tokens are not stored, so their tempered mass is computed as if the tail mass were
    spread evenly over the vocabulary's other V - |S| tokens: exact at tau = 1 or for an empty
    tail, and an upper bound on it for tau > 1 (x^(1/tau) is concave).
    """
    teacher_logp = teacher_logp.float()  # stored as float16 by default: -1e30 would overflow it
    valid = ids >= 0
    scaled = torch.where(valid, teacher_logp / temperature, torch.full_like(teacher_logp, _MASKED))
    rest = (vocab_size - valid.sum(-1)).clamp(min=1).float()
    r = tail.float().clamp(min=0)
    log_tail = torch.where(r > 0, rest.log() + (r.clamp(min=1e-30).log() - rest.log()) / temperature,
                           torch.full_like(r, _MASKED))
    log_z = torch.logsumexp(torch.cat([scaled, log_tail[:, None]], dim=-1), dim=-1, keepdim=True)
    return torch.where(valid, scaled - log_z, teacher_logp), (log_tail - log_z[:, 0]).exp()


def sparse_kl_sampled(
    student_logits: Tensor, ids: Tensor, counts: Tensor, n: int | Tensor, temperature: float = 1.0
) -> Tensor:
    """RS-KD loss -sum_i (c_i / n) log q_i, an unbiased estimate of CE(p, q).

    Its expectation is KL(p || q) + H(p); H(p) has no gradient, so the gradient is an
    unbiased estimate of the dense KL gradient. n is an int or a per-row [N] tensor.
    Padding has id -1 and count 0; rows with no draws are excluded from the mean.
    """
    logq = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    valid = ids >= 0
    w = torch.where(valid, counts.float(), 0.0)
    n_rows = torch.as_tensor(n, dtype=logq.dtype, device=logq.device).expand(w.shape[0])
    per_row = -(w * logq.gather(1, ids.clamp(min=0))).sum(-1) / n_rows.clamp(min=1)
    return _valid_mean(per_row, w.sum(-1) > 0) * temperature**2


def dense_kl(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, mask: Tensor | None = None
) -> Tensor:
    """Reference forward KL(p || q) over the full vocabulary, mean over (masked) rows, x tau^2."""
    logq = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    logp = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_row = (logp.exp() * (logp - logq)).sum(-1)
    valid = torch.ones_like(per_row, dtype=torch.bool) if mask is None else mask.bool()
    return _valid_mean(per_row, valid) * temperature**2


def ce_loss(student_logits: Tensor, labels: Tensor) -> Tensor:
    """Shifted next-token CE: logits[:, t] against labels[:, t+1], ignoring -100.

    Only the labelled rows are gathered and widened to fp32: at a 32k vocabulary the
    full [B, L, V] logits in fp32 would be the largest tensor of the step.
    """
    target = labels[:, 1:]
    valid = target != IGNORE_INDEX
    if not valid.any():
        return student_logits.sum() * 0.0
    logits = student_logits[:, :-1][valid].float()
    return torch.nn.functional.cross_entropy(logits, target[valid])


class HeadAdapter(nn.Module):
    """W_h: teacher heads -> student heads plus a bias, over the head axis.

    Same map as the official 1x1 Conv2d(H_t, H_s) on [B, H, T, N_v]. Initialised
    as interval averaging: student head s averages the teacher heads covering
    [s*H_t/H_s, (s+1)*H_t/H_s), weighted by overlap (plain group averaging when H_s
    divides H_t, copying when H_t divides H_s), bias 0. Rows sum to 1, so the
    adapter starts by mapping attention probabilities to attention probabilities
    instead of a random mix (the official adapters never leave their random init).
    """

    def __init__(self, teacher_heads: int, student_heads: int):
        super().__init__()
        edges = torch.arange(student_heads + 1, dtype=torch.float64) * teacher_heads / student_heads
        lo, hi = edges[:-1, None], edges[1:, None]
        t = torch.arange(teacher_heads, dtype=torch.float64)[None]
        overlap = (torch.minimum(hi, t + 1) - torch.maximum(lo, t)).clamp(min=0)
        self.weight = nn.Parameter((overlap / overlap.sum(1, keepdim=True)).float())
        self.bias = nn.Parameter(torch.zeros(student_heads))

    def forward(self, attn: Tensor) -> Tensor:
        """[B, H_t, T, N_v] -> [B, H_s, T, N_v]."""
        return torch.einsum("st,btij->bsij", self.weight, attn) + self.bias[:, None, None]

    def mix(self, attn: Tensor) -> Tensor:
        """A convex mixture of teacher heads (weights clamped at 0, rows renormalised, no bias).

        Used by the KL loss: a mixture of attention rows is still an attention row, so no
        clamp or floor is needed; the affine `forward` lets the bias push entries below 0,
        and the floor then turns into gradients of ~1e5 on the bias at initialisation.
        """
        w = self.weight.clamp(min=0)
        w = w / w.sum(1, keepdim=True).clamp(min=1e-12)
        return torch.einsum("st,btij->bsij", w, attn)


class ProjectorAdapter(nn.Module):
    """P: teacher vision-token width d_t -> student width d_s (nn.Linear's default init)."""

    def __init__(self, teacher_dim: int, student_dim: int):
        super().__init__()
        self.proj = nn.Linear(teacher_dim, student_dim)

    def forward(self, feats: Tensor) -> Tensor:
        return self.proj(feats)


class StudentToTeacherAdapter(nn.Module):
    """A for the normalized L_vis: student vision-token width d_s -> teacher width d_t.

    It maps the *student's* tokens, so the regression target (the teacher's tokens) is
    fixed and the loss cannot fall by shrinking both sides. The teacher tokens'
    per-channel mean and std (measured on the cache before training, see
    `distill.vision_stats`) are buffers, so checkpoints and exports carry the exact
    standardisation the run used.
    """

    def __init__(self, student_dim: int, teacher_dim: int, mean: Tensor | None = None, std: Tensor | None = None):
        super().__init__()
        self.proj = nn.Linear(student_dim, teacher_dim)
        self.register_buffer("mean", torch.zeros(teacher_dim) if mean is None else mean.float().clone())
        self.register_buffer("std", torch.ones(teacher_dim) if std is None else std.float().clone())

    def forward(self, student_feats: Tensor) -> Tensor:
        return self.proj(student_feats)

    def standardise(self, teacher_feats: Tensor) -> Tensor:
        return (teacher_feats - self.mean) / self.std


def attention_loss(
    student_attn: Tensor,
    teacher_attn: Tensor,
    row_mask: Tensor,
    head_adapter: nn.Module | None,
    mode: str = "mse",
    vision_mask: Tensor | None = None,
) -> Tensor:
    """L_attn between first-layer text-query x vision-key attention maps.

    student_attn [B, H_s, T, N_v], teacher_attn [B, H_t, T, N_v], row_mask [B, T]
    marks real text query rows. head_adapter None means identity (H_t == H_s).
    mse: mean((W_h A_T - A_S)^2) over (head, valid row, vision column), the paper's form.
    kl: the teacher heads are mixed convexly (`HeadAdapter.mix`, no bias), both rows are
    renormalised over the vision columns, then KL(teacher || student) is averaged over
    heads and valid rows, each row weighted by the teacher's vision mass (mean weight 1);
    both sides get an eps floor so an all-zero row becomes uniform instead of NaN. Padded rows are
    selected out with `where`, so their contents (even NaN) never reach the loss.
    vision_mask [B, N_v] marks each sample's real vision columns when N_v varies per sample;
    padded columns are left out of every sum, mean and renormalisation the same way.
    """
    if head_adapter is None:
        target = teacher_attn
    else:
        target = head_adapter.mix(teacher_attn.float()) if mode == "kl" else head_adapter(teacher_attn.float())
    if target.shape != student_attn.shape:
        raise ValueError(
            f"attention_loss: adapted teacher {tuple(target.shape)} != student {tuple(student_attn.shape)}"
        )
    B, H, T, Nv = student_attn.shape
    if Nv == 0 or T == 0:  # text-only batch: no rows to distil; 0 that still reaches every parameter
        return (student_attn.sum() + target.sum()) * 0.0
    cols = torch.ones(B, Nv, dtype=torch.bool, device=student_attn.device) if vision_mask is None \
        else vision_mask.bool()
    rows = row_mask.bool()[:, None, :, None].expand_as(student_attn)
    entries = rows & cols[:, None, None, :]
    s = torch.where(entries, student_attn.float(), 0.0)
    t = torch.where(entries, target.float(), 0.0)
    n_rows = row_mask.bool().sum().clamp(min=1)
    if mode == "mse":
        n_entries = (row_mask.bool().sum(1) * cols.sum(1)).sum().clamp(min=1)
        return ((t - s) ** 2).sum() / (n_entries * H)
    if mode == "kl":
        t = torch.where(entries, t.clamp(min=0) + _EPS, 0.0)
        s = torch.where(entries, s.clamp(min=0) + _EPS, 1.0)
        # Rows whose query barely looks at the image carry little of the alignment and,
        # renormalised, amplify their gradient by 1/mass; weighting each row by the
        # teacher's vision mass (normalised to mean 1 over the valid rows) bounds both.
        mass = torch.where(rows[..., 0], t.sum(-1), 0.0)  # [B, H, T]
        weight = mass / (mass.sum() / (n_rows * H)).clamp(min=_EPS)
        t = t / t.sum(-1, keepdim=True).clamp(min=_EPS)
        s = s / torch.where(entries, s, 0.0).sum(-1, keepdim=True).clamp(min=_EPS)
        per_row = torch.where(entries, t * (t.clamp(min=_EPS).log() - s.log()), 0.0).sum(-1)  # [B, H, T]
        per_row = torch.where(rows[..., 0], per_row * weight.detach(), 0.0)
        return per_row.sum() / (n_rows * H)
    raise ValueError(f"attention loss mode must be 'mse' or 'kl', got {mode!r}")


def vision_loss(
    student_vis: Tensor,
    teacher_vis: Tensor,
    focus: Tensor,
    projector_adapter: nn.Module | None,
    topk: int = 16,
    valid: Tensor | None = None,
    vision_mask: Tensor | None = None,
) -> Tensor:
    """The paper's L_vis = mse(P F_T, F_S) over all N_v tokens + mse over the top-k focus tokens.

    student_vis [B, N_v, d_s], teacher_vis [B, N_v, d_t], focus [B, N_v]; the top-k
    tokens thus count twice. k clamps to N_v. valid [B] drops samples (e.g. padding
    samples) from both means, as do samples without vision tokens (text only). Its scale is the teacher features' scale,
    and both sides can shrink together; `normalized_vision_loss` is the default.
    vision_mask [B, N_v] marks each sample's real tokens when N_v varies per sample: each
    sample's means run over its own N_v_b tokens and its own k = min(topk, N_v_b) (topk may
    also be a per-sample [B] tensor), so a padded batch equals its samples' losses.
    """
    target = teacher_vis.float() if projector_adapter is None else projector_adapter(teacher_vis.float())
    return _token_mse_with_topk(student_vis.float(), target, focus, topk, valid, vision_mask)


def normalized_vision_loss(
    student_vis: Tensor,
    teacher_vis: Tensor,
    focus: Tensor,
    adapter: StudentToTeacherAdapter,
    topk: int = 16,
    valid: Tensor | None = None,
    vision_mask: Tensor | None = None,
) -> Tensor:
    """Scale-free L_vis: the student's tokens, mapped to the teacher's width, regress the
    teacher's tokens standardised per channel (all tokens, plus the top-k focus tokens again).

    The target has unit variance per channel whatever the teacher's feature scale, so
    each MSE reads ~1 when the prediction is the channel mean and 0 at agreement. It
    asks the student's tokens to *contain* what the teacher's tokens encode (a linear
    read-out recovers them), the direction FitNets uses; on the demo world this trained
    far better than the paper's direction, which asks the student's tokens to equal a
    map of the teacher's (docs/demo-notes.md). vision_mask as in `vision_loss`.
    """
    return _token_mse_with_topk(adapter(student_vis.float()), adapter.standardise(teacher_vis.float()), focus,
                                topk, valid, vision_mask)


def _token_mse_with_topk(pred: Tensor, target: Tensor, focus: Tensor, topk: int | Tensor, valid: Tensor | None,
                         vision_mask: Tensor | None = None) -> Tensor:
    B, Nv, _ = pred.shape
    ok = torch.ones(B, dtype=torch.bool, device=pred.device) if valid is None else valid.bool()
    real = torch.ones(B, Nv, dtype=torch.bool, device=pred.device) if vision_mask is None else vision_mask.bool()
    ok = ok & real.any(-1)  # a text-only sample has no vision tokens and takes no part in either mean
    sq = torch.where(real, ((target - pred) ** 2).mean(-1), 0.0)  # [B, N_v]
    k_b = torch.as_tensor(topk, device=pred.device).expand(B).clamp(max=Nv)
    k_b = torch.minimum(k_b, real.sum(-1))  # [B], each sample's own k
    k = int(k_b.max()) if B else 0
    top = focus.float().masked_fill(~real, float("-inf")).topk(k, dim=-1).indices
    slot_ok = torch.arange(k, device=pred.device)[None] < k_b[:, None]
    every = _valid_mean(sq.sum(-1) / real.sum(-1).clamp(min=1), ok)
    chosen = _valid_mean(torch.where(slot_ok, sq.gather(1, top), 0.0).sum(-1) / k_b.clamp(min=1), ok)
    return every + chosen


def default_vision_topk(num_vision_tokens: int | Tensor) -> int | Tensor:
    """The paper's share of focus tokens: k = 16 of 144 (MobileVLM V2), i.e. N_v / 9, at least 1.

    A fixed 16 selects every token of a 9-token image (so they all just count twice).
    Given per-sample counts [B] (N_v varies per sample) it returns each sample's k."""
    if isinstance(num_vision_tokens, Tensor):
        return torch.round(num_vision_tokens.double() * 16 / 144).long().clamp(min=1)
    return max(1, round(num_vision_tokens * 16 / 144))
