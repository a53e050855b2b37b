"""Capture overhead: capture_forward vs a plain sdpa forward on a medium LLaVA.

The probe runs layer 0 with eager attention (it must materialise the L×L probabilities)
and sdpa everywhere else; this measures what that costs against an all-sdpa forward of
the same weights. The two variants run interleaved, alternating which goes first, so
other processes sharing the cores slow both alike; the table reports medians.

    .venv/bin/python -m bench.capture_overhead            # 2 threads, 9 repeats
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from alignkd.demo.tiny_models import BASE_WORDS, TinyLlavaSpec, build_tiny_llava
from alignkd.models import capture_forward, load_vlm
from alignkd.models.attention_probe import probe_attention_forward

# 8 layers, d=512, 336px / patch 14 -> 24*24 = 576 image tokens; a 2-layer d=64 CLIP tower
# keeps the vision side small so the timing is about the language model.
SPEC = TinyLlavaSpec(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1376,
                     image_size=336, patch_size=14, vision_hidden=64, vision_layers=2, vision_heads=2)


def make_batch(processor, words: tuple[int, int]) -> dict:
    rng = np.random.default_rng(0)
    texts, images = [], []
    for n in words:
        question = " ".join(rng.choice(BASE_WORDS[4:], size=n))
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        texts.append(processor.apply_chat_template(messages, add_generation_prompt=True))
        images.append(Image.fromarray(rng.integers(0, 255, (336, 336, 3), dtype=np.uint8)))
    processor.tokenizer.padding_side = "left"
    return dict(processor(text=texts, images=images, return_tensors="pt", padding=True))


def time_call(fn, device: str) -> tuple[float, float]:
    """(wall, process CPU) seconds. CPU time is less sensitive to other jobs on shared cores."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def layer0_variants(model, batch: dict, device: str) -> dict:
    """Layer-0 attention alone, probe (eager + weights) vs sdpa, on the batch's real mask.

    The whole-forward ratio is what users pay; this isolates the one thing the probe
    changes, so the overhead shows even when shared cores make whole forwards noisy.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    capture_forward(model, batch)  # installs the probe so the layer-0 module takes the eager path
    attn = model.model.language_model.layers[0].self_attn
    cfg = model.config.text_config
    B, L = batch["input_ids"].shape
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    dtype = next(model.parameters()).dtype
    q, k, v = (torch.randn(B, cfg.num_attention_heads, L, head_dim, device=device, dtype=dtype) for _ in range(3))
    pad = batch["attention_mask"].bool()
    mask = torch.ones(L, L, dtype=torch.bool, device=device).tril()[None, None] & pad[:, None, None, :]

    def probe():
        with torch.no_grad():
            probe_attention_forward(attn, q, k, v, mask, scaling=head_dim**-0.5)

    def sdpa():
        with torch.no_grad():
            sdpa_attention_forward(attn, q, k, v, mask, scaling=head_dim**-0.5)

    return {"layer 0 sdpa": sdpa, "layer 0 probe (eager)": probe}


def measure(variants: dict, repeats: int, device: str) -> tuple[dict, dict]:
    """Interleaved (wall, CPU) samples per variant, alternating which one goes first."""
    for fn in variants.values():  # warm-up: allocator, first-call dispatch
        fn()
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(repeats):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            w, c = time_call(variants[name], device)
            wall[name].append(w)
            cpu[name].append(c)
    return wall, cpu


def print_table(wall: dict, cpu: dict) -> None:
    names = list(wall)
    base, cpu_base = statistics.median(wall[names[0]]), statistics.median(cpu[names[0]])
    print("| variant | wall median s | wall min s | wall ratio (medians) | wall ratio (paired) "
          "| CPU median s | CPU ratio |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        med, cmed = statistics.median(wall[name]), statistics.median(cpu[name])
        # Pairs ran back to back, so their ratio is robust to load changing mid-run.
        paired = statistics.median(a / b for a, b in zip(wall[name], wall[names[0]]))
        print(f"| {name} | {med:.4f} | {min(wall[name]):.4f} | {med / base:.3f} | {paired:.3f} "
              f"| {cmed:.4f} | {cmed / cpu_base:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_llava(tmp, SPEC, seed=0)
        probed, plain = (load_vlm(model_dir, dtype=args.dtype, device=args.device) for _ in range(2))
    batch = make_batch(probed.processor, words=(66, 50))
    batch["pixel_values"] = batch["pixel_values"].to(getattr(torch, args.dtype))
    batch = {k: v.to(args.device) for k, v in batch.items()}
    B, L = batch["input_ids"].shape

    def run_plain():
        with torch.no_grad():
            plain.model(**batch, use_cache=False)

    def run_capture():
        capture_forward(probed.model, batch)

    variants = {"plain sdpa forward": run_plain, "capture_forward": run_capture}
    print(f"LLaVA: {SPEC.num_layers} layers, d={SPEC.hidden_size}, {SPEC.num_heads} heads, "
          f"{SPEC.num_image_tokens} image tokens; batch {B} x {L} tokens (left-padded), {args.dtype}, "
          f"{args.device}, {args.threads} threads, {args.repeats} interleaved repeats")
    print_table(*measure(variants, args.repeats, args.device))
    print()
    print_table(*measure(layer0_variants(probed.model, batch, args.device), 5 * args.repeats, args.device))


if __name__ == "__main__":
    main()
