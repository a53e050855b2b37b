"""A second grid-VQA world for held-out checks: drawn digits on a 4×4 grid.

Issue 8 asks that Align-KD's gain hold on a world nobody tuned on. The demo world
(alignkd/demo/world.py: coloured shapes, 48 px, 3×3 grid, 36 vision tokens) is the
tuned one; this world differs in every axis we can change cheaply:

- content: the digits 0-9, drawn from PIL's built-in bitmap font (no download) at a
  random scale and aspect, with position jitter, random pen weight, ink/background
  contrast and pixel noise. Grey scale only: colour carries no information;
- geometry: 64 px images, a 4×4 grid of 16 px cells, 4-8 distinct digits per image.
  With 16 px patches every cell is one vision token (16 tokens, not 36);
- questions: reading, parity counting, existence, pairwise comparison, arithmetic
  and arg-max retrieval:

| qtype     | example                                          | answer          |
|-----------|--------------------------------------------------|-----------------|
| `read`    | which digit is at row 2 column 3 ?               | 7 / none        |
| `odd`     | how many digits are odd ?                        | 3               |
| `has`     | is there a 7 ?                                   | yes / no        |
| `compare` | is row 1 column 2 larger than row 4 column 1 ?   | yes / no        |
| `sum`     | what is the sum of row 3 ?                       | 14              |
| `largest` | where is the largest digit ?                     | row 2 column 4  |

Digits in an image are distinct, so `largest` and `compare` never tie. `read` asks
about an occupied cell 70% of the time, `has` is yes half the time, `sum` only asks
about rows that hold a digit. The output is the demo world's format: LLaVA manifests
`{train,val,test}.json` (records carry `qtype`, so `alignkd eval` reports per type),
PNGs under `images/`, and `scenes.json` (written last) to re-derive every answer.

    python -m bench.heldout_world --out /work/heldout/world --n-train 16000
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from alignkd.demo.world import SceneKind, write_json, write_splits

GRID = 4
CELL = 16
IMAGE_SIZE = GRID * CELL  # 64 px
PATCH_SIZE = 16  # one vision token per cell
QTYPES = ("read", "odd", "has", "compare", "sum", "largest")
MIN_DIGITS, MAX_DIGITS = 4, 8
QUESTIONS_PER_IMAGE = 4
SPLITS = ("train", "val", "test")
MAX_SUM = 9 + 8 + 7 + 6  # four distinct digits in one row
EXTRA_WORDS = ["which", "digit", "digits", "are", "odd", "larger", "than", "sum", "of", "largest", "none",
               *(str(n) for n in range(10, MAX_SUM + 1))]


@dataclass(frozen=True)
class Digit:
    row: int  # 0-based; questions say row + 1
    col: int
    value: int


Scene = tuple[Digit, ...]


def world_vocabulary() -> list[str]:
    """Every word a question or answer uses, for `build_word_tokenizer`."""
    from alignkd.demo.tiny_models import BASE_WORDS

    return list(dict.fromkeys([*BASE_WORDS, *EXTRA_WORDS]))


def sample_scene(rng: np.random.Generator) -> Scene:
    n = int(rng.integers(MIN_DIGITS, MAX_DIGITS + 1))
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    values = rng.choice(10, size=n, replace=False)
    return tuple(Digit(int(c) // GRID, int(c) % GRID, int(v)) for c, v in sorted(zip(cells, values)))


@lru_cache(maxsize=1)
def _glyphs() -> np.ndarray:
    """(10, h, w) float masks of the digits in PIL's built-in bitmap font, cropped to the ink."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default_imagefont()  # the bitmap font: the same on every install
    masks = []
    for d in range(10):
        img = Image.new("L", (12, 14), 0)
        ImageDraw.Draw(img).text((1, 1), str(d), fill=255, font=font)
        masks.append(np.array(img) > 0)
    ink = np.any(np.stack(masks), axis=0)
    rows, cols = np.where(ink.any(1))[0], np.where(ink.any(0))[0]
    return np.stack(masks)[:, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].astype(np.float32)


