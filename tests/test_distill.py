"""The distill stage against a live teacher: loss equivalence, learning, resume, refusals, export.

One cache is built per module from a tiny real LLaVA teacher; the student is a smaller
tiny LLaVA with the same tokenizer and image grid. The teacher is loaded only in the
loss-equivalence test, to compute the same terms live.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from alignkd.cache.teacher.build import BuildConfig, build_cache
from alignkd.cli import main
from alignkd.demo.tiny_models import TinyLlavaSpec, build_tiny_llava
from alignkd.distill.dataset import CachedDistillDataset, collate_distill, item_from_record
from alignkd.distill.objective import AlignKDObjective, LossWeights
from alignkd.distill.run import DistillConfig, distill
from alignkd.errors import AlignKDError

from tests.support.world import make_image, write_manifest

TERMS = ("ce", "logit", "vis", "attn")
REPO = Path(__file__).resolve().parents[1]


def _dataset(root, n=8):
    images = root / "images"
    records = []
    answers = ["red", "blue circle", "yes", "no", "green square", "3", "left", "red cross"]
    for i in range(n):
        make_image(images / f"{i}.png", seed=10 + i)
        conv = [{"from": "human", "value": "<image>\nwhat is the shape of this image ?"},
                {"from": "gpt", "value": answers[i % len(answers)]}]
        if i % 3 == 1:
            conv += [{"from": "human", "value": "how many ?"}, {"from": "gpt", "value": str(i)}]
        records.append({"id": f"d{i}", "image": f"{i}.png", "conversations": conv})
    return write_manifest(root / "train.json", records), images


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llava_dir):
    root = tmp_path_factory.mktemp("distill")
    manifest, images = _dataset(root)
    caches = {}
    for mode in ("topk", "sampled"):
        cfg = BuildConfig(teacher=str(tiny_llava_dir), data=str(manifest), images=str(images),
                          out=str(root / f"cache-{mode}"), batch_size=3, shard_size=4, logit_mode=mode,
                          logit_k=8, logit_samples=16, attn_dtype="float16", vision_dtype="float16",
                          progress=False)
        build_cache(cfg)
        caches[mode] = cfg
    return {"root": root, "manifest": manifest, "images": images, "caches": caches}


def _objective(student_dir, teacher_dir, mode, **kw):
    from alignkd.models import load_vlm

    student = load_vlm(student_dir)
    teacher_cfg = json.loads((teacher_dir / "config.json").read_text())["text_config"]
    torch.manual_seed(0)
    obj = AlignKDObjective(student.model, teacher_heads=teacher_cfg["num_attention_heads"],
                           teacher_dim=teacher_cfg["hidden_size"], weights=LossWeights(),
                           logit_mode=mode, logit_samples=16, **kw)
    return obj, student.processor


def _live_batch(cfg, student_processor):
    """The same batch built from a live teacher forward, without touching the cache."""
    from alignkd.cache.teacher.teacher_pass import records_from_capture
    from alignkd.data import collate, read_manifest, render_sample
    from alignkd.models import capture_forward, load_vlm

    teacher = load_vlm(cfg.teacher)
    recs = read_manifest(cfg.data)
    rendered = [render_sample(r, teacher.processor, cfg.images, cfg.max_length) for r in recs]
    batch = collate(rendered, pad_token_id=teacher.processor.tokenizer.pad_token_id)
    cap = capture_forward(teacher.model, {k: v for k, v in batch.items() if k != "labels"})
    records = records_from_capture(rendered, batch, cap, logit_mode=cfg.logit_mode,
                                   logit_k=cfg.logit_k, logit_samples=cfg.logit_samples,
                                   positions_policy=cfg.logit_positions, seed=cfg.seed, store_images=True)
    from alignkd.data import image_inputs_from_bytes

    items = [item_from_record(rec, image_inputs_from_bytes(student_processor, rec.image_bytes[0])) for rec in records]
    return collate_distill(items, student_processor.tokenizer.pad_token_id)


@pytest.mark.parametrize("mode,attn_loss,loss_scale", [
    ("topk", "kl", "normalized"), ("sampled", "kl", "normalized"), ("topk", "mse", "normalized"),
    ("topk", "mse", "paper"), ("sampled", "mse", "paper"), ("topk", "kl", "paper")])
def test_every_loss_term_and_gradient_from_cache_equals_live_teacher(world, tiny_llava_dir, tiny_student_dir, mode,
                                                                      attn_loss, loss_scale):
    from alignkd.cache.reader import open_cache
    from alignkd.distill.vision_stats import teacher_vision_stats

    cfg = world["caches"][mode]
    stats = teacher_vision_stats(open_cache(cfg.out))
    obj, processor = _objective(tiny_student_dir, tiny_llava_dir, mode, attn_loss=attn_loss, loss_scale=loss_scale,
                                vision_stats=stats)
    dataset = CachedDistillDataset(cfg.out, processor)
    cached = dataset.collate([dataset[i] for i in range(len(dataset))])
    live = _live_batch(cfg, processor)
    assert torch.equal(cached["input_ids"], live["input_ids"])
    results = []
    for batch in (cached, live):  # the online teacher and the cache, on the same batch
        obj.zero_grad()
        out = obj(**batch)
        out["loss"].backward()
        grad = torch.cat([p.grad.flatten() for p in obj.parameters() if p.grad is not None])
        results.append((out, grad))
    (from_cache, g_cache), (from_live, g_live) = results
    for term in TERMS:
        a, b = from_cache[f"loss_{term}"], from_live[f"loss_{term}"]
        assert torch.isfinite(a) and a != 0, term
        # fp16 storage of attention and vision tokens; logits are stored losslessly
        assert torch.allclose(a, b, rtol=2e-3, atol=1e-7), (term, float(a), float(b))
    # every parameter the optimiser moves, student and adapters alike, gets the same update direction
    assert torch.nn.functional.cosine_similarity(g_cache, g_live, dim=0) > 0.9999
    assert torch.allclose(g_cache.norm(), g_live.norm(), rtol=2e-3)


def _train(world, student_dir, out, callbacks=None, **kw):
    cfg = DistillConfig(student=str(student_dir), cache=world["caches"]["topk"].out, out=str(out),
                        batch_size=4, lr=3e-3, logging_steps=1, progress=False, **kw)
    return distill(cfg, callbacks=callbacks), [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_distill_lowers_every_term_and_trains_adapters(world, tmp_path):
    student = build_tiny_llava(tmp_path / "student", TinyLlavaSpec(hidden_size=32, num_heads=2,
                                                                    intermediate_size=64), seed=3)
    # The tiny teacher is random, so CE on the labels and KL to the teacher pull apart;
    # the KD terms are checked together and CE on its own.
    summary, logs = _train(world, student, tmp_path / "run", max_steps=30, w_ce=0.0)
    _, ce_logs = _train(world, student, tmp_path / "ce", max_steps=15, w_logit=0.0, w_vis=0.0, w_attn=0.0)
    steps = [r for r in logs if "loss_logit" in r]
    for term in ("logit", "vis", "attn"):
        first = sum(r[f"loss_{term}"] for r in steps[:3]) / 3
        last = sum(r[f"loss_{term}"] for r in steps[-3:]) / 3
        assert last < first, (term, first, last)
    ce = [r["loss_ce"] for r in ce_logs if "loss_ce" in r]
    assert sum(ce[-3:]) < sum(ce[:3])
    from safetensors.torch import load_file

    from alignkd.distill.losses import HeadAdapter

    adapters = load_file(tmp_path / "run" / "adapters.safetensors")
    assert not torch.allclose(adapters["head_adapter.weight"], HeadAdapter(4, 2).weight)
    assert summary.steps == 30


def test_frozen_adapters_stay_fixed(world, tmp_path, tiny_student_dir):
    _train(world, tiny_student_dir, tmp_path / "run", max_steps=3, adapters="frozen")
    from safetensors.torch import load_file

    from alignkd.distill.losses import HeadAdapter

    adapters = load_file(tmp_path / "run" / "adapters.safetensors")
    assert torch.equal(adapters["head_adapter.weight"], HeadAdapter(4, 2).weight)
    assert torch.equal(adapters["head_adapter.bias"], torch.zeros(2))


def test_align_fade_runs_the_alignment_terms_early_and_logits_throughout(world, tmp_path, tiny_student_dir):
    _, rows = _train(world, tiny_student_dir, tmp_path / "run", max_steps=8, align_fade=0.5)
    steps = {row["step"]: row for row in rows if "loss" in row}
    # weights fall as 1 - step/4 (the step counted before it runs): on at steps 1-4, never computed after
    for step in (1, 2, 3, 4):
        assert steps[step]["loss_vis"] > 0 and steps[step]["loss_attn"] > 0, steps[step]
    for step in (5, 6, 7, 8):
        assert "loss_vis" not in steps[step] and "loss_attn" not in steps[step], steps[step]
        assert steps[step]["loss_logit"] > 0 and steps[step]["loss_ce"] > 0


def test_distill_needs_no_teacher_and_output_loads_and_generates(world, tmp_path, tiny_llava_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    teacher_copy = tmp_path / "teacher"
    shutil.copytree(tiny_llava_dir, teacher_copy)
    cfg = replace(world["caches"]["topk"], teacher=str(teacher_copy), out=str(tmp_path / "cache"))
    build_cache(cfg)
    shutil.rmtree(teacher_copy)
    student = build_tiny_llava(tmp_path / "student", TinyLlavaSpec(hidden_size=32, num_heads=2,
                                                                    intermediate_size=64), seed=4)
    result = CliRunner().invoke(main, ["distill", "--student", str(student), "--cache", cfg.out,
                                       "--out", str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "4",
                                       "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "distilled 2 steps" in result.output
    out = tmp_path / "run"
    assert {"config.json", "model.safetensors", "adapters.safetensors", "metrics.jsonl", "loss_curves.png",
            "distill_run.json", "tokenizer.json", "processor_config.json"} <= {p.name for p in out.iterdir()}
    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    from PIL import Image

    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what ?"}]}],
        add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.new("RGB", (40, 40))], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]


def test_resume_continues_the_same_trajectory(world, tmp_path, tiny_student_dir):
    _, full = _train(world, tiny_student_dir, tmp_path / "full", max_steps=6, save_steps=3)
    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):
        """Stops the run right after the step-3 checkpoint, as a crash would."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                control.should_save = True
                control.should_training_stop = True

    partial_out = tmp_path / "partial"
    _train(world, tiny_student_dir, partial_out, callbacks=[Interrupt()], max_steps=6, save_steps=3)
    shutil.rmtree(partial_out / "checkpoints" / "checkpoint-6", ignore_errors=True)
    _, resumed = _train(world, tiny_student_dir, partial_out, max_steps=6, save_steps=3, resume=True)
    by_step = {r["step"]: r for r in full if "loss" in r}
    after = [r for r in resumed if "loss" in r and r["step"] > 3]
    assert [r["step"] for r in after] == [4, 5, 6]
    for r in after:
        for term in TERMS:
            assert r[f"loss_{term}"] == pytest.approx(by_step[r["step"]][f"loss_{term}"], rel=1e-4, abs=1e-8)


