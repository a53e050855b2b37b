"""Build overhead: `build_cache` vs a plain teacher forward over the same data and batches.

Both variants load the teacher, read the manifest, render and collate the same batches
(same batch size, same right padding) and run the teacher once per batch; the plain one
uses an all-sdpa forward with no capture and writes nothing, so the ratio isolates what
the cache adds: the layer-0 probe, cutting per-sample records, sparse logit encoding,
and the writer (bf16 rounding, crc32, blosc, parquet, fsync, catalog) on its background
thread. The variants run interleaved, alternating which goes first, so other jobs on the
shared cores slow both alike; the table reports medians and the median of paired ratios.

    .venv/bin/python -m bench.build_overhead                 # 1 torch thread, 256 samples, 5 repeats
    .venv/bin/python -m bench.build_overhead --threads 2
    .venv/bin/python -m bench.build_overhead --profile       # cProfile of one build, main thread
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from alignkd.cache.teacher.build import BuildConfig, build_cache
from alignkd.demo.tiny_models import TinyLlavaSpec, build_tiny_llava
from tests.support.world import image_records, turns, write_manifest

# Llama LM d=256, 4 layers, 8 heads; 64 px / patch 8 -> 64 image tokens; a 2-layer d=64 CLIP.
SPEC = TinyLlavaSpec(hidden_size=256, num_layers=4, num_heads=8, intermediate_size=688,
                     image_size=64, patch_size=8, vision_hidden=64, vision_layers=2, vision_heads=2)
ANSWERS = ["red", "blue circle", "yes", "no", "green square above the red cross", "3", "left", "a yellow triangle"]


def write_dataset(root: Path, n: int) -> tuple[Path, Path]:
    """n single- and multi-turn records with random 64 px PNGs (so rows differ in length)."""
    def conversation(i: int, rng) -> list[dict]:
        first = ("what is the colour shape of this image ?", ANSWERS[i % len(ANSWERS)])
        return turns(first, *([("how many are there ?", str(i % 10))] if i % 3 == 2 else []))

    images = root / "images"
    return write_manifest(root / "data.json", image_records(images, n, conversation, size=64)), images


def plain_forward(cfg: BuildConfig) -> None:
    """What a build does minus capture and writing: load, render, collate, sdpa forward."""
    from alignkd.data import collate, read_manifest, render_sample
    from alignkd.models import load_vlm

    vlm = load_vlm(cfg.teacher, dtype=cfg.dtype, device=cfg.device)
    records = read_manifest(cfg.data)
    pad_id = vlm.processor.tokenizer.pad_token_id
    for start in range(0, len(records), cfg.batch_size):
        rendered = [render_sample(r, vlm.processor, cfg.images, cfg.max_length)
                    for r in records[start:start + cfg.batch_size]]
        batch = collate(rendered, pad_token_id=pad_id, padding_side="right")
        inputs = {k: v.to(cfg.device) for k, v in batch.items() if k != "labels"}
        inputs["pixel_values"] = inputs["pixel_values"].to(vlm.model.dtype)
        with torch.no_grad():
            vlm.model(**inputs, use_cache=False)


def measure(base: BuildConfig, work: Path, repeats: int) -> dict[str, list[float]]:
    runs = {"plain sdpa forward": lambda out: plain_forward(base),
            "build_cache": lambda out: build_cache(BuildConfig(**{**base.__dict__, "out": str(out)}))}
    for name, fn in runs.items():  # warm-up: imports, allocator, first-call dispatch
        fn(work / f"warm-{name[:5]}")
    wall: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(repeats):
        for name in (list(runs) if r % 2 == 0 else list(reversed(runs))):
            out = work / f"cache-{r}"
            start = time.perf_counter()
            runs[name](out)
            wall[name].append(time.perf_counter() - start)
            shutil.rmtree(out, ignore_errors=True)
    return wall


def print_table(wall: dict[str, list[float]], n: int) -> None:
    names = list(wall)
    base = statistics.median(wall[names[0]])
    print("| variant | wall median s | wall min s | samples/s | ratio (medians) | ratio (paired) |")
    print("|---|---|---|---|---|---|")
    for name in names:
        med = statistics.median(wall[name])
        # pairs ran back to back, so their ratio is robust to load changing mid-run
        paired = statistics.median(a / b for a, b in zip(wall[name], wall[names[0]]))
        print(f"| {name} | {med:.3f} | {min(wall[name]):.3f} | {n / med:.0f} | {med / base:.3f} | {paired:.3f} |")


def profile_build(base: BuildConfig, work: Path, top: int = 25) -> None:
    """cProfile of one build. Only the main thread is profiled: writer-thread time shows up
    as `queue.put`/`_thread.lock.acquire` waits when the writer cannot keep up."""
    cfg = BuildConfig(**{**base.__dict__, "out": str(work / "profiled")})
    prof = cProfile.Profile()
    prof.runcall(build_cache, cfg)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(top)
    print(out.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 leaves the second core to the writer thread, as a GPU teacher would")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher = build_tiny_llava(root / "teacher", SPEC, seed=0)
        data, images = write_dataset(root, args.samples)
        base = BuildConfig(teacher=str(teacher), data=str(data), images=str(images), out=str(root / "unused"),
                           batch_size=args.batch_size, shard_size=args.shard_size, progress=False)
        if args.profile:
            profile_build(base, root)
            return
        print(f"LLaVA: {SPEC.num_layers} layers, d={SPEC.hidden_size}, {SPEC.num_heads} heads, "
              f"{SPEC.num_image_tokens} image tokens, fp32 cpu, {args.threads} torch thread(s); "
              f"{args.samples} samples, batch {args.batch_size}, shard {args.shard_size}, "
              f"top-32 logits, bf16 attn/vision, images stored; {args.repeats} interleaved repeats")
        print_table(measure(base, root, args.repeats), args.samples)


if __name__ == "__main__":
    main()
