"""Lay out the development worlds as world directories for bench/efficacy.py.

A world directory holds teacher/, student/, train_student.json, val.json, test.json,
images/ and an optional recipe.json (bench/efficacy.py's docstring). This script makes
two of the three development worlds in that layout; the third (the digits world) is
made by its own script and already has it.

    python -m bench.dev_worlds demo OUT
        the demo's grid world (alignkd/demo): 4,000 student records (the demo's), 700 val
        and 1,400 test records (the demo's test split), the shipped teacher, the student
        init with a copy of its tower, and the demo's recipe (1,000 steps, lr 2e-3, 5% warmup).
    python -m bench.dev_worlds heldout OUT --teacher T --student-init S --world W
        bench/heldout_world.py's world, as trained by bench/heldout_teacher.py: links to its
        teacher, student init, images and splits; the first 1,500 train records are the
        student's (docs/heldout-world.md).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def link(target: Path, name: Path) -> None:
    if name.is_symlink() or name.exists():
        name.unlink()
    os.symlink(Path(target).resolve(), name)


def make_demo_world(out: Path) -> Path:
    from alignkd.demo.runner import DEMO_QTYPES, prepare_student_init
    from alignkd.demo.shipped import materialise_shipped_teacher
    from alignkd.demo.teacher import WORLD_SEED
    from alignkd.demo.world import generate_world

    out.mkdir(parents=True, exist_ok=True)
    if not (out / "scenes.json").exists():
        generate_world(out, seed=WORLD_SEED, n_train=4000, n_val=700, n_test=1400, qtypes=DEMO_QTYPES)
    link(out / "train.json", out / "train_student.json")
    teacher = out / "teacher"
    if not (teacher / "config.json").exists():
        materialise_shipped_teacher(teacher)
    student = prepare_student_init(teacher, out)  # writes OUT/student-init
    link(student, out / "student")
    (out / "recipe.json").write_text(json.dumps({"steps": 1000, "batch_size": 32, "lr": 2e-3,
                                                 "warmup_ratio": 0.05}, indent=1))
    return out


def make_heldout_world(out: Path, teacher: Path, student: Path, world: Path, student_records: int = 1500) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    link(teacher, out / "teacher")
    link(student, out / "student")
    link(world / "images", out / "images")
    for split in ("val", "test"):
        link(world / f"{split}.json", out / f"{split}.json")
    records = json.loads((world / "train.json").read_text())[:student_records]
    (out / "train_student.json").write_text(json.dumps(records))
    (out / "recipe.json").write_text(json.dumps({"steps": 1500, "batch_size": 32, "lr": 1e-3,
                                                 "warmup_ratio": 0.0}, indent=1))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="world", required=True)
    demo = sub.add_parser("demo")
    demo.add_argument("out")
    held = sub.add_parser("heldout")
    held.add_argument("out")
    held.add_argument("--teacher", required=True)
    held.add_argument("--student-init", required=True)
    held.add_argument("--world", required=True, help="bench/heldout_world.py's output (train/val/test.json, images/)")
    args = p.parse_args(argv)
    if args.world == "demo":
        print(make_demo_world(Path(args.out)))
    else:
        print(make_heldout_world(Path(args.out), Path(args.teacher), Path(args.student_init), Path(args.world)))


if __name__ == "__main__":
    main()
