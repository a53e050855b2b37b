"""GPU figures at real shapes with random-initialised models (no weights needed): one script, < 8 min on one GPU.

Teacher: Vicuna-7B-shaped Llama (d 4096, 32 layers, 32 heads, MLP 11008, vocabulary 32000)
under a CLIP-L/14 tower (d 1024, 24 layers) at 336 px (576 vision tokens) or at 168 px
(144 tokens, the count MobileVLM's projector pools 576 down to), bf16. Student:
MobileLLaMA-1.4B-shaped (d 2048, 24 layers, 16 heads, MLP 5632) under the same tower.

It reports, as absolute GPU numbers:
  1. capture overhead: `capture_forward` against a plain sdpa forward of the teacher;
  2. cache build samples/s (capture + per-sample records + CacheWriter.add, i.e. the build
     loop minus image decoding) against a plain forward;
  3. the distill step from the cache against CE only and against online KD (teacher
     forward + targets + the same objective), forward + backward + AdamW;
  4. peak memory of online KD (teacher and student resident) against offline (student only).

    python bench/gpu_check.py [--vision-tokens 576] [--batch 4] [--text 300] [--repeats 5] [--json out.json]
    python bench/gpu_check.py --tiny --device cpu     # the same code path at tiny shapes, to check it runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace

VOCAB = 32000
PREFIX = 35  # system prompt and "USER:" before the image


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vision-tokens", type=int, choices=(144, 576), default=576)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--text", type=int, default=300, help="text tokens after the image per sample")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per measure (medians reported)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test of this script)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    return ap.parse_args(argv)


def specs(args):
    from alignkd.demo.tiny_models import TinyLlavaSpec

    if args.tiny:
        t = TinyLlavaSpec(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, image_size=32, patch_size=8)
        return t, replace(t, hidden_size=32, num_heads=2, intermediate_size=64)
    image = 336 if args.vision_tokens == 576 else 168
    clip = dict(image_size=image, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16)
    teacher = TinyLlavaSpec(hidden_size=4096, num_layers=32, num_heads=32, intermediate_size=11008, **clip)
    student = TinyLlavaSpec(hidden_size=2048, num_layers=24, num_heads=16, intermediate_size=5632, **clip)
    return teacher, student


def build_model(spec, device, dtype, tiny: bool):
    import torch
    from transformers import LlavaForConditionalGeneration

    from alignkd.demo.tiny_models import build_llava_config, build_word_tokenizer

    tok = build_word_tokenizer()
    config = build_llava_config(tok, spec)
    config.vision_config.intermediate_size = 4 * spec.vision_hidden
    if not tiny:
        config.text_config.vocab_size = VOCAB
        config.text_config.max_position_embeddings = 4096
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval(), tok


def make_batch(args, spec, tok, device, dtype, seed=0):
    """Right-padded batch: prefix, the image tokens, then text; the last half of the text is the answer."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n_img = spec.num_image_tokens
    n_words = len(tok)
    image_id = tok.convert_tokens_to_ids("<image>")
    ids = torch.randint(5, n_words, (args.batch, PREFIX + n_img + args.text), generator=g)
    ids[:, PREFIX:PREFIX + n_img] = image_id
    labels = ids.clone()
    labels[:, : PREFIX + n_img + args.text // 2] = -100
    pixels = torch.randn(args.batch, 3, spec.image_size, spec.image_size, generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device, dtype), "labels": labels.to(device)}


def timed(fn, repeats: int, device) -> float:
    import torch

    fn()  # warm-up (kernels, allocator)
    times = []
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def records_for(batch, cap):
    from alignkd.cache.teacher_pass import batch_samples, records_from_capture

    return records_from_capture(batch_samples(batch, cap), batch, cap, logit_mode="topk", logit_k=16,
                                logit_samples=64, positions_policy="response", seed=0, store_images=False)


def student_batch(records, pixels, device):
    from alignkd.distill.dataset import collate_distill, item_from_record

    items = [item_from_record(r, {"pixel_values": pixels[b:b + 1].cpu()}) for b, r in enumerate(records)]
    batch = collate_distill(items, pad_token_id=0)
    return {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from alignkd.cache.reader import open_cache
    from alignkd.cache.writer import CacheWriter
    from alignkd.distill.objective import AlignKDObjective, LossWeights
    from alignkd.models import capture_forward

    dev, dtype = args.device, torch.float32 if args.tiny else torch.bfloat16
    t_spec, s_spec = specs(args)
    teacher, tok = build_model(t_spec, dev, dtype, args.tiny)
    batch = make_batch(args, t_spec, tok, dev, dtype)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out: dict = {"shapes": {"vision_tokens": t_spec.num_image_tokens, "batch": args.batch,
                            "seq": batch["input_ids"].shape[1], "device": dev, "dtype": str(dtype)}}

    with torch.no_grad():
        plain = timed(lambda: teacher(**inputs), args.repeats, dev)
    capture = timed(lambda: capture_forward(teacher, inputs), args.repeats, dev)
    out["capture"] = {"plain_s": plain, "capture_s": capture, "ratio": capture / plain}

    cache = tempfile.mkdtemp(prefix="gpu-check-cache-")
    meta = {"teacher_shapes": {"vocab_size": teacher.config.text_config.vocab_size}}
    with CacheWriter(cache + "/c", meta) as writer:
        def build_step():
            for r in records_for(batch, capture_forward(teacher, inputs)):
                r.sample_id = f"{r.sample_id}-{time.perf_counter_ns()}"
                writer.add(r)
        build = timed(build_step, args.repeats, dev)
    out["build"] = {"plain_samples_s": args.batch / plain, "build_samples_s": args.batch / build,
                    "ratio": build / plain}

    student, _ = build_model(s_spec, dev, dtype, args.tiny)
    student.train()
    objective = AlignKDObjective(student, teacher_heads=t_spec.num_heads, teacher_dim=t_spec.hidden_size,
                                 weights=LossWeights(), logit_mode="topk", logit_samples=64).to(dev)
    opt = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-5)
    reader = open_cache(cache + "/c", images=False)

    def step(b):
        opt.zero_grad(set_to_none=True)
        objective(**b)["loss"].backward()
        opt.step()

    def from_cache():
        step(student_batch([reader.get(i, widen=False) for i in range(args.batch)], batch["pixel_values"], dev))

    def online():
        with torch.no_grad():
            cap = capture_forward(teacher, inputs)
        step(student_batch(records_for(batch, cap), batch["pixel_values"], dev))

    peaks = {}
    online_s = timed(online, args.repeats, dev)
    peaks["online_gb"] = torch.cuda.max_memory_allocated() / 2**30 if dev != "cpu" else float("nan")
    del teacher
    if dev != "cpu":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cached_s = timed(from_cache, args.repeats, dev)
    peaks["offline_gb"] = torch.cuda.max_memory_allocated() / 2**30 if dev != "cpu" else float("nan")
    objective.weights = LossWeights(ce=1.0, logit=0.0, vis=0.0, attn=0.0)
    ce_batch = student_batch([reader.get(i, widen=False) for i in range(args.batch)], batch["pixel_values"], dev)
    ce_s = timed(lambda: step(ce_batch), args.repeats, dev)
    out["distill_step"] = {"ce_only_s": ce_s, "from_cache_s": cached_s, "online_kd_s": online_s,
                           "cache_vs_ce": cached_s / ce_s, "online_vs_cache": online_s / cached_s}
    out["peak_memory"] = peaks
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    main()
