"""Manifests shaped like LLaVA-665K and LLaVA-OneVision, written in code (no download).

`write_llava665k(path, scale)` writes a JSON list with LLaVA-v1.5-mix665k's subset
proportions (coco 364,100, vg 86,417, gqa 72,140, ocr_vqa 80,000, textvqa 21,953, text
only 40,688) at `scale` (1.0 = 665,298 records), ids as that file spells them (COCO's are
the image's file name, so an image asked about in several conversations repeats its id),
2-6 turns of LLaVA-length text each. Images are named, not written: the scale benchmark
plans and parses; `write_images(paths, root)` writes one small shared PNG under every name
a slice that is really built needs.

`write_onevision_mix(root, scale)` writes a LLaVA-OneVision-style YAML mixture of six
sources, each with its own image root and sampling strategy: the LLaVA-665K list (JSON),
a chat-format JSONL, a Parquet file with image bytes, a Hugging Face dataset repository
(`data/train-0000k-of-00002.parquet`, an unread `data_source` column), a text-only JSON
list and a JSON list with a video record and a missing image among its records.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SUBSETS = {  # name: (records, distinct images, image path pattern, id pattern)
    "coco": (364_100, 118_287 // 1, "coco/train2017/{n:012d}.jpg", "{n:012d}"),
    "vg": (86_417, 86_417, "vg/VG_100K/{n}.jpg", "{n}"),
    "gqa": (72_140, 72_140 // 2, "gqa/images/n{n}.jpg", "n{n}"),
    "ocr_vqa": (80_000, 80_000, "ocr_vqa/images/{n}.jpg", "{n}"),
    "textvqa": (21_953, 21_953, "textvqa/train_images/{n:016x}.jpg", "{n:016x}"),
    "text": (40_688, 0, None, "i{n:08x}_0"),
}
WORDS = ("what is the man doing in this picture describe the scene how many people are there is it sunny "
         "left right red blue a an the of on in with near above below").split()


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _record(rng: random.Random, subset: str, n: int) -> dict:
    _, _, image, ident = SUBSETS[subset]
    turns = []
    for k in range(rng.randint(1, 3)):
        question = _sentence(rng, 6, 20) + " ?"
        turns += [{"from": "human", "value": ("<image>\n" if k == 0 and image else "") + question},
                  {"from": "gpt", "value": _sentence(rng, 10, 60) + " ."}]
    rec = {"id": ident.format(n=n), "conversations": turns}
    if image:
        rec["image"] = image.format(n=n)
    return rec


def llava665k_records(scale: float = 1.0, seed: int = 0):
    """The records, subsets interleaved as in the published file (shuffled)."""
    rng = random.Random(seed)
    plan = []
    for subset, (records, images, _, _) in SUBSETS.items():
        count = round(records * scale)
        distinct = max(1, round(images * scale)) if images else count
        plan += [(subset, rng.randrange(distinct) if images else i) for i in range(count)]
    rng.shuffle(plan)
    for subset, n in plan:
        yield subset, _record(rng, subset, n)


def write_llava665k(path: Path, scale: float = 1.0, seed: int = 0) -> dict:
    """Write the JSON list (one record a line, as json.dump(indent=None) would not) and
    return the records per subset."""
    counts: dict[str, int] = {}
    with Path(path).open("w") as f:
        f.write("[\n")
        for i, (subset, rec) in enumerate(llava665k_records(scale, seed)):
            f.write(("," if i else "") + json.dumps(rec) + "\n")
            counts[subset] = counts.get(subset, 0) + 1
        f.write("]\n")
    return counts


def _chat(rng: random.Random, image: bool) -> list[dict]:
    """A chat-format ("messages") exchange, ShareGPT4V/OneVision style."""
    user = ([{"type": "image"}] if image else []) + [{"type": "text", "text": _sentence(rng, 6, 20) + " ?"}]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": _sentence(rng, 10, 60) + " ."}]


def png_bytes(size: int = 32) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 40, 40)).save(buf, format="PNG")
    return buf.getvalue()


def write_images(paths, root: Path) -> int:
    """One small PNG under every distinct name in `paths` (LLaVA's .jpg names too: the
    image loader reads the bytes, not the suffix); returns how many it wrote."""
    data, written = png_bytes(), set()
    for name in paths:
        if name not in written:
            (Path(root) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(root) / name).write_bytes(data)
            written.add(name)
    return len(written)


def _parquet_rows(rng: random.Random, prefix: str, n: int, image: bytes) -> pa.Table:
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    turns = [[{"from": "human", "value": "<image>\n" + _sentence(rng, 6, 20) + " ?"},
              {"from": "gpt", "value": _sentence(rng, 10, 60) + " ."}] for _ in range(n)]
    return pa.table({"id": [f"{prefix}{i % max(1, n // 2)}" for i in range(n)],  # repeated ids here too
                     "image": pa.array([{"bytes": image, "path": f"{prefix}{i}.png"} for i in range(n)], struct),
                     "conversations": turns, "data_source": [prefix] * n})


def _image_names(path: Path):
    from alignkd.data.manifest import iter_manifest

    return (ref.path for rec in iter_manifest(path) for ref in rec.images)


# (name, file, sampling strategy, records at scale 1.0): every strategy kind, counts and percentages
# (LLaVA-665K last: a --limit slice of a small mixture then holds some of every source)
MIX = [("sharegpt4v", "sharegpt4v.jsonl", "first:30%", 100_000),
       ("ocr", "ocr.parquet", "end:20%", 50_000),
       ("docs", "docs", "random:30%", 20_000),
       ("text", "text.json", "all", 40_000),
       ("odd", "odd.json", "first:10", 20_000),
       ("llava665k", "llava_v1_5_mix665k.json", "random:50%", None)]


PATH_IMAGES = ("llava665k", "sharegpt4v", "odd")  # the sources whose images are files under their root


def write_onevision_mix(root: Path, scale: float = 1.0, seed: int = 0, images: bool = False) -> tuple[Path, dict]:
    """The YAML mixture and its files under `root`, with `images`, every image its JSON and
    JSONL records name but one missing on purpose; returns (yaml path, records per source)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    counts = {}
    for name, file, _, full in MIX:
        n = max(12, round(full * scale)) if full else None
        path = root / file
        if name == "llava665k":
            n = sum(write_llava665k(path, scale, seed).values())
        elif name == "sharegpt4v":
            path.write_text("".join(json.dumps({"id": f"sg{i}", "image": f"sg/{i}.png", "messages": _chat(rng, True)})
                                    + "\n" for i in range(n)))
        elif name == "ocr":
            pq.write_table(_parquet_rows(rng, "ocr", n, png_bytes()), path, row_group_size=max(1, n // 4))
        elif name == "docs":
            (path / "data").mkdir(parents=True, exist_ok=True)
            half = n // 2
            for k, part in enumerate((half, n - half)):
                pq.write_table(_parquet_rows(rng, f"doc{k}-", part, png_bytes()),
                               path / "data" / f"train-0000{k}-of-00002.parquet")
        elif name == "text":
            path.write_text(json.dumps([{"id": f"t{i}", "conversations": _record(rng, "text", i)["conversations"]}
                                        for i in range(n)]))
        else:  # the records a mixture also meets: a video clip, a missing image, an exact repeat
            recs = [_record(rng, "coco", i) for i in range(n)]
            recs[1] = {"id": "clip1", "video": "clips/v1.mp4",
                       "conversations": [{"from": "human", "value": "<video>\nwhat happens ?"},
                                         {"from": "gpt", "value": "a man runs ."}]}
            recs[2] = {**recs[2], "image": "nowhere/missing.jpg"}
            recs[3] = recs[0]
            path.write_text(json.dumps(recs))
        counts[name] = n
        if images and name in PATH_IMAGES:
            write_images((p for p in _image_names(path) if not p.startswith("nowhere/")), root / "images" / name)
    entries = "".join(f"  - json_path: {file}\n    sampling_strategy: \"{strategy}\"\n"
                      + (f"    images: images/{name}\n" if name in PATH_IMAGES else "")  # Parquet: bytes
                      for name, file, strategy, _ in MIX)
    mix = root / "onevision_mix.yaml"
    mix.write_text("# LLaVA-OneVision style: one entry per source, each sampled its own way\ndatasets:\n" + entries)
    return mix, counts
