"""Where each cached vision token sits in its image, family by family: the picture `cache show` draws.

Over 300 lines on purpose: one small function per layout kind, twelve families' worth, read
as one table.

The cache keeps one image's vision tokens in sequence order (the positions whose id is the
image token), and every family orders them its own way; its row in alignkd/models/families.py
names the layout kind (`vision_layout`), and `LAYOUT_KINDS` below maps each kind to its code:

- **merged patch grid** (Qwen2/2.5/3-VL): one token per merge x merge patches, raster over
  the grid `image_grid_thw` gives in patches divided by the merge size. The merge size
  follows from the counts (t*h*w patches make Nv tokens, so m^2 = t*h*w / Nv).
- **rows** (Mistral3/Pixtral): one run of `[IMG]` per row of merged patches. `[IMG_BREAK]`
  and `[IMG_END]` are not image tokens, so they are not among the cached vision tokens; the
  rows are the runs of consecutive vision positions.
- **tiles + a global view**: Idefics3/SmolVLM give each tile its own run, named by the
  `<row_i_col_j>` token just before it, and end with the `<global-img>` run; InternVL gives
  one run of `image_seq_length` tokens per tile, tiles row-major and a thumbnail last, in the
  grid GotOcr2's processor picks for the image's aspect ratio; LLaVA-NeXT/OneVision (any-res)
  start with the base view (side x side), then the unpadded tile canvas, H rows of W tokens
  each followed by an `image_newline` token. The newlines are image tokens (the capture
  keeps them) but no place in the picture: they are left out and flagged `not_picture`.
- **square**: LLaVA, Gemma3, PaliGemma.

Every token order was checked against the model code (pixel shuffles, patch mergers,
`pack_image_features`) in tests/test_show_layouts.py. A view that covers the whole image on
a coarser grid (global view, thumbnail, any-res base) is spread over the fine cells it
covers, area-weighted, so the picture is the mass each image region got from every view.
A layout the cache cannot support (a setting missing, counts that do not add up) falls back
to the tokens in sequence order, and its note says why; it never guesses silently.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alignkd.models.families import FAMILIES  # plain data: no torch comes with it
from alignkd.storage_schemas import PROCESSOR_FILES

FULL_IMAGE = (0.0, 0.0, 1.0, 1.0)
TILE_NAME = re.compile(r"<row_(\d+)_col_(\d+)>")


@dataclass(frozen=True)
class ImageGrid:
    """What one image's layout needs, all read from the cache."""

    start: int  # the image's range [start, end) on the sample's vision-token axis
    end: int
    positions: np.ndarray  # sequence positions of its vision tokens
    thw: tuple[int, int, int] | None = None  # Qwen-VL: its image_grid_thw row, in patches
    run_labels: tuple[str, ...] = ()  # Idefics3/SmolVLM: the token before each run of its positions
    image_hw: tuple[int, int] | None = None  # the image's (height, width) in pixels, as the processor saw it
    settings: dict = field(default_factory=dict)  # {"processor": {...}, "image_processor": {...}}


@dataclass(frozen=True)
class ImageLayout:
    """One image's vision-token values laid out as the image."""

    picture: np.ndarray  # [rows, cols] float, NaN where no token falls
    not_picture: np.ndarray  # bool [n]: tokens with no place in the image (LLaVA-NeXT's image_newline)
    # (top, left, bottom, right) the picture spans, in fractions of the image: a centre crop
    # spans less than the image, padding to a square more
    region: tuple[float, float, float, float] = FULL_IMAGE
    note: str = ""  # what the layout is, or why it fell back to the tokens in sequence order


class _Unfit(Exception):
    """The cache does not hold what this layout needs; the message says what."""


def layout_image(values, grid: ImageGrid, family: str) -> ImageLayout:
    """`values` (one per vision token of the image, e.g. its text focus) laid out as `family` lays
    out the image's tokens; the tokens in sequence order when the cache cannot say more."""
    values = np.asarray(values, dtype=np.float64)
    kind = layout_kind(family)
    if kind is None:
        return _in_order(values, f"no layout is known for model type {family!r}")
    if len(values) != grid.end - grid.start:
        raise ValueError(f"{len(values)} values for an image of {grid.end - grid.start} vision tokens")
    try:
        return LAYOUT_KINDS[kind](values, grid, family)
    except _Unfit as why:
        return _in_order(values, str(why))


