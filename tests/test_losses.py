"""Align-KD loss terms: hand-written references, padding invariance and gradients."""

from __future__ import annotations

import pytest
import torch

from alignkd.cache.teacher.sparse_logits import encode_topk
from alignkd.distill.losses import (
    HeadAdapter,
    ProjectorAdapter,
    attention_loss,
    ce_loss,
    dense_kl,
    sparse_kl_sampled,
    sparse_kl_topk,
    vision_loss,
)
from alignkd.targets import select_positions, text_focus


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- logit losses -------------------------------------------------------------------


def test_topk_matches_bucket_formula_and_is_not_renormalised():
    # student keeps the teacher's top-k proportions but puts more mass in the tail:
    # a renormalised top-k KL would be exactly 0, the bucket KL is not.
    p = torch.tensor([[0.4, 0.2, 0.1, 0.1, 0.1, 0.1]])
    q = torch.tensor([[0.2, 0.1, 0.175, 0.175, 0.175, 0.175]])
    target = encode_topk(p.log(), k=2)
    loss = sparse_kl_topk(q.log(), target.ids, target.values, target.tail)
    r_p, r_q = 0.4, 0.7
    expected = 0.4 * torch.log(torch.tensor(0.4 / 0.2)) + 0.2 * torch.log(torch.tensor(0.2 / 0.1))
    expected = expected + r_p * torch.log(torch.tensor(r_p / r_q))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    p_s, q_s = p[0, :2] / 0.6, q[0, :2] / 0.3
    renormalised = (p_s * (p_s / q_s).log()).sum()
    assert renormalised.abs() < 1e-6 and loss > 0.1


def test_topk_padding_ids_and_padded_rows_contribute_nothing():
    teacher, student = randn(4, 50, seed=1) * 3, randn(4, 50, seed=2) * 3
    t = encode_topk(teacher, 5)
    base = sparse_kl_topk(student, t.ids, t.values, t.tail)
    ids = torch.cat([t.ids, torch.full((4, 3), -1)], 1)
    vals = torch.cat([t.values, torch.full((4, 3), 7.0)], 1)  # garbage under padding
    torch.testing.assert_close(sparse_kl_topk(student, ids, vals, t.tail), base)
    ids = torch.cat([ids, torch.full((1, 8), -1)])  # an all-padding row: excluded from the mean
    vals = torch.cat([vals, torch.zeros(1, 8)])
    tail = torch.cat([t.tail, torch.zeros(1)])
    student = torch.cat([student, randn(1, 50, seed=3)])
    torch.testing.assert_close(sparse_kl_topk(student, ids, vals, tail), base)


def test_topk_gradient_close_to_dense_for_peaked_distributions():
    teacher = randn(16, 400, seed=4) * 6
    student = (teacher + randn(16, 400, seed=5) * 0.5).requires_grad_()
    t = encode_topk(teacher, 32, temperature=1.0)
    (g_sparse,) = torch.autograd.grad(sparse_kl_topk(student, t.ids, t.values, t.tail), student)
    (g_dense,) = torch.autograd.grad(dense_kl(student, teacher), student)
    cos = torch.nn.functional.cosine_similarity(g_sparse, g_dense, dim=-1)
    assert cos.min() > 0.99
    torch.testing.assert_close(g_sparse, g_dense, atol=2e-3, rtol=0)


