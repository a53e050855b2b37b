"""Train the held-out digit world's teacher and write its student init.

Same recipe shape as the demo (alignkd/demo/teacher.py), own tower pretraining:
1. a fresh CLIP tower (64 px, 16 px patches: one token per grid cell) learns, per
   patch, which digit covers it (11 classes: empty or 0-9) plus, at a quarter weight,
   which cell the patch is (as the demo's tower does, so that position is part of every
   token). Images stream from the world's own sampler and renderer;
2. a LLaVA teacher on that frozen tower is trained with the demo's plain CE loop
   (`build_model`, `prepare_examples`, `train_llava`) on the world's train split;
3. it is scored on the val split by `alignkd eval`'s evaluator, saved as an ordinary
   model directory with its processor, and a smaller student (the demo's student
   sizes) sharing a copy of the tower is saved next to it.

    OMP_NUM_THREADS=1 python -m bench.heldout_teacher --root /work/heldout

writes ROOT/world (unless present), ROOT/teacher, ROOT/student-init and
ROOT/teacher-metrics.json. Budget: about 15 CPU-minutes on one thread.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from alignkd.demo.tiny_models import TinyLlavaSpec
from alignkd.demo.vision_pretrain import PatchTask, pretrain_vision_tower
from bench import heldout_world as hw

_GRID = dict(image_size=hw.IMAGE_SIZE, patch_size=hw.PATCH_SIZE, vision_hidden=64, vision_layers=2, vision_heads=4)
TEACHER_SPEC = TinyLlavaSpec(hidden_size=128, num_layers=4, num_heads=8, intermediate_size=512, **_GRID)
STUDENT_SPEC = TinyLlavaSpec(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256, **_GRID)
NUM_CLASSES = 11  # empty, 0-9
NUM_CELLS = hw.GRID * hw.GRID
MAX_NEW_TOKENS = 6  # "row 2 column 4" + </s>


def patch_labels(scene: hw.Scene) -> np.ndarray:
    """Row-major class per patch (= per cell): 0 empty, else 1 + digit."""
    labels = np.zeros((hw.GRID, hw.GRID), dtype=np.int64)
    for d in scene:
        labels[d.row, d.col] = 1 + d.value
    return labels.reshape(-1)


def sample_batch(rng: np.random.Generator, batch_size: int):
    import torch

    from alignkd.demo.vision_pretrain import normalise

    scenes = [hw.sample_scene(rng) for _ in range(batch_size)]
    images = np.stack([hw.render_scene(s, rng) for s in scenes])
    return normalise(images), torch.from_numpy(np.stack([patch_labels(s) for s in scenes]))


# The demo's tower pretrainer on this world's patches: one patch per cell, so the cell of
# patch i is i; its own stream key (117) so the two worlds never share draws.
DIGIT_TASK = PatchTask(NUM_CLASSES, NUM_CELLS, np.arange(NUM_CELLS), sample_batch, rng_key=117)


def save_dir(model, processor, target: Path) -> None:
    """save_pretrained into a temporary directory, then rename: a present dir is complete."""
    tmp = target.with_name(f".tmp-{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


class _Stop(Exception):
    """Raised from the step callback to end training at --stop-after."""


def load_teacher(model_dir: str):
    """A saved teacher to continue training: tower frozen, as `build_model` leaves it."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir)
    model.model.vision_tower.requires_grad_(False)
    return model, AutoProcessor.from_pretrained(model_dir)