def layout_kind(model_type: str) -> str | None:
    """The family row's `vision_layout`, None for a model type alignkd has no row for."""
    row = FAMILIES.get(model_type)
    return None if row is None else row.vision_layout


def image_grids(sample, family: str, *, token_name=None, image_sizes=(), settings: dict | None = None
                ) -> list[ImageGrid]:
    """One `ImageGrid` per image of a cached sample.

    A sample holds one image today: the whole vision-token axis and `image_grid_thw` row 0.
    `token_name(id) -> str` names the token before each run (Idefics3/SmolVLM tiles);
    `image_sizes` gives each image's (height, width), None where the image is not at hand.
    """
    spans = sample.vision_ranges()
    thw_rows = np.asarray(sample.image_grid_thw, dtype=np.int64).reshape(-1, 3)
    grids = []
    for k, (start, end) in enumerate(spans):
        positions = np.asarray(sample.vision_positions[start:end], dtype=np.int64)
        labels = ()
        if token_name is not None and layout_kind(family) == "named_tiles":
            labels = tuple(token_name(int(sample.input_ids[p - 1])) if p > 0 else "" for p in _run_starts(positions))
        grids.append(ImageGrid(
            start=start, end=end, positions=positions,
            thw=tuple(int(x) for x in thw_rows[k]) if k < len(thw_rows) else None,
            run_labels=labels, image_hw=image_sizes[k] if k < len(image_sizes) else None,
            settings=settings or {}))
    return grids


def read_settings(directory) -> dict:
    """The processor's settings from `directory`'s processor files: {"processor": top-level
    processor_config.json keys, "image_processor": its nested image processor (transformers 5
    saves it there) or else preprocessor_config.json (as published checkpoints lay it out)}."""
    found = {}
    for name in PROCESSOR_FILES:
        path = Path(directory) / name
        if path.is_file():
            try:
                found[name] = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
    processor = dict(found.get("processor_config.json", {}))
    image_processor = processor.pop("image_processor", None) or found.get("preprocessor_config.json", {})
    return {"processor": processor, "image_processor": dict(image_processor)} if found else {}


# ---------------------------------------------------------------- layouts
def _square(values, grid, family):
    if len(values) and np.any(np.diff(grid.positions) != 1):  # Gemma3 pan-and-scan: the image, then crops
        raise _Unfit("its tokens come in several runs (crops), whose places in the image are not laid out")
    picture = _square_map(values)
    region = _llava_region(grid.image_hw, grid.settings.get("image_processor", {})) if family == "llava" \
        else FULL_IMAGE
    return ImageLayout(picture, np.zeros(len(values), bool), region, f"{picture.shape[0]}x{picture.shape[1]} patches")