def _draw_glyph(value: int, rng: np.random.Generator) -> np.ndarray:
    """A (≤CELL, ≤CELL) ink mask of one digit: random scale, aspect and stroke weight."""
    from PIL import Image

    glyph = _glyphs()[value]
    scale = rng.uniform(1.3, 1.9)
    h = min(CELL - 2, int(round(glyph.shape[0] * scale)))
    w = min(CELL - 3, int(round(glyph.shape[1] * scale * rng.uniform(0.8, 1.2))))
    img = Image.fromarray((glyph * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
    # Pen weight through the edge ramp, not a dilation: a 3 px max filter closed the
    # holes of 0/6/8/9 at small scales and left unreadable blobs.
    return (np.array(img, dtype=np.float32) / 255.0) ** rng.uniform(0.5, 1.5)


def render_scene(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """An IMAGE_SIZE² RGB uint8 image (grey levels): dark digits on a light, noisy page."""
    background = rng.uniform(200, 245)
    img = np.full((IMAGE_SIZE, IMAGE_SIZE), background, dtype=np.float32)
    img += rng.normal(0, 8, size=img.shape)
    for digit in scene:
        mask = _draw_glyph(digit.value, rng)
        h, w = mask.shape
        y = digit.row * CELL + int(rng.integers(0, CELL - h + 1))
        x = digit.col * CELL + int(rng.integers(0, CELL - w + 1))
        ink = rng.uniform(10, 90)
        region = img[y:y + h, x:x + w]
        region[:] = region * (1 - mask) + ink * mask
    img += rng.normal(0, 4, size=img.shape)  # noise over the strokes as well
    grey = np.clip(img, 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def _cell_words(row: int, col: int) -> str:
    return f"row {row + 1} column {col + 1}"


def _at(scene: Scene, row: int, col: int) -> Digit | None:
    return next((d for d in scene if (d.row, d.col) == (row, col)), None)


def ask(scene: Scene, qtype: str, rng: np.random.Generator) -> tuple[str, str]:
    """One (question, answer) pair of `qtype` about `scene`."""
    pick = scene[int(rng.integers(len(scene)))]
    if qtype == "read":
        cell = pick.row * GRID + pick.col if rng.random() < 0.7 else int(rng.integers(GRID * GRID))
        digit = _at(scene, cell // GRID, cell % GRID)
        return f"which digit is at {_cell_words(cell // GRID, cell % GRID)} ?", str(digit.value) if digit else "none"
    if qtype == "odd":
        return "how many digits are odd ?", str(sum(d.value % 2 for d in scene))
    if qtype == "has":
        present = {d.value for d in scene}
        pool = sorted(present) if rng.random() < 0.5 else sorted(set(range(10)) - present)
        value = pool[int(rng.integers(len(pool)))]
        return f"is there a {value} ?", "yes" if value in present else "no"
    if qtype == "compare":
        a, b = (scene[int(i)] for i in rng.choice(len(scene), size=2, replace=False))
        question = f"is {_cell_words(a.row, a.col)} larger than {_cell_words(b.row, b.col)} ?"
        return question, "yes" if a.value > b.value else "no"
    if qtype == "sum":
        row = pick.row  # a row that holds at least one digit
        return f"what is the sum of row {row + 1} ?", str(sum(d.value for d in scene if d.row == row))
    if qtype == "largest":
        top = max(scene, key=lambda d: d.value)
        return "where is the largest digit ?", _cell_words(top.row, top.col)
    raise ValueError(f"unknown qtype {qtype!r}; expected one of {QTYPES}")


# What the demo world's split writer needs from this world's scenes.
DIGIT_SCENES = SceneKind(sample_scene, render_scene, ask, lambda scene: [[d.row, d.col, d.value] for d in scene],
                         QUESTIONS_PER_IMAGE)


def generate_world(out_dir: str | Path, seed: int = 0, n_train: int = 16000, n_val: int = 1200,
                   n_test: int = 1200) -> Path:
    """Write `images/`, `{train,val,test}.json` and `scenes.json` (last) under `out_dir`."""
    root = Path(out_dir)
    # one generator per split, as in the demo world (its own key, 101: another world's draws)
    all_scenes = write_splits(root, dict(zip(SPLITS, (n_train, n_val, n_test))),
                              lambda split: np.random.default_rng([seed, 101, SPLITS.index(split)]), QTYPES,
                              DIGIT_SCENES)
    write_json(root / "scenes.json", {"seed": seed, "grid": GRID, "image_size": IMAGE_SIZE,
                                       "scenes": all_scenes})
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=16000)
    parser.add_argument("--n-val", type=int, default=1200)
    parser.add_argument("--n-test", type=int, default=1200)
    args = parser.parse_args()
    root = generate_world(args.out, args.seed, args.n_train, args.n_val, args.n_test)
    print(f"world written to {root}")


if __name__ == "__main__":
    main()