def _refusal(world, student, tmp_path, cache=None):
    result = CliRunner().invoke(main, ["distill", "--student", str(student),
                                       "--cache", cache or world["caches"]["topk"].out,
                                       "--out", str(tmp_path / "run"), "--max-steps", "1", "--no-progress"])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before any step
    return result.output


def test_refuses_vocabulary_mismatch(world, tmp_path):
    words = "completely different words for another tokenizer".split()
    student = build_tiny_llava(tmp_path / "s", TinyLlavaSpec(hidden_size=32, num_heads=2), words=words)
    assert "vocabulary" in _refusal(world, student, tmp_path)


def test_refuses_tokenizer_mismatch(world, tmp_path):
    from alignkd.demo.tiny_models import BASE_WORDS

    words = list(reversed(BASE_WORDS))  # same size, different ids
    student = build_tiny_llava(tmp_path / "s", TinyLlavaSpec(hidden_size=32, num_heads=2), words=words)
    assert "does not map the cached text" in _refusal(world, student, tmp_path)


def test_refuses_vision_token_mismatch(world, tmp_path):
    student = build_tiny_llava(tmp_path / "s", TinyLlavaSpec(hidden_size=32, num_heads=2, patch_size=16))
    out = _refusal(world, student, tmp_path)
    assert "4 image tokens" in out and "teacher saw 16" in out


