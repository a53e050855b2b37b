"""CE only against the default Align-KD objective on any world directory, through the public CLI only.

A thin caller of `alignkd.experiment` (the one experiment runner). A world is a directory a
user can make without reading our code (teacher/, student/, train_student.json, val.json,
test.json, images/, optional recipe.json; `alignkd.experiment.plan` and docs/efficacy.md).
Per world: `alignkd cache build` once; per seed and arm, `alignkd distill` with the world's
recipe (arm `alignkd`: every objective default; `ce`: `--preset ce`; `--ablation`: one arm
per objective preset; `--arm NAME="FLAGS"`: more); `alignkd eval --json` of every student and
the teacher. Two distills at a time, one torch thread each; every stage resumes. It prints
the gains table and, with a `logits` arm, each other arm's paired increment over logits only.
Tune on `--split val`; report `--split test`.

    python -m bench.efficacy --world /work/worlds/digits --world /work/worlds/heldout \\
        --seeds 3 --split val --out /work/efficacy
    python -m bench.efficacy --world /work/worlds/digits --ablation --seeds 5 --split val --out /work/efficacy
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from alignkd.distill.terms import PRESETS
from alignkd.errors import AlignKDError
from alignkd.experiment import plan, stages, tables

ABLATION_BASE = "logits"


def parse_arms(items: list[str], include_defaults: bool, ablation: bool = False) -> list[plan.Arm]:
    if ablation:  # the presets' order: ce, logits, ..., the default last
        arms = plan.preset_arms()
    else:
        arms = [plan.Arm.of_preset("ce", "ce")] + ([plan.Arm.of_preset("alignkd", "full")] if include_defaults else [])
    named = {a.name: a for a in arms}
    for item in items:
        arm = plan.parse_arm(item)
        if arm.name == "ce":
            raise SystemExit(f"--arm {item!r}: expected NAME=\"distill flags\" with a NAME other than ce.")
        named[arm.name] = arm
    return list(named.values())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="CE only against default Align-KD on world directories, via the CLI.")
    p.add_argument("--world", action="append", required=True, help="a world directory (repeat for several)")
    p.add_argument("--out", default="efficacy-out", help="caches, runs and scores; reruns resume")
    p.add_argument("--seeds", type=int, default=3, help="seeds 1..N, the same for every arm")
    p.add_argument("--split", choices=("val", "test"), default="val")
    p.add_argument("--arm", action="append", default=[], help='NAME="distill flags", e.g. paper="--loss-scale paper"')
    p.add_argument("--no-default-arm", action="store_true", help="train only CE only and the --arm rows")
    p.add_argument("--ablation", action="store_true",
                   help=f"one arm per objective preset ({', '.join(PRESETS)}) and each one's increment over "
                        f"{ABLATION_BASE} only")
    p.add_argument("--steps", type=int, help="override every world's recipe")
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--warmup-ratio", type=float)
    p.add_argument("--extra-build-args", default="", help="appended to `cache build` (a new --out per setting)")
    p.add_argument("--jobs", type=int, default=2, help="distills run side by side, one torch thread each")
    p.add_argument("--distill-workers", type=int, default=0,
                   help="DataLoader workers per distill (0: the two side-by-side runs already fill two cores; "
                        "the order and the numbers do not depend on it)")
    p.add_argument("--alignkd", default="", help="the CLI to call; default: this Python's `-m alignkd.cli`")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.jobs < 1:
        p.error("--seeds and --jobs must be at least 1")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    try:
        return run(args)
    except AlignKDError as exc:
        sys.exit(f"error: {exc}")


def run(args: argparse.Namespace) -> list[dict]:
    start = time.perf_counter()
    arms = parse_arms(args.arm, not args.no_default_arm, args.ablation)
    overrides = {"steps": args.steps, "lr": args.lr, "batch_size": args.batch_size, "warmup_ratio": args.warmup_ratio}
    worlds = [plan.load_world(w, overrides) for w in args.world]
    for world in worlds:
        if not world.split(args.split).is_file():
            sys.exit(f"world {world.root} has no {args.split}.json.")
    st = stages.Stages.calling(args.alignkd, tag="efficacy", distill_flags=(
        "--save-steps", str(10**9), "--workers", str(args.distill_workers), "--no-progress"))
    out_root = Path(args.out)
    # a world's runs live under its name and its teacher's digest: another teacher never reuses them
    outs = {w.root: out_root / f"{w.name}-{w.teacher_digest()}" for w in worlds}
    tasks, owners = [], []
    for w in worlds:
        cache = stages.build_cache(st, w.name, w.root / "teacher", w.root / "train_student.json", w.root / "images",
                                   outs[w.root], shlex.split(args.extra_build_args))
        tasks += [stages.Task(plan.Student(arm, seed, outs[w.root] / arm.name / plan.hashed_run_name(w.recipe, arm, seed)),
                              w.root / "student", cache, plan.recipe_flags(w.recipe), w.split(args.split),
                              w.root / "images", f"eval-{args.split}.json", label=w.name)
                  for seed in range(1, args.seeds + 1) for arm in arms]
        owners += [w] * (len(tasks) - len(owners))
    print(f"[efficacy] {len(tasks)} students over {len(worlds)} world(s), {args.jobs} at a time", flush=True)
    results = stages.train_students(st, tasks, args.jobs)
    summaries = []
    for world in worlds:
        scores: tables.Scores = {}
        for task, owner, result in zip(tasks, owners, results):
            if owner is world:
                scores.setdefault(task.student.arm.name, {})[task.student.seed] = result
        teacher = stages.evaluate(st, world.root / "teacher", world.split(args.split), world.root / "images",
                                  outs[world.root] / f"teacher-eval-{args.split}.json")
        summary = {**tables.summarise_world(world.name, teacher, scores), "recipe": world.recipe,
                   "arms_flags": {a.name: a.flags for a in arms}}
        if ABLATION_BASE in scores:
            summary["over_logits"] = tables.increments(scores, ABLATION_BASE)
        summaries.append(summary)
    table = tables.render_gains(summaries, args.split, args.seeds)
    if any("over_logits" in s for s in summaries):
        table += "\n\n" + tables.render_increments(summaries, ABLATION_BASE, "over_logits")
    (out_root / f"summary-{args.split}.json").write_text(json.dumps(summaries, indent=1))
    (out_root / f"table-{args.split}.md").write_text(table + "\n")
    print("\n" + table + f"\n\nwall {time.perf_counter() - start:.0f} s; per-run logs under {out_root}")
    return summaries


if __name__ == "__main__":
    main()
