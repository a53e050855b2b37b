"""`alignkd distill` SIGKILLed at random steps and resumed with --resume ends with the same student.

The fast run of bench/torture.py's distill matrix: one chain of five kills, one at each
moment (after an optimizer step, inside a checkpoint, right after a checkpoint's rename,
inside the export, and a seeded random time), each rerun resuming the last, then an
unarmed rerun. The exported student and adapters must be bit-identical to an
uninterrupted run with the same seed, and metrics.jsonl must hold each step once with the
same losses (bench/torture.py says why bit identity, not a tolerance, is the right test).
"""

from __future__ import annotations

import random

from alignkd.cache.teacher.build import BuildConfig, build_cache

from bench import torture
from tests.support.world import make_image, write_manifest


def test_random_kills_then_resume_give_the_uninterrupted_student_bit_for_bit(tmp_path, tiny_llava_dir,
                                                                            tiny_student_dir):
    records = []
    for i in range(8):
        make_image(tmp_path / "images" / f"{i}.png", seed=40 + i)
        records.append({"id": f"k{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat is the colour of this image ?"},
            {"from": "gpt", "value": ["red", "blue", "yes", "no"][i % 4]}]})
    manifest = write_manifest(tmp_path / "data.json", records)
    cache = tmp_path / "cache"
    build_cache(BuildConfig(teacher=str(tiny_llava_dir), data=str(manifest), images=str(tmp_path / "images"),
                            out=str(cache), batch_size=4, progress=False))
    world = {"student": tiny_student_dir, "cache": cache}
    kills = len(torture.DISTILL_POINTS)
    tally = torture.distill_torture(world, tmp_path, kills=kills, per_run=kills, steps=6, save_steps=2,
                                    rng=random.Random(0))
    assert tally.runs >= 1
    for point in ("step", "checkpoint", "published", "export"):  # reached whatever the machine's speed
        assert tally.killed[point] == 1, (point, tally)