def test_refuses_corrupt_shard(world, tmp_path, tiny_student_dir):
    cache = tmp_path / "cache"
    shutil.copytree(world["caches"]["topk"].out, cache)
    target = cache / "shards" / "shard-000001" / "attn" / "c" / "0"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    out = _refusal(world, tiny_student_dir, tmp_path, cache=str(cache))
    assert "shard-000001" in out


def test_bad_options_are_one_sentence(world, tmp_path, tiny_student_dir):
    runner = CliRunner()
    for args, needle in [(["--w-ce", "0", "--w-logit", "0", "--w-attn", "0", "--w-vis", "0"], "every loss weight"),
                         (["--temperature", "0"], "--temperature"),
                         (["--align-fade", "1.5"], "--align-fade"),
                         (["--freeze", "no_such_part"], "no_such_part")]:
        result = runner.invoke(main, ["distill", "--student", str(tiny_student_dir), "--cache",
                                      world["caches"]["topk"].out, "--out", str(tmp_path / "r"),
                                      "--max-steps", "1", "--no-progress", *args])
        assert result.exit_code == 1, result.output
        assert needle in result.output and "Traceback" not in result.output


KILL_MID_CHECKPOINT = """
import os, signal, sys
from transformers import Trainer
from alignkd.distill.run import DistillConfig, distill

save_rng_state = Trainer._save_rng_state

def die_mid_checkpoint(self, output_dir):
    # model and optimizer of checkpoint-6 are on disk, trainer_state.json is not yet
    if self.state.global_step == 6:
        os.kill(os.getpid(), signal.SIGKILL)
    return save_rng_state(self, output_dir)

Trainer._save_rng_state = die_mid_checkpoint
distill(DistillConfig(student=sys.argv[1], cache=sys.argv[2], out=sys.argv[3], batch_size=4, lr=3e-3,
                      logging_steps=1, progress=False, max_steps=6, save_steps=3))
"""


