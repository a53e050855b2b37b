"""Tensor bytes per sample of a Qwen2.5-VL cache, `--attn-store maps` beside `layer0` (issue 24).

The issue's check (tiny Qwen2.5-VL weights saved in the published processor layout, real
photos, each image asked about twice) is not in the repository; this rebuilds it as closely
as the box allows: the tiny `qwen2_5_vl` teacher of tests/families_tiny.py (published layout:
preprocessor_config.json + chat_template.json), scikit-learn's two sample photos (china.jpg,
flower.jpg) and crops of them, every image in two records with different questions, the CLI's
default build options, and then the same data with `--attn-store layer0`, and the maps cache
with `--no-share-vision` (format v4 had no vision sharing). `--max-pixels` raises the tiny
processor's pixel budget (tests keep images at <= 96x96 px, 36 vision tokens); the default,
62,000 px, gives a photo ~240 vision tokens, what the issue's 11,639 vision bytes per sample
(d 64, bf16 under lz4 ~1.34x, one copy per two samples) imply. "Tensor bytes" are the zarr
arrays' bytes on disk (`cache stats`' kinds) over the samples.

    .venv/bin/python -m bench.qwen_layout_bytes
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

QUESTIONS = ["what is the colour of this image ?", "how many red circle are left of the green square ?",
             "is the blue shape right of this image ? yes or no ?", "what shape is left ?"]
ANSWERS = ["red", "2", "no", "square"]


def photos(root: Path, n: int) -> list[str]:
    """n images: the two photos whole and crops of them at different sizes."""
    from sklearn.datasets import load_sample_images

    base = load_sample_images().images  # two 427x640 RGB photos
    names = []
    for i in range(n):
        img = Image.fromarray(base[i % 2])
        if i >= 2:  # a crop: each image a different size and content
            w, h = img.size
            s = 0.9 ** (i // 2)
            left, top = int((w - w * s) * (i % 3) / 2), int((h - h * s) * ((i + 1) % 3) / 2)
            img = img.crop((left, top, left + int(w * s), top + int(h * s)))
        names.append(f"{i}.jpg")
        img.save(root / names[-1], quality=90)
    return names


def manifest(root: Path, n_images: int) -> tuple[Path, Path]:
    images = root / "images"
    images.mkdir(parents=True)
    records = []
    for i, name in enumerate(photos(images, n_images)):
        for q in range(2):  # each image asked about twice
            k = (i + q) % len(QUESTIONS)
            records.append({"id": f"p{i}q{q}", "image": name, "conversations": [
                {"from": "human", "value": f"<image>\n{QUESTIONS[k]}"}, {"from": "gpt", "value": ANSWERS[k]}]})
    path = root / "data.json"
    path.write_text(json.dumps(records))
    return path, images


def tensor_bytes(cache: Path) -> tuple[float, dict]:
    from alignkd.cache.inspection.stats import cache_stats
    from alignkd.storage_schemas import ARRAY_KINDS

    s = cache_stats(cache)
    per = {k: s["bytes_on_disk"].get(k, 0) / s["samples"] for k in ARRAY_KINDS}
    return sum(per.values()), per | {"kit": s.get("layer0_kit_bytes", 0), "samples": s["samples"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--default-only", action="store_true",
                        help="only the default build (to run this against an older checkout, e.g. format v4)")
    parser.add_argument("--max-pixels", type=int, default=62_000, help="the processor's longest_edge (pixels)")
    args = parser.parse_args()
    from tests.families_tiny import build_family

    from alignkd.cache.teacher.build import BuildConfig, build_cache

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher = build_family("qwen2_5_vl", root / "teacher", "teacher", seed=0)
        config = teacher / "preprocessor_config.json"
        doc = json.loads(config.read_text())
        doc["size"]["longest_edge"] = args.max_pixels
        config.write_text(json.dumps(doc))
        data, images = manifest(root, args.images)
        runs = {"maps (default)": {}, "layer0": {"attn_store": "layer0"},
                "maps --no-share-vision": {"share_vision": False}}
        if args.default_only:
            runs = {"maps (default)": {}}
        rows = {}
        for name, kw in runs.items():
            out = root / name.split()[0] / str(len(rows))
            build_cache(BuildConfig(teacher=str(teacher), data=str(data), images=str(images), out=str(out),
                                    progress=False, **kw))
            rows[name] = tensor_bytes(out)
        kinds = [k for k in next(iter(rows.values()))[1] if k not in ("kit", "samples")]
        print(f"{rows['maps (default)'][1]['samples']} samples, {args.images} images each asked twice, "
              f"max {args.max_pixels:,} px an image")
        print("| store | tensor B/sample | " + " | ".join(kinds) + " | kit B (once) | / maps (default) |")
        print("|---|---|" + "---|" * (len(kinds) + 2))
        base = rows["maps (default)"][0]
        for name, (total, per) in rows.items():
            print(f"| {name} | {total:,.0f} | " + " | ".join(f"{per[k]:,.0f}" for k in kinds)
                  + f" | {per['kit']:,} | {total / base:.3f} |")


if __name__ == "__main__":
    main()
