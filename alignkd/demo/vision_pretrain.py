"""Pretrain the demo's small CLIP vision tower by classifying what is in each patch.

Teacher and student share one frozen tower, as MobileVLM V2's do. A random frozen
tower would leave the student blind: in a probe on a similar grid task a 1.7M LLaVA
trained on top of one stayed at chance on region questions after 5,000 steps. So the
tower first learns, per patch, which of the 17 cell contents (empty, or one of
4 colours × 4 shapes) covers it. That takes seconds on a CPU and is the only
supervision the tower ever gets; the language models learn the questions later.

A second head asks each patch which grid cell it lies in. Without it the LM has to
recover a token's position from RoPE distances alone, and "where is X?" and "what is
left of X?" stayed the slowest types to learn (see docs/demo-notes.md); with it the
position is part of every vision token's content.

Images come straight from the world's scene sampler and renderer (an endless stream,
no files), normalised exactly as the CLIP image processor does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from alignkd.demo import world

NUM_CLASSES = 1 + len(world.COLOURS) * len(world.SHAPES)
NUM_CELLS = world.GRID * world.GRID
CELL_WEIGHT = 0.25  # position is learnt in a few steps; a full weight cost content accuracy (99.9% -> 93%)
# The CLIP image processor's defaults (OPENAI_CLIP_MEAN / STD); resize and crop are
# no-ops because the world's images are already image_size².
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class PretrainResult:
    state_dict: dict
    patch_accuracy: float  # content, on a fresh held-out batch
    cell_accuracy: float  # which grid cell, same batch
    steps: int
    seconds: float


def normalise(images: np.ndarray):
    """uint8 (B, H, W, 3) → float (B, 3, H, W), as CLIPImageProcessor would produce."""
    import torch

    x = torch.from_numpy(np.array(images, dtype=np.float32)).div(255.0)
    x = (x - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    return x.permute(0, 3, 1, 2).contiguous()


def patch_labels(scene: world.Scene, patch_size: int) -> np.ndarray:
    """Row-major class id per patch: 0 empty, else 1 + colour_index * 4 + shape_index."""
    per_side = world.IMAGE_SIZE // patch_size
    cells = np.zeros((world.GRID, world.GRID), dtype=np.int64)
    colours = list(world.COLOURS)
    for obj in scene:
        cells[obj.row, obj.col] = 1 + colours.index(obj.colour) * len(world.SHAPES) + world.SHAPES.index(obj.shape)
    idx = np.arange(per_side) * patch_size // world.CELL  # the cell under each patch's top-left
    return cells[np.ix_(idx, idx)].reshape(-1)


def patch_cells(patch_size: int) -> np.ndarray:
    """Row-major grid-cell index of every patch."""
    per_side = world.IMAGE_SIZE // patch_size
    idx = np.arange(per_side) * patch_size // world.CELL
    return (idx[:, None] * world.GRID + idx[None, :]).reshape(-1)


def sample_batch(rng: np.random.Generator, batch_size: int, patch_size: int):
    import torch

    scenes = [world.sample_scene(rng) for _ in range(batch_size)]
    images = np.stack([world.render_scene(s, rng) for s in scenes])
    labels = np.stack([patch_labels(s, patch_size) for s in scenes])
    return normalise(images), torch.from_numpy(labels)


def _patch_logits(tower, head, pixel_values, num_classes: int = NUM_CLASSES):
    """(content logits, cell logits) per patch."""
    # LLaVA reads hidden_states[vision_feature_layer=-1] without the CLS token, so the
    # probe reads exactly the features the projector will see.
    out = tower(pixel_values=pixel_values, output_hidden_states=True)
    logits = head(out.hidden_states[-1][:, 1:])
    return logits[..., :num_classes], logits[..., num_classes:]


@dataclass(frozen=True)
class PatchTask:
    """What a tower learns per patch, from a world's endless scene stream: its content class
    (`sample(rng, n)` -> (pixels, labels)) and, at CELL_WEIGHT, which grid cell it lies in
    (`cells`: the cell of every patch, out of `num_cells`). `rng_key` seeds the training
    stream; the accuracy check draws from key + 1. bench/heldout_teacher.py trains its digit
    world's tower with its own task."""
    num_classes: int
    num_cells: int
    cells: np.ndarray
    sample: Callable
    rng_key: int


def grid_task(patch_size: int) -> PatchTask:
    """The demo world's task: 17 cell contents, for a tower with `patch_size` patches."""
    return PatchTask(NUM_CLASSES, NUM_CELLS, patch_cells(patch_size),
                     lambda rng, n: sample_batch(rng, n, patch_size), rng_key=17)


def pretrain_vision_tower(vision_config, seed: int = 0, steps: int = 400, batch_size: int = 32,
                          lr: float = 3e-3, task: PatchTask | None = None) -> PretrainResult:
    """Train a fresh `CLIPVisionModel(vision_config)` on per-patch classification (the demo's task by default)."""
    import torch
    from transformers import CLIPVisionModel

    task = task or grid_task(vision_config.patch_size)
    start = time.perf_counter()
    torch.manual_seed(seed)
    tower = CLIPVisionModel(vision_config)
    head = torch.nn.Linear(vision_config.hidden_size, task.num_classes + task.num_cells)
    cells = torch.from_numpy(task.cells)
    params = [*tower.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng([seed, task.rng_key])
    tower.train()
    for _ in range(steps):
        pixels, labels = task.sample(rng, batch_size)
        content, cell = _patch_logits(tower, head, pixels, task.num_classes)
        loss = (torch.nn.functional.cross_entropy(content.flatten(0, 1), labels.flatten())
                + CELL_WEIGHT * torch.nn.functional.cross_entropy(cell.flatten(0, 1), cells.repeat(len(pixels))))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    content_acc, cell_acc = patch_accuracy(tower, head, np.random.default_rng([seed, task.rng_key + 1]), task)
    state = {k: v.detach().clone() for k, v in tower.state_dict().items()}
    return PretrainResult(state, content_acc, cell_acc, steps, time.perf_counter() - start)


def patch_accuracy(tower, head, rng: np.random.Generator, task: PatchTask, n: int = 256) -> tuple[float, float]:
    """(content accuracy, cell accuracy) over every patch of `n` fresh images."""
    import torch

    tower.eval()
    with torch.no_grad():
        pixels, labels = task.sample(rng, n)
        content, cell = _patch_logits(tower, head, pixels, task.num_classes)
    cells = torch.from_numpy(task.cells)
    return float((content.argmax(-1) == labels).float().mean()), float((cell.argmax(-1) == cells).float().mean())
