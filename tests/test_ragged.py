"""A vision-token count that varies per sample: masked losses, padded collate, vocab widths.

The batch losses must average over real entries only, so a batch that mixes an Nv=3 and
an Nv=5 sample equals what the two samples give alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignkd.cache.record import SampleRecord
from alignkd.distill.checks import check_vocabulary
from alignkd.distill.dataset import collate_distill, item_from_record
from alignkd.distill.losses import HeadAdapter, ProjectorAdapter, attention_loss, vision_loss
from alignkd.distill.vocab import restrict_logits
from alignkd.errors import AlignKDError

HT, HS, DT, DS = 4, 2, 6, 5
SHAPES = [(2, 3), (4, 5)]  # (text rows T_b, vision tokens Nv_b) per sample


def _sample(T: int, Nv: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    soft = lambda *s: torch.softmax(torch.randn(*s, generator=g), -1) * 0.7  # rows also attend to text
    return {"s_attn": soft(1, HS, T, Nv), "t_attn": soft(1, HT, T, Nv),
            "s_vis": torch.randn(1, Nv, DS, generator=g), "t_vis": torch.randn(1, Nv, DT, generator=g),
            "focus": torch.rand(1, Nv, generator=g)}


def _padded(samples: list[dict]) -> dict:
    """The samples padded to the batch's largest T and Nv, with garbage in the padding."""
    T, Nv = max(s["s_attn"].shape[2] for s in samples), max(s["s_attn"].shape[3] for s in samples)
    out = {"s_attn": torch.full((len(samples), HS, T, Nv), 0.9), "t_attn": torch.full((len(samples), HT, T, Nv), 0.9),
           "s_vis": torch.full((len(samples), Nv, DS), 7.0), "t_vis": torch.full((len(samples), Nv, DT), -3.0),
           "focus": torch.full((len(samples), Nv), 99.0),  # padding would win every top-k if it were seen
           "rows": torch.zeros(len(samples), T, dtype=torch.bool), "cols": torch.zeros(len(samples), Nv, dtype=torch.bool)}
    for b, s in enumerate(samples):
        t, n = s["s_attn"].shape[2:]
        out["s_attn"][b, :, :t, :n], out["t_attn"][b, :, :t, :n] = s["s_attn"][0], s["t_attn"][0]
        out["s_vis"][b, :n], out["t_vis"][b, :n], out["focus"][b, :n] = s["s_vis"][0], s["t_vis"][0], s["focus"][0]
        out["rows"][b, :t], out["cols"][b, :n] = True, True
    return out


@pytest.fixture
def mixed():
    samples = [_sample(T, Nv, seed) for seed, (T, Nv) in enumerate(SHAPES)]
    torch.manual_seed(0)
    return samples, _padded(samples), HeadAdapter(HT, HS), ProjectorAdapter(DT, DS)


def test_attention_mse_of_mixed_batch_equals_per_sample_losses(mixed):
    samples, batch, heads, _ = mixed
    alone = [attention_loss(s["s_attn"], s["t_attn"], torch.ones(1, s["s_attn"].shape[2], dtype=torch.bool), heads)
             for s in samples]
    entries = [T * Nv for T, Nv in SHAPES]  # the mse averages over real (row, column) entries
    expected = sum(loss * n for loss, n in zip(alone, entries)) / sum(entries)
    got = attention_loss(batch["s_attn"], batch["t_attn"], batch["rows"], heads, vision_mask=batch["cols"])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_attention_kl_of_mixed_batch_equals_row_by_row_reference(mixed):
    samples, batch, heads, _ = mixed
    eps = 1e-8
    kls, masses = [], []
    for s in samples:  # unpadded, row by row
        t_all = heads.mix(s["t_attn"])[0]
        for h in range(HS):
            for r in range(s["s_attn"].shape[2]):
                t, q = t_all[h, r].clamp(min=0) + eps, s["s_attn"][0, h, r].clamp(min=0) + eps
                masses.append(t.sum())
                t, q = t / t.sum(), q / q.sum()
                kls.append((t * (t.log() - q.log())).sum())
    masses, kls = torch.stack(masses), torch.stack(kls)
    expected = (kls * masses / masses.mean()).sum() / len(kls)
    got = attention_loss(batch["s_attn"], batch["t_attn"], batch["rows"], heads, mode="kl", vision_mask=batch["cols"])
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("topk", [2, 4])  # 4 > Nv of the first sample: its own k is 3
def test_vision_loss_of_mixed_batch_equals_mean_of_per_sample_losses(mixed, topk):
    samples, batch, _, proj = mixed
    alone = [vision_loss(s["s_vis"], s["t_vis"], s["focus"], proj, topk=topk) for s in samples]
    got = vision_loss(batch["s_vis"], batch["t_vis"], batch["focus"], proj, topk=topk, vision_mask=batch["cols"])
    torch.testing.assert_close(got, sum(alone) / len(alone), rtol=1e-5, atol=1e-7)


def test_masked_losses_send_no_gradient_into_padding(mixed):
    _, batch, heads, proj = mixed
    s_attn, s_vis = batch["s_attn"].requires_grad_(), batch["s_vis"].requires_grad_()
    loss = attention_loss(s_attn, batch["t_attn"], batch["rows"], heads, mode="kl", vision_mask=batch["cols"]) \
        + vision_loss(s_vis, batch["t_vis"], batch["focus"], proj, topk=4, vision_mask=batch["cols"])
    loss.backward()
    assert torch.isfinite(s_attn.grad).all() and torch.isfinite(s_vis.grad).all()
    assert not s_attn.grad[0, :, :, 3:].any() and not s_vis.grad[0, 3:].any()
    assert s_attn.grad[1].abs().sum() > 0 and s_vis.grad[0, :3].abs().sum() > 0


