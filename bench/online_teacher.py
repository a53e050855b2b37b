"""The same distillation run from the cache and with the teacher online: same batches, same seeds.

`alignkd distill` never loads the teacher; the cache is supposed to make that free. This bench
checks the claim where it matters, in the trained student: for each seed it trains

- **offline**: `distill()` exactly as `alignkd distill` runs it, targets read from the cache;
- **online**: the same `distill()` (same sampler, same batches, same student init, same
  seed), but every step the live teacher runs on the batch and its float32 attention rows,
  projected vision tokens, text focus and sparse logits replace the cached ones. They are
  cut from the teacher's forward by the very function the cache build uses
  (`records_from_capture`), so the two runs differ only by the cache's storage rounding,

then scores both with `alignkd eval`'s evaluator on a split, and prints per-seed pairs.

    python -m bench.online_teacher --world /work/worlds/w/digits --cache /work/eff/.../cache \\
        --seeds 3 --split test --out /work/online
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn


class OnlineTargets(nn.Module):
    """Wraps the objective: each forward first asks the live teacher for the batch's targets."""

    def __init__(self, objective: nn.Module, teacher_dir: str, build_options: dict) -> None:
        from alignkd.models import load_vlm

        super().__init__()
        self.objective = objective
        vlm = load_vlm(teacher_dir, dtype="float32")
        vlm.model.eval().requires_grad_(False)
        self._teacher = [vlm]  # a list: kept out of this module's parameters and checkpoints
        self.options = build_options

    def forward(self, **batch) -> dict:
        inputs = {k: v for k, v in batch.items() if not k.startswith("t_")}  # cached targets, encodings, scales
        return self.objective(**inputs, **self.live_targets(inputs))

    @torch.no_grad()
    def live_targets(self, batch: dict) -> dict:
        from alignkd.cache.teacher.teacher_pass import batch_samples, model_inputs_of, records_from_capture
        from alignkd.distill.dataset import collate_distill, item_from_record
        from alignkd.models import capture_forward

        vlm = self._teacher[0]
        cap = capture_forward(vlm.model, model_inputs_of(batch, vlm.family))
        o = self.options
        records = records_from_capture(batch_samples(batch, cap), batch, cap, logit_mode=o["logit_mode"],
                                       logit_k=o["logit_k"], logit_samples=o["logit_samples"],
                                       positions_policy=o["logit_positions"], seed=o["seed"], store_images=False)
        items = [item_from_record(r, {}) for r in records]
        return {k: v for k, v in collate_distill(items, pad_token_id=0).items() if k.startswith("t_")}


def train(world: Path, cache: str, out: Path, seed: int, recipe: dict, online: bool) -> Path:
    from alignkd.cache.reader import open_cache
    from alignkd.distill.run import DistillConfig, distill

    if (out / "distill_run.json").exists():
        return out
    cfg = DistillConfig(student=str(world / "student"), cache=cache, out=str(out), max_steps=recipe["steps"],
                        batch_size=recipe["batch_size"], lr=recipe["lr"], warmup_ratio=recipe["warmup_ratio"],
                        seed=seed, save_steps=10**9, progress=False, workers=0,
                        overwrite=True)  # a run cut off before its export starts over
    options = {**open_cache(cache).meta["build_options"]}
    wrap = (lambda obj: OnlineTargets(obj, str(world / "teacher"), options)) if online else None
    start = time.perf_counter()
    distill(cfg, wrap_objective=wrap)
    print(f"[online] {'online' if online else 'offline'} seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    return out


def score(model: Path, world: Path, split: str) -> float:
    from alignkd.distill.evaluate import EvalConfig, evaluate

    target = model / f"eval-{split}.json"
    if not target.exists():
        result = evaluate(EvalConfig(model=str(model), data=str(world / f"{split}.json"),
                                     images=str(world / "images"), progress=False))
        target.write_text(json.dumps({"accuracy": result.accuracy}))
    return json.loads(target.read_text())["accuracy"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", required=True, help="a world directory (bench/efficacy.py)")
    p.add_argument("--cache", required=True, help="the world's cache, built from WORLD/train_student.json")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--split", choices=("val", "test"), default="test")
    args = p.parse_args(argv)
    from alignkd.experiment.plan import load_world

    torch.set_num_threads(1)
    world = load_world(args.world, {})
    rows = []
    for seed in range(1, args.seeds + 1):
        pair = [score(train(world.root, args.cache, Path(args.out) / f"{kind}-seed{seed}", seed, world.recipe,
                            kind == "online"), world.root, args.split) for kind in ("offline", "online")]
        rows.append(pair)
    print(f"\n{args.split} accuracy (%), world {world.name}, recipe {world.recipe}\n")
    print("| seed | offline (cache) | online (live teacher) | online - offline |")
    print("|---|---|---|---|")
    for seed, (off, on) in enumerate(rows, start=1):
        print(f"| {seed} | {100 * off:.1f} | {100 * on:.1f} | {100 * (on - off):+.1f} |")
    off, on = ([100 * r[i] for r in rows] for i in (0, 1))
    sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
    print(f"| mean ± sd | {statistics.fmean(off):.1f} ± {sd(off):.1f} | {statistics.fmean(on):.1f} ± {sd(on):.1f} | "
          f"{statistics.fmean(on) - statistics.fmean(off):+.1f} |")


if __name__ == "__main__":
    main()
