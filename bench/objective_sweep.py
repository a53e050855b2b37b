"""Train students from one cache under several objectives and score them on a split.

The tool behind docs/demo-notes.md's objective experiments: each row is a name plus
`DistillConfig` overrides, trained for every seed (two students at a time, one CPU
thread each), then scored by `alignkd eval`'s evaluator per question type. Runs that
already finished are reused, so a sweep can be extended row by row.

    python bench/objective_sweep.py --cache demo/cache --student demo/student-init \\
        --world demo/world --split val --steps 1000 --seeds 0,1,2 \\
        --row "CE only:preset=ce" --row "logits:preset=logits" --row "full:" --out sweep/

A row's overrides are `DistillConfig` fields: `preset=NAME` picks an objective preset
(alignkd.distill.terms.PRESETS) and `w_NAME=...` overrides one term's weight.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def parse_row(text: str) -> tuple[str, dict]:
    name, _, opts = text.partition(":")
    overrides = {}
    for item in filter(None, (o.strip() for o in opts.split(","))):
        key, _, value = item.partition("=")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                continue
        overrides[key.strip()] = value
    return name.strip(), overrides


def train_and_score(job: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from alignkd.distill.evaluate import EvalConfig, evaluate
    from alignkd.distill.trainer import DistillConfig, distill

    run = Path(job["run"])
    scores_file = run / f"{job['split']}_scores.json"
    if scores_file.exists():
        return json.loads(scores_file.read_text())
    if not (run / "distill_run.json").exists():
        distill(DistillConfig(student=job["student"], cache=job["cache"], out=str(run), max_steps=job["steps"],
                              batch_size=job["batch_size"], lr=job["lr"], seed=job["seed"], logging_steps=25,
                              save_steps=10**9, progress=False, verify=False, workers=0, overwrite=True,
                              **job["overrides"]))
    world = Path(job["world"])
    result = evaluate(EvalConfig(model=str(run), data=str(world / f"{job['split']}.json"),
                                 images=str(world / "images"), batch_size=128, max_new_tokens=6, progress=False))
    scores = {"all": result.accuracy, **result.by_type}
    scores_file.write_text(json.dumps(scores))
    return scores


def table(rows: dict[str, list[dict]]) -> str:
    cols = ["all", *sorted(k for k in next(iter(rows.values()))[0] if k != "all")]
    lines = ["| row | n | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for name, runs in rows.items():
        cells = []
        for c in cols:
            vals = [100 * r[c] for r in runs]
            sd = f" ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else ""
            cells.append(f"{statistics.fmean(vals):.1f}{sd}")
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
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
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs, names = [], []
    for name, overrides in map(parse_row, args.row):
        slug = "".join(ch if ch.isalnum() else "-" for ch in name.lower())
        for seed in seeds:
            names.append(name)
            jobs.append(dict(run=str(Path(args.out) / f"{slug}-s{seed}-n{args.steps}"), split=args.split,
                             student=args.student, cache=args.cache, world=args.world, steps=args.steps,
                             batch_size=args.batch_size, lr=args.lr, seed=seed, overrides=overrides))
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(train_and_score, jobs))
    rows: dict[str, list[dict]] = {}
    for name, scores in zip(names, results):
        rows.setdefault(name, []).append(scores)
    print(table(rows))


if __name__ == "__main__":
    main()
