"""A deterministic visual-QA world: coloured shapes on a 3×3 grid.

The demo needs a task whose answers depend on *where* the model looks, because that
is what Align-KD's text→vision attention transfer teaches. Each 48 px image holds 2–5
distinct (colour, shape) objects, one per 16 px cell, so a CLIP tower with 8 px
patches sees every cell as a 2×2 block of patches. Questions come in seven types:

| qtype      | example                               | answer            | why                  |
|------------|---------------------------------------|-------------------|----------------------|
| `colour`   | what colour is at row 1 column 2 ?    | red               | lookup (easy)        |
| `shape`    | what shape is at row 1 column 2 ?     | circle            | lookup (easy)        |
| `position` | what is at row 3 column 1 ?           | blue square       | lookup of both       |
| `count`    | how many red shapes are there ?       | 2                 | aggregate            |
| `exist`    | is there a red circle ?               | yes / no          | binding (hard)       |
| `where`    | where is the blue square ?            | row 1 column 2    | retrieval (hard)     |
| `relation` | what is left of the red circle ?      | green cross       | retrieval + hop      |

The "no" answers of `exist` are near misses (the colour or the shape is present) so
they cannot be answered from colour or shape alone, and `relation` asks about an
occupied neighbour 60% of the time so that "nothing" is not a free majority answer.

The output is an ordinary LLaVA manifest per split plus PNGs, so the rest of the
pipeline runs on it exactly as on a user's data. `scenes.json` keeps each image's
objects so that tests can re-derive every answer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from alignkd.demo.tiny_models import BASE_WORDS

GRID = 3
CELL = 16
IMAGE_SIZE = GRID * CELL  # 48 px
COLOURS = {
    "red": (215, 45, 45),
    "green": (40, 165, 60),
    "blue": (45, 75, 220),
    "yellow": (225, 200, 35),
}
SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
QTYPES = ("colour", "shape", "position", "count", "exist", "where", "relation")
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "above": (-1, 0), "below": (1, 0)}
MIN_OBJECTS, MAX_OBJECTS = 2, 5
QUESTIONS_PER_IMAGE = 4
BACKGROUND = 240
SPLITS = ("train", "val", "test")
EXTRA_WORDS = ["nothing", "shapes", "are", *PLURALS.values()]


@dataclass(frozen=True)
class WorldObject:
    row: int  # 0-based; questions say row + 1
    col: int
    colour: str
    shape: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


Scene = tuple[WorldObject, ...]


@dataclass(frozen=True)
class WorldPaths:
    root: Path
    images_root: Path
    train: Path
    val: Path
    test: Path
    scenes: Path

    def manifest(self, split: str) -> Path:
        return {"train": self.train, "val": self.val, "test": self.test}[split]


def world_vocabulary() -> list[str]:
    """Every word a question or answer uses, for `build_word_tokenizer`."""
    return list(dict.fromkeys([*BASE_WORDS, *EXTRA_WORDS]))


def sample_scene(rng: np.random.Generator) -> Scene:
    n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    kinds = rng.choice(len(COLOURS) * len(SHAPES), size=n, replace=False)
    colours = list(COLOURS)
    return tuple(
        WorldObject(int(c) // GRID, int(c) % GRID, colours[int(k) // len(SHAPES)], SHAPES[int(k) % len(SHAPES)])
        for c, k in sorted(zip(cells, kinds))
    )


def _shape_mask(shape: str, dy: int, dx: int) -> np.ndarray:
    """A CELL×CELL boolean mask of `shape`, centred with an offset of (dy, dx) px."""
    y, x = np.mgrid[0:CELL, 0:CELL]
    y, x = y - (CELL - 1) / 2 - dy, x - (CELL - 1) / 2 - dx
    if shape == "circle":
        return x**2 + y**2 <= 5.5**2
    if shape == "square":
        return (abs(x) <= 5) & (abs(y) <= 5)
    if shape == "triangle":  # apex up, base at the bottom
        return (y <= 5) & (y >= -6) & (abs(x) <= (y + 6) / 2)
    return ((abs(x) <= 1.5) & (abs(y) <= 6)) | ((abs(y) <= 1.5) & (abs(x) <= 6))


def render_scene(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """An IMAGE_SIZE² RGB uint8 image; position and colour jitter keep it from being a lookup table."""
    img = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), BACKGROUND, dtype=np.int16)
    img += rng.integers(-6, 7, size=img.shape, dtype=np.int16)
    for obj in scene:
        dy, dx = (int(v) for v in rng.integers(-1, 2, size=2))
        colour = np.array(COLOURS[obj.colour]) + rng.integers(-20, 21, size=3)
        cell = img[obj.row * CELL:(obj.row + 1) * CELL, obj.col * CELL:(obj.col + 1) * CELL]
        cell[_shape_mask(obj.shape, dy, dx)] = colour
    return np.clip(img, 0, 255).astype(np.uint8)


def _at(scene: Scene, row: int, col: int) -> WorldObject | None:
    return next((o for o in scene if (o.row, o.col) == (row, col)), None)


def _cell_words(row: int, col: int) -> str:
    return f"row {row + 1} column {col + 1}"


def ask(scene: Scene, qtype: str, rng: np.random.Generator) -> tuple[str, str]:
    """One (question, answer) pair of `qtype` about `scene`."""
    target = scene[int(rng.integers(len(scene)))]
    if qtype in ("colour", "shape"):
        answer = target.colour if qtype == "colour" else target.shape
        return f"what {qtype} is at {_cell_words(target.row, target.col)} ?", answer
    if qtype == "position":
        # Mostly occupied cells, so that "nothing" is not the majority answer.
        cell = target.row * GRID + target.col if rng.random() < 0.6 else int(rng.integers(GRID * GRID))
        obj = _at(scene, cell // GRID, cell % GRID)
        return f"what is at {_cell_words(cell // GRID, cell % GRID)} ?", obj.name if obj else "nothing"
    if qtype == "count":
        if rng.random() < 0.5:
            colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
            return f"how many {colour} shapes are there ?", str(sum(o.colour == colour for o in scene))
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        return f"how many {PLURALS[shape]} are there ?", str(sum(o.shape == shape for o in scene))
    if qtype == "exist":
        if rng.random() < 0.5:
            return f"is there a {target.name} ?", "yes"
        present = {o.name for o in scene}
        misses = [f"{c} {s}" for c in COLOURS for s in SHAPES
                  if f"{c} {s}" not in present and (c == target.colour or s == target.shape)]
        return f"is there a {misses[int(rng.integers(len(misses)))]} ?", "no"
    if qtype == "where":
        return f"where is the {target.name} ?", _cell_words(target.row, target.col)
    if qtype == "relation":
        return _ask_relation(scene, rng)
    raise ValueError(f"unknown qtype {qtype!r}; expected one of {QTYPES}")


def _ask_relation(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    pairs = []  # (object, direction, neighbour or None) with the neighbour cell inside the grid
    for obj in scene:
        for word, (dr, dc) in DIRECTIONS.items():
            r, c = obj.row + dr, obj.col + dc
            if 0 <= r < GRID and 0 <= c < GRID:
                pairs.append((obj, word, _at(scene, r, c)))
    occupied = [p for p in pairs if p[2] is not None]
    pool = occupied if occupied and rng.random() < 0.6 else pairs
    obj, word, neighbour = pool[int(rng.integers(len(pool)))]
    return f"what is {word} of the {obj.name} ?", neighbour.name if neighbour else "nothing"


def scene_to_json(scene: Scene) -> list[dict]:
    return [{"row": o.row, "col": o.col, "colour": o.colour, "shape": o.shape} for o in scene]


def scene_from_json(items: list[dict]) -> Scene:
    return tuple(WorldObject(**item) for item in items)


@dataclass(frozen=True)
class SceneKind:
    """What the split writer needs from a generated world: how a scene is drawn from a
    generator, rendered, asked about and stored in scenes.json (bench/heldout_world.py's
    digit world is the second kind)."""
    sample: Callable        # rng -> scene
    render: Callable        # (scene, rng) -> uint8 image
    ask: Callable           # (scene, qtype, rng) -> (question, answer)
    to_json: Callable       # scene -> JSON-able list
    questions_per_image: int


def write_split(root: Path, split: str, rng: np.random.Generator, n: int, qtypes: tuple[str, ...],
                kind: SceneKind) -> tuple[list[dict], dict]:
    """Write split `split`'s images under `root/images`; return its records and {image: scene JSON}."""
    from PIL import Image

    records, scenes = [], {}
    scene, image = None, ""
    for i in range(n):
        if i % kind.questions_per_image == 0:
            scene = kind.sample(rng)
            image = f"{split}-{i // kind.questions_per_image:05d}.png"
            Image.fromarray(kind.render(scene, rng)).save(root / "images" / image)
            scenes[image] = kind.to_json(scene)
        qtype = qtypes[i % len(qtypes)]  # several questions per image, cycling types: every image sees a mix
        question, answer = kind.ask(scene, qtype, rng)
        records.append(manifest_record(f"{split}-{i:06d}", image, question, answer, qtype))
    return records, scenes