def test_topk_temperature_scales_by_tau_squared():
    teacher, student = randn(3, 20, seed=6), randn(3, 20, seed=7)
    t = encode_topk(teacher, 20, temperature=2.0)
    loss = sparse_kl_topk(student, t.ids, t.values, t.tail, temperature=2.0)
    p, logq = torch.softmax(teacher / 2, -1), torch.log_softmax(student / 2, -1)
    expected = 4 * (p * (p.log() - logq)).sum(-1).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_a_temperature_1_cache_is_tempered_exactly_when_the_tail_is_stored_whole():
    """The cache holds temperature-1 targets; distilling at tau re-tempers them. With every token
    of the vocabulary in S (an empty tail) that is exactly the teacher at tau; with a tail it is
    the documented even-spread estimate, which bounds the tempered tail mass from above."""
    from alignkd.distill.losses import temper_topk_target

    teacher, student = randn(3, 20, seed=16), randn(3, 20, seed=17)
    full = encode_topk(teacher, 20, temperature=1.0)
    values, tail = temper_topk_target(full.values, full.ids, full.tail, 2.0, 20)
    at_tau = encode_topk(teacher, 20, temperature=2.0)
    torch.testing.assert_close(values, at_tau.values, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse_kl_topk(student, full.ids, values, tail, 2.0),
                               sparse_kl_topk(student, at_tau.ids, at_tau.values, at_tau.tail, 2.0))
    part = encode_topk(teacher, 5, temperature=1.0)
    values, tail = temper_topk_target(part.values, part.ids, part.tail, 2.0, 20)
    exact = encode_topk(teacher, 5, temperature=2.0)
    assert (tail >= exact.tail - 1e-6).all() and (values.exp().sum(-1) + tail - 1).abs().max() < 1e-5
    same_values, same_tail = temper_topk_target(part.values, part.ids, part.tail, 1.0, 20)
    torch.testing.assert_close(same_values, part.values)
    torch.testing.assert_close(same_tail, part.tail)


def test_a_float16_target_is_tempered_like_its_float32_copy():
    """`cache build` stores logit values as float16 by default; `distill --temperature 2` on such a
    cache once stopped with an overflow (the -1e30 fill took the values' dtype)."""
    from alignkd.distill.losses import temper_topk_target

    t = encode_topk(randn(3, 20, seed=18), 5)
    ids = t.ids.clone()
    ids[0, -1] = -1  # a padded slot
    half = t.values.half()
    values, tail = temper_topk_target(half, ids, t.tail, 2.0, 20)
    ref_values, ref_tail = temper_topk_target(half.float(), ids, t.tail, 2.0, 20)
    assert values.dtype == torch.float32
    torch.testing.assert_close(values, ref_values, rtol=0, atol=0)
    torch.testing.assert_close(tail, ref_tail, rtol=0, atol=0)


def test_topk_gradients_finite_when_k_covers_vocab():
    student = randn(2, 10, seed=8).requires_grad_()
    t = encode_topk(randn(2, 10, seed=9), 10)
    sparse_kl_topk(student, t.ids, t.values, t.tail).backward()
    assert torch.isfinite(student.grad).all()


def test_sampled_loss_hand_formula_with_padding():
    student = randn(2, 6, seed=10)
    ids = torch.tensor([[1, 4, -1], [0, -1, -1], [-1, -1, -1]])
    counts = torch.tensor([[3.0, 1.0, 0.0], [4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    student3 = torch.cat([student, randn(1, 6, seed=11)])
    loss = sparse_kl_sampled(student3, ids, counts, n=4, temperature=2.0)
    logq = torch.log_softmax(student / 2, -1)
    row0 = -(0.75 * logq[0, 1] + 0.25 * logq[0, 4])
    row1 = -logq[1, 0]
    torch.testing.assert_close(loss, 4 * (row0 + row1) / 2)


def test_ce_loss_is_shifted_and_ignores_minus_100():
    logits = randn(2, 5, 7, seed=12)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, -100, -100]])
    logp = torch.log_softmax(logits, -1)
    picks = [logp[0, 1, 3], logp[0, 2, 4], logp[1, 0, 1], logp[1, 1, 2]]
    torch.testing.assert_close(ce_loss(logits, labels), -torch.stack(picks).mean())
    assert ce_loss(logits, torch.full((2, 5), -100)).item() == 0.0


# ---- positions ----------------------------------------------------------------------

# two samples: [bos, img, img, q, q, a, a, eos] and [bos, img, q, a, eos]
_SAMPLES = [
    ([-100, -100, -100, -100, -100, 5, 6, 2], [0, 0, 0, 1, 1, 1, 1, 1]),
    ([-100, -100, -100, 7, 2], [0, 0, 1, 1, 1]),
]
_WIDTH = 11


def _pad(row: list[int], fill: int, side: str) -> list[int]:
    fills = [fill] * (_WIDTH - len(row))
    return fills + row if side == "left" else row + fills


def _padded(side: str):
    labels = [_pad(lab, -100, side) for lab, _ in _SAMPLES]
    text = [_pad(txt, 0, side) for _, txt in _SAMPLES]
    attn = [_pad([1] * len(lab), 0, side) for lab, _ in _SAMPLES]
    return torch.tensor(labels), torch.tensor(text), torch.tensor(attn)


