"""Train students from one cache under several objectives and score them on a split.

A thin caller of `alignkd.experiment` (the one experiment runner): each row is a name plus
`alignkd distill` settings, trained for every seed (two students at a time, one torch thread
each) through the CLI, then scored by `alignkd eval` per question type. Runs that already
finished are reused, so a sweep can be extended row by row.

    python -m bench.objective_sweep --cache demo/cache --student demo/student-init \\
        --world demo/world --split val --steps 1000 --seeds 0,1,2 \\
        --row "CE only:preset=ce" --row "logits:preset=logits" --row "full:" --out sweep/

A row's settings are `distill` options without their dashes: `preset=NAME` picks an objective
preset (alignkd.distill.terms.PRESETS) and `w_NAME=...` overrides one term's weight
(`--w-NAME`). For a world directory with its own teacher, bench/efficacy.py's `--arm` does
the same and also builds the cache.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from alignkd.errors import AlignKDError
from alignkd.experiment import plan, stages, tables


def parse_row(text: str) -> plan.Arm:
    """"NAME:key=value,key=value" as an arm whose flags are `--key value ...`."""
    name, _, opts = text.partition(":")
    flags = []
    for item in filter(None, (o.strip() for o in opts.split(","))):
        key, _, value = item.partition("=")
        flags += [f"--{key.strip().replace('_', '-')}", value.strip()]
    return plan.Arm(name.strip(), " ".join(flags))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag in ("--cache", "--student", "--world", "--out"):
        ap.add_argument(flag, required=True)
    ap.add_argument("--split", default="val", choices=["val", "test"])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--row", action="append", required=True, help='"NAME:key=value,key=value"')
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    recipe = plan.recipe_flags({"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup_ratio": 0.0})
    world = Path(args.world)
    tasks = []
    for arm in map(parse_row, args.row):
        slug = "".join(ch if ch.isalnum() else "-" for ch in arm.name.lower())
        tasks += [stages.Task(plan.Student(arm, seed, Path(args.out) / f"{slug}-s{seed}-n{args.steps}"),
                              Path(args.student), Path(args.cache), recipe, world / f"{args.split}.json",
                              world / "images", f"eval-{args.split}.json", label="sweep") for seed in seeds]
    st = stages.Stages(tag="sweep", distill_flags=("--logging-steps", "25", "--save-steps", str(10**9),
                                                   "--no-verify", "--workers", "0", "--no-progress"),
                       eval_flags=("--batch-size", "128", "--max-new-tokens", "6"))
    try:
        results = stages.train_students(st, tasks, args.workers)
    except AlignKDError as exc:
        sys.exit(f"error: {exc}")
    rows: dict[str, list[dict]] = {}
    for task, scores in zip(tasks, results):
        rows.setdefault(task.student.arm.name, []).append(scores)
    print(tables.accuracy_table(rows, label="row", count="n"))


if __name__ == "__main__":
    main()