def write_splits(root: Path, sizes: dict[str, int], rng_of: Callable[[str], np.random.Generator],
                 qtypes: tuple[str, ...], kind: SceneKind) -> dict:
    """`images/` and `{split}.json` of every split, each from its own generator `rng_of(split)`, so
    the splits are independent and changing n_val never changes the training set. Returns every
    scene, for the scenes.json the caller writes last (its presence means the world is complete)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    all_scenes = {}
    for split, n in sizes.items():
        records, scenes = write_split(root, split, rng_of(split), n, qtypes, kind)
        write_json(root / f"{split}.json", records)
        all_scenes.update(scenes)
    return all_scenes


def manifest_record(record_id: str, image: str, question: str, answer: str, qtype: str) -> dict:
    """One LLaVA-format single-turn record; `qtype` lets `alignkd eval` score per type."""
    return {
        "id": record_id,
        "image": image,
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": answer},
        ],
        "qtype": qtype,
    }


GRID_SCENES = SceneKind(sample_scene, render_scene, ask, scene_to_json, QUESTIONS_PER_IMAGE)


def write_json(path: Path, obj) -> None:
    """Write `obj` to a temporary name, then rename: a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=0))
    os.replace(tmp, path)


def generate_world(out_dir: str | Path, seed: int = 0, n_train: int = 8000, n_val: int = 700,
                   n_test: int = 1400, qtypes: tuple[str, ...] = QTYPES) -> WorldPaths:
    """Write `images/`, `{train,val,test}.json` and `scenes.json` under `out_dir`.

    `n_*` count question records; every image carries QUESTIONS_PER_IMAGE of them, and
    the question types cycle through `qtypes` (the teacher was trained on all of QTYPES).
    `scenes.json` is written last, so its presence means the world is complete.
    """
    unknown = set(qtypes) - set(QTYPES)
    if unknown or not qtypes:
        raise ValueError(f"qtypes must be a non-empty subset of {QTYPES}, got {qtypes!r}")
    root = Path(out_dir)
    all_scenes = write_splits(root, dict(zip(SPLITS, (n_train, n_val, n_test))),
                              lambda split: np.random.default_rng([seed, SPLITS.index(split)]), tuple(qtypes),
                              GRID_SCENES)
    write_json(root / "scenes.json", {"seed": seed, "scenes": all_scenes})
    return world_paths(root)


def world_paths(root: str | Path) -> WorldPaths:
    root = Path(root)
    return WorldPaths(root, root / "images", root / "train.json", root / "val.json",
                      root / "test.json", root / "scenes.json")


def read_scenes(paths: WorldPaths) -> dict[str, Scene]:
    data = json.loads(paths.scenes.read_text())
    return {image: scene_from_json(items) for image, items in data["scenes"].items()}
