"""Sparse teacher targets: top-k with tail, sampled counts, stats and storage dtypes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from alignkd.cache.teacher.sparse_logits import (
    SparseTarget,
    bytes_per_token,
    encode_sampled,
    encode_topk,
    from_storage,
    teacher_stats,
    to_storage,
)
from alignkd.distill.losses import dense_kl, sparse_kl_sampled, sparse_kl_topk


def peaked_logits(P: int, V: int, seed: int, scale: float = 4.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(P, V, generator=g) * scale


def test_topk_ids_are_true_topk_and_tail_matches_float64():
    logits = peaked_logits(6, 300, seed=0)
    target = encode_topk(logits, k=10, temperature=1.5)
    ref = torch.log_softmax(logits.double() / 1.5, dim=-1)
    ref_ids = ref.argsort(dim=-1, descending=True)[:, :10]
    assert torch.equal(target.ids, ref_ids)
    torch.testing.assert_close(target.values.double(), ref.gather(1, ref_ids), atol=1e-5, rtol=0)
    ref_tail = 1 - ref.exp().gather(1, ref_ids).sum(-1)
    torch.testing.assert_close(target.tail.double(), ref_tail, atol=1e-6, rtol=1e-4)
    assert target.mode == "topk" and target.n == 0


def test_topk_tiny_tail_is_not_rounded_to_zero():
    logits = torch.zeros(1, 100)
    logits[0, 0] = 30.0  # tail ~ 99 * e^-30 ~ 9e-12, lost by 1 - sum(p) in float32
    tail = encode_topk(logits, k=1).tail
    expected = 99 * math.exp(-30) / (1 + 99 * math.exp(-30))
    assert tail.item() == pytest.approx(expected, rel=1e-4)


def test_topk_k_at_least_vocab_has_zero_tail():
    target = encode_topk(peaked_logits(3, 20, seed=1), k=50)
    assert target.ids.shape == (3, 20)
    assert torch.all(target.tail == 0)


def test_sampled_counts_sum_to_n_and_are_padded():
    logits = peaked_logits(8, 200, seed=2)
    target = encode_sampled(logits, n=32, generator=torch.Generator().manual_seed(0))
    assert target.ids.shape == (8, 32) and target.n == 32
    torch.testing.assert_close(target.values.sum(-1), torch.full((8,), 32.0))
    pad = target.ids < 0
    assert torch.all(target.values[pad] == 0) and torch.all(target.values[~pad] >= 1)
    assert torch.all(target.tail == 0)
    for row, ok in zip(target.ids, ~pad):  # unique and ascending before the padding
        kept = row[ok]
        assert torch.all(kept[1:] > kept[:-1])


def test_sampled_same_seed_same_output():
    logits = peaked_logits(300, 100, seed=3)  # more rows than one CDF chunk
    a = encode_sampled(logits, 16, torch.Generator().manual_seed(7))
    b = encode_sampled(logits, 16, torch.Generator().manual_seed(7))
    c = encode_sampled(logits, 16, torch.Generator().manual_seed(8))
    assert torch.equal(a.ids, b.ids) and torch.equal(a.values, b.values)
    assert not torch.equal(a.ids, c.ids)
    # row i uses the i-th slice of one random stream: a prefix of positions is stable
    head = encode_sampled(logits[:10], 16, torch.Generator().manual_seed(7))
    assert torch.equal(head.ids, a.ids[:10]) and torch.equal(head.values, a.values[:10])


def test_sampled_frequencies_match_p():
    V, n = 12, 20000
    logits = torch.linspace(0, 3, V)[None]
    target = encode_sampled(logits, n, torch.Generator().manual_seed(0))
    freq = torch.zeros(V).scatter_add_(0, target.ids[0].clamp(min=0), target.values[0]) / n
    p = torch.softmax(logits[0], -1)
    chi2 = float((n * (freq - p) ** 2 / p).sum())
    assert chi2 < 35.0  # 11 dof: p(chi2 > 35) < 3e-4


def test_sampled_never_draws_zero_probability_ids():
    logits = torch.full((4, 50), float("-inf"))
    logits[:, 10:13] = 0.0
    target = encode_sampled(logits, 64, torch.Generator().manual_seed(1))
    kept = target.ids[target.ids >= 0]
    assert set(kept.tolist()) <= {10, 11, 12}


def test_sampled_loss_expectation_is_cross_entropy():
    teacher = peaked_logits(4, 40, seed=4, scale=2.0)
    student = peaked_logits(4, 40, seed=5, scale=2.0)
    losses = []
    for seed in range(200):
        t = encode_sampled(teacher, 16, torch.Generator().manual_seed(seed))
        losses.append(sparse_kl_sampled(student, t.ids, t.values, t.n).item())
    p = torch.softmax(teacher, -1)
    ce = -(p * torch.log_softmax(student, -1)).sum(-1).mean().item()
    stderr = float(np.std(losses)) / math.sqrt(len(losses))
    assert abs(float(np.mean(losses)) - ce) < 4 * stderr + 1e-3


def test_storage_round_trip_and_bytes():
    logits = peaked_logits(4, 1000, seed=6)
    topk = encode_topk(logits, 8)
    arrays = to_storage(topk, vocab_size=1000)
    assert {k: v.dtype.name for k, v in arrays.items()} == {
        "ids": "uint16",
        "values": "float16",
        "tail": "float16",
    }
    back = from_storage(arrays, "topk")
    assert torch.equal(back.ids, topk.ids)
    torch.testing.assert_close(back.values, topk.values, atol=1e-2, rtol=1e-3)
    assert bytes_per_token(topk, 1000) == 8 * 4 + 2
    assert to_storage(topk, vocab_size=100_000)["ids"].dtype == np.int32

    sampled = encode_sampled(logits, 16, torch.Generator().manual_seed(0))
    arrays = to_storage(sampled, vocab_size=1000)
    assert arrays["values"].dtype == np.uint8 and "tail" not in arrays
    back = from_storage(arrays, "sampled", n=16)
    assert torch.equal(back.ids, sampled.ids) and torch.equal(back.values, sampled.values)
    assert bytes_per_token(sampled, 1000) == 16 * 3
    unique = (sampled.ids >= 0).sum().item() / 4
    assert bytes_per_token(sampled, 1000, ragged=True) == pytest.approx(unique * 3 + 1)


def test_teacher_stats():
    logits = peaked_logits(5, 30, seed=7)
    labels_next = torch.tensor([3, -100, 7, -100, 0])
    target = encode_topk(logits, 4)
    stats = teacher_stats(logits, labels_next, target)
    logp = torch.log_softmax(logits, -1)
    answer = labels_next != -100
    ce = -logp[answer].gather(1, labels_next[answer, None]).mean().item()
    assert stats.ce == pytest.approx(ce, rel=1e-5)
    assert stats.entropy == pytest.approx(-(logp.exp() * logp).sum(-1).mean().item(), rel=1e-5)
    assert stats.tail == pytest.approx(target.tail.mean().item(), rel=1e-5)
    assert stats.num_answer == 3
    none = teacher_stats(logits, torch.full((5,), -100), target)
    assert math.isnan(none.ce) and none.num_answer == 0


def test_sparse_target_rejects_bad_mode_and_shapes():
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="mode"):
        SparseTarget("dense", ids, ids.float(), torch.zeros(2))
    with pytest.raises(ValueError, match="shapes"):
        SparseTarget("topk", ids, ids.float(), torch.zeros(3))


def test_topk_kl_equals_dense_when_k_is_vocab():
    teacher, student = peaked_logits(6, 64, seed=8), peaked_logits(6, 64, seed=9)
    t = encode_topk(teacher, 64, temperature=2.0)
    sparse = sparse_kl_topk(student, t.ids, t.values, t.tail, temperature=2.0)
    torch.testing.assert_close(sparse, dense_kl(student, teacher, temperature=2.0), rtol=1e-5, atol=1e-6)
