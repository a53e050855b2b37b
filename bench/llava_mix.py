"""Manifests shaped like LLaVA-665K and LLaVA-OneVision, written in code (no download).

`write_llava665k(path, scale)` writes a JSON list with LLaVA-v1.5-mix665k's subset
proportions (coco 364,100, vg 86,417, gqa 72,140, ocr_vqa 80,000, textvqa 21,953, text
only 40,688) at `scale` (1.0 = 665,298 records), ids as that file spells them (COCO's are
the image's file name, so an image asked about in several conversations repeats its id),
2-6 turns of LLaVA-length text each. Images are named, not written: the scale benchmark
plans and parses; `images_for(records, root)` writes small shared PNGs for a slice that is
really built.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

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
