"""The default (normalized) objective: scale-free terms, gradients that match a live teacher.

The demo and users' teachers have feature scales we cannot know in advance; these
tests pin that a teacher whose vision tokens are 100x larger leaves every term's share
of the student's gradient where it was under the normalized scale, while the paper's
plain MSE lets the vision term swamp the rest.
"""

from __future__ import annotations

import json

import pytest
import torch

from alignkd.cache.teacher.build import BuildConfig, build_cache
from alignkd.cache.reader import open_cache
from alignkd.distill.dataset import CachedDistillDataset
from alignkd.distill.losses import StudentToTeacherAdapter, default_vision_topk, normalized_vision_loss
from alignkd.distill.objective import AlignKDObjective, LossWeights
from alignkd.distill.vision_stats import teacher_vision_stats

from tests.support.world import make_image, write_manifest

# With the normalized scale the 100x teacher changes no share by more than this (the
# standardisation removes the factor exactly; what is left is float rounding).
SHARE_TOLERANCE = 0.02


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_llava_dir):
    root = tmp_path_factory.mktemp("scale")
    records = []
    for i in range(6):
        make_image(root / "images" / f"{i}.png", seed=40 + i)
        records.append({"id": f"x{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat colour is this ?"},
            {"from": "gpt", "value": ["red", "blue circle", "yes"][i % 3]}]})
    cfg = BuildConfig(teacher=str(tiny_llava_dir), data=str(write_manifest(root / "d.json", records)),
                      images=str(root / "images"), out=str(root / "cache"), batch_size=3, shard_size=6,
                      attn_dtype="float16", vision_dtype="float16", progress=False)
    build_cache(cfg)
    return cfg.out


def _objective(student_dir, tiny_llava_dir, loss_scale, stats):
    from alignkd.models import load_vlm

    student = load_vlm(student_dir)
    text = json.loads((tiny_llava_dir / "config.json").read_text())["text_config"]
    torch.manual_seed(0)
    obj = AlignKDObjective(student.model, teacher_heads=text["num_attention_heads"], teacher_dim=text["hidden_size"],
                           weights=LossWeights(), logit_mode="topk", logit_samples=16, loss_scale=loss_scale,
                           attn_loss="kl" if loss_scale == "normalized" else "mse", vision_stats=stats)
    return obj, student.processor


def _shares(cache, student_dir, teacher_dir, loss_scale, vision_scale):
    reader = open_cache(cache)
    mean, std = teacher_vision_stats(reader)
    obj, processor = _objective(student_dir, teacher_dir, loss_scale, (mean * vision_scale, std * vision_scale))
    dataset = CachedDistillDataset(cache, processor)
    batch = dataset.collate([dataset[i] for i in range(len(dataset))])
    batch["t_vision"] = batch["t_vision"] * vision_scale
    obj.measure_grad_shares = True
    out = obj(**batch)
    return {k.removeprefix("gshare_"): float(v) for k, v in out.items() if k.startswith("gshare_")}


def test_normalized_shares_ignore_the_teachers_feature_scale(cache, tiny_student_dir, tiny_llava_dir):
    base = _shares(cache, tiny_student_dir, tiny_llava_dir, "normalized", 1.0)
    scaled = _shares(cache, tiny_student_dir, tiny_llava_dir, "normalized", 100.0)
    assert set(base) == {"ce", "logit", "vis", "attn"}
    assert abs(sum(base.values()) - 1) < 1e-5
    for term in base:
        assert abs(base[term] - scaled[term]) < SHARE_TOLERANCE, (term, base, scaled)
        assert base[term] > 0, (term, base)  # every term reaches the student


def test_paper_scale_lets_a_large_teacher_swamp_the_gradient(cache, tiny_student_dir, tiny_llava_dir):
    # The reason the default changed: the same 100x teacher under the paper's plain MSE.
    base = _shares(cache, tiny_student_dir, tiny_llava_dir, "paper", 1.0)
    scaled = _shares(cache, tiny_student_dir, tiny_llava_dir, "paper", 100.0)
    assert scaled["vis"] > 3 * base["vis"], (base, scaled)
    assert scaled["vis"] - base["vis"] > SHARE_TOLERANCE