@pytest.mark.parametrize("side", ["left", "right"])
def test_select_positions_both_policies(side):
    labels, text, attn = _padded(side)
    resp = select_positions(labels, text, attn, "response")
    full = select_positions(labels, text, attn, "text")
    off, off1 = (3, 6) if side == "left" else (0, 0)
    # sample 0: labels at 5, 6, 7 -> response positions 4, 5, 6; text positions 3..6
    assert resp[0].nonzero().flatten().tolist() == [off + 4, off + 5, off + 6]
    assert full[0].nonzero().flatten().tolist() == [off + 3, off + 4, off + 5, off + 6]
    # sample 1: labels at 3, 4 -> positions 2, 3; text positions 2, 3 (4 has no next token)
    assert resp[1].nonzero().flatten().tolist() == [off1 + 2, off1 + 3]
    assert full[1].nonzero().flatten().tolist() == [off1 + 2, off1 + 3]
    with pytest.raises(ValueError, match="policy"):
        select_positions(labels, text, attn, "all")


def test_select_positions_text_policy_on_a_text_only_sample():
    """No image, so no text after it: `text` distils every position with a next token."""
    labels = torch.tensor([[-100, -100, -100, 7, 2, -100]])
    text = torch.zeros(1, 6, dtype=torch.long)
    attn = torch.tensor([[1, 1, 1, 1, 1, 0]])
    assert select_positions(labels, text, attn, "text")[0].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert select_positions(labels, text, attn, "response")[0].nonzero().flatten().tolist() == [2, 3]


# ---- attention ----------------------------------------------------------------------


def _attn_batch(seed=0):
    B, Ht, Hs, T, Nv = 2, 4, 2, 5, 6
    teacher = torch.softmax(randn(B, Ht, T, Nv, seed=seed), -1) * 0.5
    student = (torch.softmax(randn(B, Hs, T, Nv, seed=seed + 1), -1) * 0.5).requires_grad_()
    row_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    return teacher, student, row_mask


def test_head_adapter_init_averages_groups_and_equals_conv():
    adapter = HeadAdapter(4, 2)
    torch.testing.assert_close(adapter.weight.data, torch.tensor([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]]))
    with torch.no_grad():
        adapter.bias.fill_(0.1)
    conv = torch.nn.Conv2d(4, 2, kernel_size=1)
    conv.weight.data = adapter.weight.data[:, :, None, None].clone()
    conv.bias.data = adapter.bias.data.clone()
    x = randn(2, 4, 3, 5, seed=20)
    torch.testing.assert_close(adapter(x), conv(x))
    assert torch.allclose(HeadAdapter(3, 5).weight.sum(1), torch.ones(5))


def test_attention_mse_matches_hand_formula_and_ignores_padded_rows():
    teacher, student, row_mask = _attn_batch()
    adapter = HeadAdapter(4, 2)
    loss = attention_loss(student, teacher, row_mask, adapter, mode="mse")
    mapped = adapter(teacher)
    terms = [((mapped[b, :, i] - student[b, :, i]) ** 2) for b in range(2) for i in range(5) if row_mask[b, i]]
    expected = torch.stack(terms).mean()  # each term is [H_s, N_v]
    torch.testing.assert_close(loss, expected)
    t2, s2 = teacher.clone(), student.detach().clone()
    t2[1, :, 3:] = float("nan")
    s2[1, :, 3:] = 5.0
    torch.testing.assert_close(attention_loss(s2, t2, row_mask, adapter, mode="mse"), loss.detach())


def test_attention_kl_matches_hand_formula():
    teacher, student, row_mask = _attn_batch(seed=3)
    loss = attention_loss(student, teacher[:, :2], row_mask, None, mode="kl")
    vals, masses = [], []
    for b in range(2):
        for i in range(5):
            if row_mask[b, i]:
                masses.append(teacher[b, :2, i].sum(-1))  # [H] vision mass of each teacher row
                t = teacher[b, :2, i] / teacher[b, :2, i].sum(-1, keepdim=True)
                s = student[b, :, i] / student[b, :, i].sum(-1, keepdim=True)
                vals.append((t * (t / s).log()).sum(-1))  # [H]
    masses = torch.stack(masses)
    expected = (torch.stack(vals) * masses / masses.mean()).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    s2 = student.detach().clone()
    s2[1, :, 4] = 0.0  # a padded row: clamped, floored, and still excluded
    assert torch.isfinite(attention_loss(s2, teacher[:, :2], row_mask, None, mode="kl"))


