"""The demo world: determinism, manifest format, answers re-derived from the scenes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alignkd.demo import world
from alignkd.demo.tiny_models import build_llava_config, build_processor, build_word_tokenizer
from alignkd.demo.vision_pretrain import normalise, patch_cells, patch_labels, pretrain_vision_tower, sample_batch
from alignkd.demo.teacher import STUDENT_SPEC, TEACHER_SPEC, TrainConfig, train_teacher

SIZES = dict(n_train=84, n_val=28, n_test=28)  # each a multiple of the 7 qtypes


@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> world.WorldPaths:
    return world.generate_world(tmp_path_factory.mktemp("world"), seed=3, **SIZES)


def _records(paths: world.WorldPaths, split: str) -> list[dict]:
    return json.loads(paths.manifest(split).read_text())


def test_generate_world_writes_exactly_these_files(small_world):
    names = sorted(p.name for p in small_world.root.iterdir())
    assert names == ["images", "scenes.json", "test.json", "train.json", "val.json"]
    images = sorted(p.name for p in small_world.images_root.iterdir())
    expected = [f"{split}-{i:05d}.png" for split, n in zip(world.SPLITS, SIZES.values())
                for i in range(-(-n // world.QUESTIONS_PER_IMAGE))]
    assert images == sorted(expected)


def test_same_seed_same_world_and_other_seed_differs(small_world, tmp_path):
    again = world.generate_world(tmp_path / "again", seed=3, **SIZES)
    other = world.generate_world(tmp_path / "other", seed=4, **SIZES)
    for split in world.SPLITS:
        assert _records(again, split) == _records(small_world, split)
        assert _records(other, split) != _records(small_world, split)
    for png in small_world.images_root.iterdir():
        assert (again.images_root / png.name).read_bytes() == png.read_bytes()
    assert again.scenes.read_text() == small_world.scenes.read_text()


def test_smaller_train_split_is_a_prefix_and_val_test_do_not_move(small_world, tmp_path):
    smaller = world.generate_world(tmp_path / "smaller", seed=3, n_train=40, n_val=28, n_test=28)
    assert _records(smaller, "train") == _records(small_world, "train")[:40]
    for split in ("val", "test"):
        assert _records(smaller, split) == _records(small_world, split)


def test_manifests_are_plain_llava_format(small_world):
    ids = set()
    for split in world.SPLITS:
        for rec in _records(small_world, split):
            assert set(rec) == {"id", "image", "conversations", "qtype"}
            assert (small_world.images_root / rec["image"]).is_file()
            human, gpt = rec["conversations"]
            assert human["from"] == "human" and human["value"].startswith("<image>\n")
            assert human["value"].count("<image>") == 1
            assert gpt["from"] == "gpt" and gpt["value"].strip() == gpt["value"] != ""
            ids.add(rec["id"])
    assert len(ids) == sum(SIZES.values())


def test_every_qtype_in_every_split(small_world):
    for split in world.SPLITS:
        assert {r["qtype"] for r in _records(small_world, split)} == set(world.QTYPES)


def test_every_word_is_in_the_vocabulary(small_world):
    tok = build_word_tokenizer(world.world_vocabulary())
    for split in world.SPLITS:
        for rec in _records(small_world, split):
            for turn in rec["conversations"]:
                ids = tok(turn["value"].replace("<image>\n", ""), add_special_tokens=False)["input_ids"]
                assert tok.unk_token_id not in ids, turn["value"]


def _solve(scene: world.Scene, question: str) -> str:
    """An independent reading of each question template against the scene."""
    at = {(o.row + 1, o.col + 1): f"{o.colour} {o.shape}" for o in scene}
    where = {name: cell for cell, name in at.items()}
    if m := re.fullmatch(r"what (colour|shape) is at row (\d) column (\d) \?", question):
        colour, shape = at[int(m[2]), int(m[3])].split()
        return colour if m[1] == "colour" else shape
    if m := re.fullmatch(r"what is at row (\d) column (\d) \?", question):
        return at.get((int(m[1]), int(m[2])), "nothing")
    if m := re.fullmatch(r"how many (\w+) shapes are there \?", question):
        return str(sum(name.split()[0] == m[1] for name in at.values()))
    if m := re.fullmatch(r"how many (\w+) are there \?", question):
        (singular,) = {m[1][:-1], m[1][:-2]} & {"circle", "square", "triangle", "cross"}
        return str(sum(name.split()[1] == singular for name in at.values()))
    if m := re.fullmatch(r"is there a (\w+ \w+) \?", question):
        return "yes" if m[1] in where else "no"
    if m := re.fullmatch(r"where is the (\w+ \w+) \?", question):
        return "row {} column {}".format(*where[m[1]])
    if m := re.fullmatch(r"what is (left|right|above|below) of the (\w+ \w+) \?", question):
        r, c = where[m[2]]
        dr, dc = {"left": (0, -1), "right": (0, 1), "above": (-1, 0), "below": (1, 0)}[m[1]]
        assert 1 <= r + dr <= 3 and 1 <= c + dc <= 3, "the asked-about cell lies inside the grid"
        return at.get((r + dr, c + dc), "nothing")
    raise AssertionError(f"unparsed question {question!r}")


def test_answers_follow_from_the_scene(small_world):
    scenes = world.read_scenes(small_world)
    for split in world.SPLITS:
        for rec in _records(small_world, split):
            question = rec["conversations"][0]["value"].removeprefix("<image>\n")
            assert _solve(scenes[rec["image"]], question) == rec["conversations"][1]["value"], rec


def test_images_show_the_scene(small_world):
    scenes = world.read_scenes(small_world)
    for image, scene in scenes.items():
        pixels = np.asarray(Image.open(small_world.images_root / image).convert("RGB")).astype(int)
        occupied = {(o.row, o.col): o.colour for o in scene}
        for r in range(world.GRID):
            for c in range(world.GRID):
                centre = pixels[r * world.CELL + world.CELL // 2, c * world.CELL + world.CELL // 2]
                expected = world.COLOURS[occupied[r, c]] if (r, c) in occupied else (world.BACKGROUND,) * 3
                assert np.abs(centre - np.array(expected)).max() <= 26, (image, r, c)


def test_scenes_have_distinct_objects_and_cells(small_world):
    for scene in world.read_scenes(small_world).values():
        assert world.MIN_OBJECTS <= len(scene) <= world.MAX_OBJECTS
        assert len({(o.row, o.col) for o in scene}) == len(scene)
        assert len({o.name for o in scene}) == len(scene)


def test_pretrain_normalisation_matches_the_clip_processor(small_world):
    processor = build_processor(build_word_tokenizer(world.world_vocabulary()), TEACHER_SPEC)
    img = Image.open(small_world.images_root / "train-00000.png").convert("RGB")
    expected = processor.image_processor(img, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(normalise(np.asarray(img)[None]), expected, atol=1e-5, rtol=1e-5)


def test_patch_labels_cover_each_cell_with_four_patches():
    scene = (world.WorldObject(0, 1, "blue", "cross"),)
    labels = patch_labels(scene, patch_size=8).reshape(6, 6)
    blue_cross = 1 + list(world.COLOURS).index("blue") * len(world.SHAPES) + world.SHAPES.index("cross")
    assert (labels[0:2, 2:4] == blue_cross).all()
    assert labels.sum() == 4 * blue_cross
    assert patch_cells(8).reshape(6, 6)[0:2, 2:4].tolist() == [[1, 1], [1, 1]]
    assert patch_cells(8).reshape(6, 6)[5, 5] == 8


def test_vision_pretrain_beats_the_majority_class_quickly():
    tok = build_word_tokenizer(world.world_vocabulary())
    config = build_llava_config(tok, TEACHER_SPEC).vision_config
    result = pretrain_vision_tower(config, seed=0, steps=40, batch_size=16)
    _, labels = sample_batch(np.random.default_rng(0), 256, config.patch_size)
    majority = float((labels == 0).float().mean())  # "empty" is the most common patch
    assert result.patch_accuracy > majority + 0.1
    assert result.cell_accuracy > 3 / world.GRID**2  # 4 patches per cell: chance is 1/9
    assert set(result.state_dict) == set(torch.nn.Module.state_dict(
        __import__("transformers").CLIPVisionModel(config)))


def test_demo_specs_share_the_grid_and_differ_in_heads():
    assert TEACHER_SPEC.num_image_tokens == STUDENT_SPEC.num_image_tokens == 36
    assert (TEACHER_SPEC.num_heads, STUDENT_SPEC.num_heads) == (8, 4)
    vision = lambda s: (s.vision_hidden, s.vision_layers, s.vision_heads, s.image_size, s.patch_size)
    assert vision(TEACHER_SPEC) == vision(STUDENT_SPEC)


def test_train_teacher_writes_a_loadable_model_and_metrics(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    run = train_teacher(tmp_path / "t", seed=0, cfg=TrainConfig(steps=3, batch_size=4, warmup=1), threads=1,
                        world_sizes=dict(n_train=28, n_val=14, n_test=14), pretrain_steps=2, log_every=0)
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["metrics.json", "model", "world"]
    assert set(run.accuracy) == {*world.QTYPES, "all"}
    model = AutoModelForImageTextToText.from_pretrained(run.model_dir)
    assert model.config.text_config.num_attention_heads == TEACHER_SPEC.num_heads
    assert AutoProcessor.from_pretrained(run.model_dir).tokenizer.unk_token_id is not None
