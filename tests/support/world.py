"""The tiny test world: a tiny LLaVA teacher and student, numpy-drawn images and LLaVA manifests.

The teacher (4 heads, d=64, 16 image tokens) and the smaller student (2 heads, d=32) share one
tokenizer and image grid, so a cache built from the teacher trains the student.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from alignkd.demo.tiny_models import TinyLlavaSpec, build_tiny_llava

TEACHER_SPEC = TinyLlavaSpec()
STUDENT_SPEC = TinyLlavaSpec(hidden_size=32, num_heads=2, intermediate_size=64, num_layers=2)
QUESTION = "what is the colour of this image ?"


def build_teacher(out: Path) -> Path:
    return build_tiny_llava(out, TEACHER_SPEC, seed=0)


def build_student(out: Path) -> Path:
    return build_tiny_llava(out, STUDENT_SPEC, seed=1)


def random_image(path: Path, rng: np.random.Generator, size: int = 40) -> Path:
    """Write a random RGB PNG drawn from `rng` and return its path."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def make_image(path: Path, seed: int = 0, size: int = 40) -> Path:
    """Write a random RGB PNG (generated with numpy from `seed`) and return its path."""
    return random_image(path, np.random.default_rng(seed), size)


def turns(*pairs: tuple[str, str]) -> list[dict]:
    """A LLaVA conversation from (question, answer) pairs; the first question shows the image."""
    conv = []
    for i, (question, answer) in enumerate(pairs):
        conv += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + question},
                 {"from": "gpt", "value": answer}]
    return conv


def write_manifest(path: Path, records: list[dict], jsonl: bool = False) -> Path:
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return path


def image_records(images: Path, n: int, conversation: Callable[[int, np.random.Generator], list[dict]],
                  size: int = 40, seed: int = 0, id_prefix: str = "s") -> list[dict]:
    """n records, image `i.png` drawn from one generator seeded `seed`, conversation(i, that generator)
    called after record i's image is drawn (so a conversation may draw from it too)."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        random_image(images / f"{i}.png", rng, size)
        records.append({"id": f"{id_prefix}{i}", "image": f"{i}.png", "conversations": conversation(i, rng)})
    return records
