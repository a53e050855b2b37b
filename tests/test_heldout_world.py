"""The held-out digit world (bench/heldout_world.py): deterministic, well-formed, answers re-derivable."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BENCH = Path(__file__).resolve().parents[1] / "bench" / "heldout_world.py"


@pytest.fixture(scope="module")
def hw():
    spec = importlib.util.spec_from_file_location("heldout_world", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def world(hw, tmp_path_factory):
    return hw.generate_world(tmp_path_factory.mktemp("hw"), seed=3, n_train=48, n_val=24, n_test=24)


def _cell(text: str) -> tuple[int, int]:
    row, col = re.search(r"row (\d) column (\d)", text).groups()
    return int(row) - 1, int(col) - 1


def expected_answer(question: str, scene: dict) -> str:
    """Re-derive an answer from scenes.json, independently of the generator's `ask`."""
    if question.startswith("which digit"):
        return str(scene.get(_cell(question), "none"))
    if question.startswith("how many"):
        return str(sum(v % 2 for v in scene.values()))
    if question.startswith("is there"):
        return "yes" if int(question.split()[3]) in scene.values() else "no"
    if question.startswith("is row"):
        a, b = question.split(" larger than ")
        return "yes" if scene[_cell(a)] > scene[_cell(b)] else "no"
    if question.startswith("what is the sum"):
        row = int(question.split()[6]) - 1
        return str(sum(v for (r, _), v in scene.items() if r == row))
    top = max(scene, key=scene.get)
    return f"row {top[0] + 1} column {top[1] + 1}"


def test_every_answer_follows_from_the_scene(world):
    scenes = json.loads((world / "scenes.json").read_text())["scenes"]
    for split in ("train", "val", "test"):
        for rec in json.loads((world / f"{split}.json").read_text()):
            scene = {(r, c): v for r, c, v in scenes[rec["image"]]}
            question = rec["conversations"][0]["value"].removeprefix("<image>\n")
            assert rec["conversations"][1]["value"] == expected_answer(question, scene), rec


def test_images_and_qtypes(hw, world):
    records = json.loads((world / "train.json").read_text())
    assert {r["qtype"] for r in records} == set(hw.QTYPES)
    img = np.array(Image.open(world / "images" / records[0]["image"]))
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8


def test_vocabulary_covers_every_word(hw, world):
    from alignkd.demo.tiny_models import build_word_tokenizer

    tok = build_word_tokenizer(hw.world_vocabulary())
    for split in ("train", "val", "test"):
        for rec in json.loads((world / f"{split}.json").read_text()):
            for turn in rec["conversations"]:
                ids = tok(turn["value"].replace("<image>\n", ""))["input_ids"]
                assert tok.unk_token_id not in ids, turn["value"]


def test_generation_is_deterministic(hw, world, tmp_path):
    again = hw.generate_world(tmp_path, seed=3, n_train=48, n_val=24, n_test=24)
    for name in ("train.json", "test.json", "scenes.json"):
        assert (again / name).read_bytes() == (world / name).read_bytes()
    first = sorted((world / "images").iterdir())[0].name
    assert (again / "images" / first).read_bytes() == (world / "images" / first).read_bytes()