@pytest.mark.parametrize("mode", ["mse", "kl"])
def test_attention_gradients_reach_adapter_and_student(mode):
    teacher, student, row_mask = _attn_batch(seed=5)
    adapter = HeadAdapter(4, 2)
    attention_loss(student, teacher, row_mask, adapter, mode=mode).backward()
    assert adapter.weight.grad.abs().sum() > 0
    if mode == "mse":  # the KL mixes heads convexly and has no bias
        assert adapter.bias.grad.abs().sum() > 0
    assert student.grad[0].abs().sum() > 0
    assert torch.all(student.grad[1, :, 3:] == 0)  # padded rows get no gradient


def test_attention_kl_gradients_stay_bounded_on_small_probabilities():
    """Layer-0 rows put ~1/L on each vision key; the KL must not explode on the adapter."""
    torch.manual_seed(0)
    logits = torch.randn(2, 8, 6, 200) * 2
    teacher = logits.softmax(-1)[..., :36]  # the vision columns of full-row probabilities
    student = torch.randn(2, 4, 6, 200).softmax(-1)[..., :36].requires_grad_()
    adapter = HeadAdapter(8, 4)
    attention_loss(student, teacher, torch.ones(2, 6, dtype=torch.bool), adapter, mode="kl").backward()
    adapter_grad = torch.cat([p.grad.flatten() for p in adapter.parameters() if p.grad is not None])
    assert adapter_grad.norm() < 10  # the affine (biased) target gave 240 here


def test_attention_loss_rejects_bad_mode_and_shapes():
    teacher, student, row_mask = _attn_batch()
    with pytest.raises(ValueError, match="mode"):
        attention_loss(student, teacher[:, :2], row_mask, None, mode="l1")
    with pytest.raises(ValueError, match="adapted teacher"):
        attention_loss(student, teacher, row_mask, None)


# ---- vision tokens and focus --------------------------------------------------------


def test_text_focus_both_layouts():
    attn = randn(2, 3, 5, 4, seed=30).abs()  # [B, H, T, N_v]
    row_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    focus = text_focus(attn, row_mask)
    expected0 = attn[0, :, :3].mean(0).sum(0)
    torch.testing.assert_close(focus[0], expected0)
    per_sample = text_focus(attn[0, :, :3].permute(1, 0, 2))  # cache layout [T, H, N_v]
    torch.testing.assert_close(per_sample, expected0)
    with pytest.raises(ValueError, match="text_focus"):
        text_focus(attn)


def test_vision_loss_double_counts_topk_tokens():
    B, Nv, dt, ds = 2, 6, 5, 3
    student, teacher = randn(B, Nv, ds, seed=40), randn(B, Nv, dt, seed=41)
    focus = torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.0, 0.3], [0.5, 0.1, 0.2, 0.3, 0.4, 0.6]])
    adapter = ProjectorAdapter(dt, ds)
    loss = vision_loss(student, teacher, focus, adapter, topk=2)
    err = ((adapter(teacher) - student) ** 2).mean(-1)  # [B, N_v]
    top = [[1, 3], [5, 0]]
    expected = err.mean() + torch.stack([err[b, top[b]].mean() for b in range(B)]).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(vision_loss(student, teacher, focus, adapter, topk=99), 2 * err.mean())


def test_vision_loss_valid_mask_and_gradients():
    student = randn(3, 4, 3, seed=42).requires_grad_()
    teacher, focus = randn(3, 4, 5, seed=43), randn(3, 4, seed=44)
    adapter = ProjectorAdapter(5, 3)
    valid = torch.tensor([True, False, True])
    loss = vision_loss(student, teacher, focus, adapter, topk=2, valid=valid)
    keep = vision_loss(student[[0, 2]], teacher[[0, 2]], focus[[0, 2]], adapter, topk=2)
    torch.testing.assert_close(loss, keep)
    loss.backward()
    assert torch.all(student.grad[1] == 0) and adapter.proj.weight.grad.abs().sum() > 0