def _record(T: int, Nv: int, seed: int, logit_ids=None) -> SampleRecord:
    rng = np.random.default_rng(seed)
    L = 4 + Nv + T
    ids = np.asarray(logit_ids if logit_ids is not None else [[3, 1, -1]], np.int64)
    return SampleRecord(
        sample_id=f"r{seed}", manifest_row=seed, input_ids=np.arange(L, dtype=np.int32),
        label_mask=np.r_[np.zeros(L - 2, bool), np.ones(2, bool)], vision_positions=np.arange(2, 2 + Nv, dtype=np.int32),
        text_positions=np.arange(L - T, L, dtype=np.int32), attn=rng.random((T, HT, Nv), np.float32),
        vision=rng.random((Nv, DT), np.float32), focus=rng.random(Nv, np.float32),
        logit_positions=np.asarray([L - 2], np.int32), logit_ids=ids,
        logit_values=np.log(np.asarray([[0.5, 0.25, 1.0]], np.float32))[:, : ids.shape[1]] * (ids >= 0),
        logit_tail=np.asarray([0.25], np.float32), teacher_ce=1.0, teacher_entropy=1.0, teacher_tail_mass=0.25,
        mm_token_type_ids=np.r_[np.zeros(2), np.ones(Nv), np.zeros(L - 2 - Nv)].astype(np.int32))


@pytest.mark.parametrize("in_place", [False, True])
def test_collate_pads_ragged_targets_with_a_vision_mask(in_place, monkeypatch):
    """Both ways of padding (fill the batch, or only its padding for large batches) agree."""
    from alignkd.distill import dataset

    monkeypatch.setattr(dataset, "PAD_IN_PLACE_ELEMENTS", 0 if in_place else 1 << 20)
    records = [_record(T, Nv, seed) for seed, (T, Nv) in enumerate(SHAPES)]
    batch = collate_distill([item_from_record(r, {}) for r in records], pad_token_id=0)
    assert batch["t_attn"].shape == (2, 4, HT, 5) and batch["t_vision"].shape == (2, 5, DT)
    assert batch["t_vision_mask"].tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    for b, r in enumerate(records):
        T, Nv = r.attn.shape[0], r.attn.shape[2]
        np.testing.assert_array_equal(batch["t_attn"][b, :T, :, :Nv].numpy(), r.attn)
        assert not batch["t_attn"][b, T:].any() and not batch["t_attn"][b, :, :, Nv:].any()
        np.testing.assert_array_equal(batch["mm_token_type_ids"][b, : len(r.input_ids)].numpy(), r.mm_token_type_ids)
    assert batch["mm_token_type_ids"].shape == batch["input_ids"].shape


def test_restrict_logits_moves_dropped_mass_into_the_tail():
    ids = torch.tensor([[7, 2, 9, -1]])
    values = torch.log(torch.tensor([[0.4, 0.3, 0.1, 1.0]])) * (ids >= 0)
    tail = torch.tensor([0.2])
    new_ids, new_values, new_tail = restrict_logits(ids, values, tail, vocab_size=8, logit_mode="topk")
    assert new_ids.tolist() == [[7, 2, -1, -1]]
    torch.testing.assert_close(new_values[0, :2].exp(), torch.tensor([0.4, 0.3]))
    torch.testing.assert_close(new_tail, torch.tensor([0.3]))  # 0.2 + the dropped id 9's 0.1
    counts = torch.tensor([[3.0, 9.0, 1.0, 0.0]])
    s_ids, s_counts, s_tail = restrict_logits(torch.tensor([[9, 2, 4, -1]]), counts, tail, 8, "sampled")
    assert s_ids.tolist() == [[2, 4, -1, -1]] and s_counts.tolist() == [[9.0, 1.0, 0.0, 0.0]]
    assert torch.equal(s_tail, tail)


def test_vocabulary_widths_may_differ_only_past_the_tokenizer():
    check_vocabulary(152064, 151936, tokenizer_size=151665)  # Qwen2.5-VL-7B teacher -> 3B student
    check_vocabulary(151936, 152064, tokenizer_size=151665)
    with pytest.raises(AlignKDError, match="151936 entries but the cache's teacher has 152064"):
        check_vocabulary(151936, 152064, tokenizer_size=152000)


def test_normalized_vision_loss_of_mixed_batch_equals_mean_of_per_sample_losses(mixed):
    """The scale-free L_vis, with each sample's own default k = N_v_b / 9 (a per-sample [B] top-k)."""
    from alignkd.distill.losses import StudentToTeacherAdapter, default_vision_topk, normalized_vision_loss

    samples, batch, _, _ = mixed
    torch.manual_seed(0)
    adapter = StudentToTeacherAdapter(DS, DT, torch.randn(DT), torch.rand(DT) + 0.5)
    k = default_vision_topk(batch["cols"].sum(1))
    assert k.tolist() == [default_vision_topk(Nv) for _, Nv in SHAPES]
    alone = [normalized_vision_loss(s["s_vis"], s["t_vis"], s["focus"], adapter,
                                    topk=default_vision_topk(s["s_vis"].shape[1])) for s in samples]
    got = normalized_vision_loss(batch["s_vis"], batch["t_vis"], batch["focus"], adapter, topk=k,
                                 vision_mask=batch["cols"])
    torch.testing.assert_close(got, sum(alone) / len(alone), rtol=1e-5, atol=1e-7)