def _merged(values, grid, family):
    if grid.thw is None:
        raise _Unfit("the sample has no image_grid_thw")
    t, h, w = grid.thw
    merge = math.isqrt(t * h * w // max(len(values), 1))
    if merge < 1 or merge * merge * len(values) != t * h * w or h % merge or w % merge:
        raise _Unfit(f"image_grid_thw {grid.thw} does not make {len(values)} merged tokens")
    picture = values.reshape(t, h // merge, w // merge).sum(axis=0)
    return ImageLayout(picture, np.zeros(len(values), bool),
                       note=f"{h // merge}x{w // merge} merged patches (merge {merge})")


def _rows(values, grid, family):
    runs = np.split(np.arange(len(values)), np.flatnonzero(np.diff(grid.positions) != 1) + 1)
    if len({len(r) for r in runs}) != 1:
        raise _Unfit(f"its rows of [IMG] tokens differ in length ({sorted({len(r) for r in runs})})")
    picture = values.reshape(len(runs), len(runs[0]))
    return ImageLayout(picture, np.zeros(len(values), bool),
                       note=f"{picture.shape[0]} rows of {picture.shape[1]} merged patches")


def _named_tiles(values, grid, family):
    runs = np.split(np.arange(len(values)), np.flatnonzero(np.diff(grid.positions) != 1) + 1)
    if len(runs) != len(grid.run_labels):
        raise _Unfit("the tokens that name its tiles are not at hand (no tokenizer in the cache)")
    tiles, views = {}, []
    for run, label in zip(runs, grid.run_labels):
        named = TILE_NAME.fullmatch(label)
        if named:
            tiles[(int(named[1]) - 1, int(named[2]) - 1)] = _square_map(values[run])
        else:
            views.append(_square_map(values[run]))
    if len(views) != 1:
        raise _Unfit(f"expected one global view, found {len(views)}")
    if not tiles:
        return ImageLayout(views[0], np.zeros(len(values), bool), note="one view, not split into tiles")
    rows, cols = (max(k[i] for k in tiles) + 1 for i in (0, 1))
    if len(tiles) != rows * cols:
        raise _Unfit(f"tiles {sorted(tiles)} do not fill a grid")
    return _stitch(values, [tiles[(r, c)] for r in range(rows) for c in range(cols)], rows, cols, views[0],
                   "global view")


def _thumbnail_tiles(values, grid, family):
    per_tile = grid.settings.get("processor", {}).get("image_seq_length")
    if not per_tile:
        raise _Unfit("the processor's image_seq_length is not in the cache")
    n_views, rest = divmod(len(values), per_tile)
    if rest or n_views < 1:
        raise _Unfit(f"{len(values)} tokens are not whole tiles of {per_tile}")
    views = [_square_map(v) for v in np.split(values, n_views)]
    if n_views == 1:
        return ImageLayout(views[0], np.zeros(len(values), bool), note="one tile")
    if grid.image_hw is None:
        raise _Unfit("the image is not at hand, so its tile grid is unknown")
    size = grid.settings.get("image_processor", {}).get("size") or {}
    rows, cols = _tile_canvas(n_views - 1, grid.image_hw, (size.get("height"), size.get("width")))
    return _stitch(values, views[:-1], rows, cols, views[-1], "thumbnail")


def _anyres(values, grid, family):
    from transformers.image_processing_utils import select_best_resolution

    proc, ip = grid.settings.get("processor", {}), grid.settings.get("image_processor", {})
    if grid.image_hw is None:
        raise _Unfit("the image is not at hand, so its tile canvas is unknown")
    size = (ip.get("crop_size") if family == "llava_next" else None) or ip.get("size") or {}
    tile = size.get("height", size.get("shortest_edge")), size.get("width", size.get("shortest_edge"))
    try:
        if family == "llava_next":
            side = tile[0] // proc["patch_size"]
            base = side * side + proc.get("num_additional_image_tokens", 0) \
                - (proc.get("vision_feature_select_strategy") == "default")
        else:
            base = proc["num_image_tokens"]
            side = math.isqrt(base)
        best = select_best_resolution(list(grid.image_hw), ip["image_grid_pinpoints"])
    except (KeyError, TypeError) as missing:
        raise _Unfit(f"the processor setting {missing} is not in the cache") from None
    if base != side * side:
        raise _Unfit(f"its base view has {base} tokens, not a {side}x{side} grid")
    height, width = _unpadded(grid.image_hw, side * (best[0] // tile[0]), side * (best[1] // tile[1]))
    if family == "llava_onevision":  # pack_image_features shrinks a canvas past anyres_max_N base views
        most = int(proc.get("vision_aspect_ratio", "anyres_max_9").strip("anyres_max_"))
        ratio = math.sqrt(height * width / (most * side * side))
        if ratio > 1.1:
            height, width = int(height // ratio), int(width // ratio)
    if base + height * (width + 1) != len(values):
        raise _Unfit(f"{len(values)} tokens are not a {side}x{side} base view and {height} rows of {width}+1")
    canvas = values[base:].reshape(height, width + 1)
    not_picture = np.zeros(len(values), bool)
    not_picture[base + width::width + 1] = True
    picture = canvas[:, :width] + _spread(values[:base].reshape(side, side), (height, width))
    return ImageLayout(picture, not_picture,
                       note=f"{height}x{width} tile canvas + base view; newlines left out")


def _in_order(values, why: str) -> ImageLayout:
    width = max(1, math.ceil(math.sqrt(len(values))))
    picture = np.full(math.ceil(len(values) / width) * width, np.nan)
    picture[:len(values)] = values
    return ImageLayout(picture.reshape(-1, width), np.zeros(len(values), bool),
                       note=f"tokens in sequence order ({why})")


# a family row's `vision_layout` -> how its tokens are laid out (the module docstring describes each)
LAYOUT_KINDS = {"merged": _merged, "rows": _rows, "named_tiles": _named_tiles, "thumbnail_tiles": _thumbnail_tiles,
                "anyres": _anyres, "square": _square}


# ---------------------------------------------------------------- helpers
def _square_map(values) -> np.ndarray:
    side = math.isqrt(len(values))
    if side * side != len(values):
        raise _Unfit(f"{len(values)} tokens are not a square grid")
    return values.reshape(side, side)


def _run_starts(positions: np.ndarray) -> np.ndarray:
    return positions[np.r_[0, np.flatnonzero(np.diff(positions) != 1) + 1]] if len(positions) else positions


def _stitch(values, tiles: list, rows: int, cols: int, whole: np.ndarray, whole_name: str) -> ImageLayout:
    """Row-major tiles side by side, plus a view of the whole image spread over them."""
    picture = np.block([tiles[r * cols:(r + 1) * cols] for r in range(rows)])
    picture = picture + _spread(whole, picture.shape)
    return ImageLayout(picture, np.zeros(len(values), bool), note=f"{rows}x{cols} tiles + {whole_name}")


def _spread(coarse: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """`coarse` (a map over the whole image) resampled onto `shape` cells, each coarse cell's
    value shared among the fine cells by overlapping area, so the total is kept."""
    return _overlap(coarse.shape[0], shape[0]) @ coarse @ _overlap(coarse.shape[1], shape[1]).T


def _overlap(n_from: int, n_to: int) -> np.ndarray:
    """[n_to, n_from]: the fraction of source cell j that falls in target cell i (columns sum to 1)."""
    lo = np.maximum(np.arange(n_to)[:, None] / n_to, np.arange(n_from)[None] / n_from)
    hi = np.minimum((np.arange(n_to)[:, None] + 1) / n_to, (np.arange(n_from)[None] + 1) / n_from)
    return np.clip(hi - lo, 0, None) * n_from


def _tile_canvas(tiles: int, image_hw, tile_hw) -> tuple[int, int]:
    """(rows, cols) of `tiles` tiles as GotOcr2's processor picks them (get_optimal_tiled_canvas,
    restricted to the tile count the tokens show): the arrangement closest to the image's
    aspect ratio; on a tie, the later one if the image covers over half its canvas."""
    height, width = image_hw
    best, best_diff = (1, tiles), math.inf
    for cols in (c for c in range(1, tiles + 1) if tiles % c == 0):
        diff = abs(width / height - cols / (tiles // cols))
        if diff < best_diff:
            best, best_diff = (tiles // cols, cols), diff
        elif diff == best_diff and None not in tile_hw and width * height > 0.5 * tile_hw[0] * tile_hw[1] * tiles:
            best = (tiles // cols, cols)
    return best


def _unpadded(image_hw, height: int, width: int) -> tuple[int, int]:
    """The any-res canvas (in tokens) cut back to the image's aspect ratio, as unpad_image does."""
    orig_h, orig_w = image_hw
    if orig_w / orig_h > width / height:
        padding = (height - int(round(orig_h * (width / orig_w), 7))) // 2
        return height - 2 * padding, width
    padding = (width - int(round(orig_w * (height / orig_h), 7))) // 2
    return height, width - 2 * padding


def _llava_region(image_hw, ip: dict) -> tuple[float, float, float, float]:
    """The part of the image LLaVA's square grid sees: the whole image padded to a square
    (do_pad), then the centre crop of the image resized to its shortest edge (do_center_crop)."""
    if image_hw is None:
        return FULL_IMAGE
    height, width = image_hw
    top, left, bottom, right = FULL_IMAGE
    if ip.get("do_pad"):
        side = max(height, width)
        top, bottom = -(side - height) / 2 / height, 1 + (side - height) / 2 / height
        left, right = -(side - width) / 2 / width, 1 + (side - width) / 2 / width
        height = width = side
    crop, size = ip.get("crop_size") or {}, ip.get("size") or {}
    if ip.get("do_center_crop") and "height" in crop and "shortest_edge" in size:
        scale = size["shortest_edge"] / min(height, width)
        cut_y = max(0.0, 1 - crop["height"] / (height * scale)) / 2
        cut_x = max(0.0, 1 - crop["width"] / (width * scale)) / 2
        top, bottom = top + cut_y * (bottom - top), bottom - cut_y * (bottom - top)
        left, right = left + cut_x * (right - left), right - cut_x * (right - left)
    return (top, left, bottom, right)