def train(args) -> dict:
    import torch

    from alignkd.demo.teacher import TrainConfig, build_model, prepare_examples, train_llava
    from alignkd.demo.tiny_models import build_llava_config, build_processor, build_word_tokenizer
    from alignkd.distill.evaluate import EvalConfig, evaluate

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    root = Path(args.root)
    world = root / "world"
    if not (world / "scenes.json").exists():
        hw.generate_world(world, seed=args.world_seed, n_train=args.n_train)
    if args.init_from:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(args.init_from)
        examples = prepare_examples(world / "train.json", processor, world / "images", limit=args.n_train)
        while args.wait_for and not Path(args.wait_for).exists():  # the first stage is still training
            time.sleep(10)
        model, processor = load_teacher(args.init_from)
        content_acc = cell_acc = None
    else:
        tokenizer = build_word_tokenizer(hw.world_vocabulary())
        processor = build_processor(tokenizer, TEACHER_SPEC)
        pretrained = pretrain_vision_tower(build_llava_config(tokenizer, TEACHER_SPEC).vision_config,
                                           seed=args.seed, steps=args.pretrain_steps, task=DIGIT_TASK)
        tower, content_acc, cell_acc = pretrained.state_dict, pretrained.patch_accuracy, pretrained.cell_accuracy
        print(f"tower: digit {content_acc:.4f}, cell {cell_acc:.4f} after {time.perf_counter() - start:.0f} s",
              flush=True)
        # The student needs only the tower, so it is written before the (long) teacher training.
        save_dir(build_model(STUDENT_SPEC, tokenizer, tower, seed=0), processor, root / "student-init")
        model = build_model(TEACHER_SPEC, tokenizer, tower, seed=args.seed)
        examples = prepare_examples(world / "train.json", processor, world / "images", limit=args.n_train)
    pretrain_s = time.perf_counter() - start
    cfg = TrainConfig(steps=args.steps, batch_size=32, lr=args.lr, warmup=100, seed=args.seed)
    losses = []

    def log(step: int, loss: float) -> None:
        losses.append(loss)
        if step % 250 == 0:
            print(f"step {step} loss {np.mean(losses[-250:]):.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
        if step == args.stop_after:
            raise _Stop  # keep the schedule of --steps, end early (a reproducible stage-1 checkpoint)
        if args.save_every and step % args.save_every == 0 and step < cfg.steps:
            save_dir(model, processor, root / "teacher")  # usable (not annealed) if the run is cut
            model.train()

    try:
        train_llava(model, examples, cfg, on_step=log)
    except _Stop:
        print(f"stopped after step {args.stop_after} of {cfg.steps}", flush=True)
    model.eval()
    train_s = time.perf_counter() - start
    save_dir(model, processor, root / "teacher")
    result = evaluate(EvalConfig(model=str(root / "teacher"), data=str(world / "val.json"),
                                 images=str(world / "images"), max_new_tokens=MAX_NEW_TOKENS, batch_size=128,
                                 progress=False), model=model, processor=processor)
    metrics = {"command": " ".join(sys.argv), "init_from": args.init_from or None, "stop_after": args.stop_after, "train": cfg.__dict__, "n_train": args.n_train,
               "pretrain_steps": args.pretrain_steps, "tower_digit_accuracy": content_acc,
               "tower_cell_accuracy": cell_acc, "val_accuracy": {**result.by_type, "all": result.accuracy},
               "seconds": {"pretrain": round(pretrain_s, 1), "pretrain+train": round(train_s, 1),
                           "total": round(time.perf_counter() - start, 1)},
               "loss_every_250": [round(float(np.mean(losses[i:i + 250])), 4) for i in range(0, len(losses), 250)]}
    (root / "teacher-metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the held-out digit world's teacher and student init.")
    parser.add_argument("--root", required=True, help="writes ROOT/world, ROOT/teacher, ROOT/student-init")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--world-seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=32000)
    parser.add_argument("--pretrain-steps", type=int, default=500)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--init-from", default="", help="continue from this saved teacher (no tower pretraining)")
    parser.add_argument("--stop-after", type=int, default=0, help="end after this step, keeping the --steps schedule")
    parser.add_argument("--wait-for", default="", help="with --init-from: prepare the data, then wait for this "
                        "file (e.g. the first stage's teacher-metrics.json) before loading the teacher")
    parser.add_argument("--save-every", type=int, default=500, help="write ROOT/teacher every N steps as well")
    metrics = train(parser.parse_args())
    print(json.dumps({k: metrics[k] for k in ("val_accuracy", "seconds", "tower_digit_accuracy")}, indent=1))


if __name__ == "__main__":
    main()