def _run_until_killed(script: str, student, cache, out) -> None:
    """Run a distill `script` in a fresh interpreter; it must end by SIGKILL."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script, str(student), str(cache), str(out)], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def test_killed_mid_checkpoint_resumes_to_the_same_losses_without_repeated_steps(world, tmp_path,
                                                                                 tiny_student_dir):
    _, full = _train(world, tiny_student_dir, tmp_path / "full", max_steps=6, save_steps=3)
    out = tmp_path / "killed"
    _run_until_killed(KILL_MID_CHECKPOINT, tiny_student_dir, world["caches"]["topk"].out, out)
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1] == 6  # steps 4-6 were logged before the kill and will be run again
    assert not (out / "checkpoints" / "checkpoint-6" / "trainer_state.json").exists()
    _, resumed = _train(world, tiny_student_dir, out, max_steps=6, save_steps=3, resume=True)
    steps = [r["step"] for r in resumed if "loss" in r]
    assert steps == list(range(1, 7))  # each step once
    assert sum("train_runtime" in r for r in resumed) == 1
    by_step = {r["step"]: r for r in full if "loss" in r}
    for r in resumed:
        for term in TERMS if "loss" in r else ():
            assert r[f"loss_{term}"] == pytest.approx(by_step[r["step"]][f"loss_{term}"], rel=1e-4, abs=1e-8)


KILL_MID_EXPORT = """
import os, signal, sys
from alignkd.distill import export
from alignkd.distill.run import DistillConfig, distill

replace = os.replace

def die_before_config(src, dst):
    # every other exported file (the weights too) is in place; config.json is not yet
    if os.path.basename(dst) == "config.json":
        os.kill(os.getpid(), signal.SIGKILL)
    return replace(src, dst)

export.os.replace = die_before_config
distill(DistillConfig(student=sys.argv[1], cache=sys.argv[2], out=sys.argv[3], batch_size=4, lr=3e-3,
                      logging_steps=1, progress=False, max_steps=4, save_steps=2))
"""


def test_killed_during_export_leaves_no_complete_looking_student_and_resume_finishes(world, tmp_path,
                                                                                     tiny_student_dir):
    import safetensors.torch
    from transformers import AutoModelForImageTextToText

    _train(world, tiny_student_dir, tmp_path / "full", max_steps=4, save_steps=2)
    out = tmp_path / "killed"
    _run_until_killed(KILL_MID_EXPORT, tiny_student_dir, world["caches"]["topk"].out, out)
    assert (out / "model.safetensors").is_file() and not (out / "config.json").exists()
    with pytest.raises((OSError, ValueError)):  # not a model yet: from_pretrained refuses, loads nothing
        AutoModelForImageTextToText.from_pretrained(out)
    eval_refusal = CliRunner().invoke(main, ["eval", "--model", str(out), "--data", str(world["manifest"]),
                                             "--images", str(world["images"]), "--no-progress"])
    assert eval_refusal.exit_code == 1 and "has no config.json" in eval_refusal.output

    summary, logged = _train(world, tiny_student_dir, out, max_steps=4, save_steps=2, resume=True)
    assert summary.steps == 4 and [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4]
    assert not (out / ".tmp-export").exists()
    AutoModelForImageTextToText.from_pretrained(out)
    for name in ("model.safetensors", "adapters.safetensors"):
        got, want = safetensors.torch.load_file(out / name), safetensors.torch.load_file(tmp_path / "full" / name)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name


def test_temperature_needs_a_topk_cache(world, tiny_student_dir, tmp_path):
    from alignkd.errors import ConfigError

    cfg = DistillConfig(student=str(tiny_student_dir), cache=world["caches"]["sampled"].out, out=str(tmp_path / "o"),
                        max_steps=1, temperature=2.0, progress=False, workers=0)
    with pytest.raises(ConfigError, match="--temperature 2.0 needs a cache built with --logit-mode topk"):
        distill(cfg)