def test_normalized_vision_loss_is_scale_free_with_a_fixed_target():
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 9, 4), torch.randn(3, 9, 6) * 5 + 2
    focus = torch.rand(3, 9)
    flat = teacher.reshape(-1, 6)
    adapter = StudentToTeacherAdapter(4, 6, flat.mean(0), flat.std(0, unbiased=False))
    loss = normalized_vision_loss(student, teacher, focus, adapter, topk=2)
    # predicting the channel means reads exactly 1 per MSE (all tokens, and k = N_v again): 2
    with torch.no_grad():
        adapter.proj.weight.zero_()
        adapter.proj.bias.zero_()
    torch.testing.assert_close(normalized_vision_loss(student, teacher, focus, adapter, topk=9), torch.tensor(2.0))
    # a 1000x teacher with its own statistics gives the same loss
    big = StudentToTeacherAdapter(4, 6, flat.mean(0) * 1000, flat.std(0, unbiased=False) * 1000)
    big.proj.load_state_dict(adapter.proj.state_dict())
    torch.testing.assert_close(normalized_vision_loss(student, teacher * 1000, focus, big, topk=2),
                               normalized_vision_loss(student, teacher, focus, adapter, topk=2))
    # the target has no gradient path: only the student side and the adapter move
    student.requires_grad_(True)
    normalized_vision_loss(student, teacher, focus, adapter, topk=2).backward()
    assert adapter.mean.grad is None and adapter.std.grad is None
    assert loss.item() > 0


def test_vision_topk_default_keeps_the_papers_share():
    assert default_vision_topk(144) == 16
    assert default_vision_topk(576) == 64
    assert default_vision_topk(36) == 4
    assert default_vision_topk(9) == 1


def test_vision_stats_match_numpy_over_every_token(cache):
    import numpy as np

    reader = open_cache(cache)
    tokens = np.concatenate([np.asarray(reader[i].vision, dtype=np.float64) for i in range(len(reader))])
    mean, std = teacher_vision_stats(reader)
    np.testing.assert_allclose(mean.numpy(), tokens.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std.numpy(), tokens.std(0), rtol=1e-4, atol=1e-6)


def test_a_term_with_weight_0_never_runs_nor_reads_its_targets(cache, tiny_student_dir, tiny_llava_dir):
    """`--preset logits`: the vision and attention targets may be nan, or the rows absent as in a
    layer0 cache with no kit, and the loss is the clean batch's; the full objective would read them."""
    from alignkd.distill.terms import preset_weights

    obj, processor = _objective(tiny_student_dir, tiny_llava_dir, "paper", teacher_vision_stats(open_cache(cache)))
    obj.weights = LossWeights(**preset_weights("logits"))
    dataset = CachedDistillDataset(cache, processor)
    batch = dataset.collate([dataset[i] for i in range(len(dataset))])
    clean = obj(**batch)
    from alignkd.distill.objective import drop_unread_targets

    read = drop_unread_targets(batch, [obj.terms[name] for name in obj.weights.enabled()])
    assert sorted(k for k in read if k.startswith("t_")) == sorted(k for k in batch if k.startswith("t_logit"))
    poisoned = {k: v for k, v in batch.items() if not k.startswith("t_attn")}
    poisoned["t_vision"] = torch.full_like(batch["t_vision"], float("nan"))
    poisoned["t_focus"] = torch.full_like(batch["t_focus"], float("nan"))
    out = obj(**poisoned)
    assert set(out) == {"loss", "loss_ce", "loss_logit"}
    assert torch.isfinite(out["loss"]) and torch.equal(out["loss"], clean["loss"])
    obj.weights = LossWeights()
    with pytest.raises(RuntimeError, match="no layer-0 kit was given"):
        obj(**poisoned)
