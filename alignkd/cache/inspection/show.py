"""`alignkd cache show`: what the teacher's text looked at in each image.

One row of panels per image: the text focus (Σ over text queries of the head-mean layer-0
attention to each vision token) over the image, then the head-mean attention row of each
answer token. The vision tokens are laid out as the teacher's family lays them out
(alignkd/cache/inspection/vision_layout.py): Qwen's merged-patch grid, Pixtral's rows, tiles with their
global view, LLaVA-NeXT's any-res canvas without its newline tokens, a square elsewhere.

A sample with more than MAX_TOKEN_PANELS answer tokens is drawn on several pages: OUT.png
holds the first ones, OUT-p2.png the next, and so on; every page says which tokens it
holds, so none is left out unsaid.

Everything is read from the cache, on local disk or object storage: the panel titles are
the answer tokens decoded as text by the tokenizer the build kept in it (never raw BPE
pieces such as "Ġbuilding"), and the processor settings a layout needs come from the
processor files kept beside that tokenizer (for a cache built before they were kept: the
teacher directory, if it is still there; never the network).
"""

from __future__ import annotations

import io
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alignkd.errors import AlignKDError, ConfigError

MAX_TOKEN_PANELS = 8  # answer tokens on one page; the rest go on further pages
TITLE_CHARS = 34
PANEL_INCHES = 3.4


def show_sample(cache_path: str, sample_id: str, out: str, images_root: str | None = None) -> Path:
    """Draw `sample_id` of the cache at `cache_path` into the PNG `out` (and its further pages)."""
    return show_pages(cache_path, sample_id, out, images_root)[0]


def show_pages(cache_path: str, sample_id: str, out: str, images_root: str | None = None) -> list[Path]:
    """Every page `cache show` writes for the sample: `out`, then OUT-p2.png, ... (see the module docstring)."""
    import matplotlib.pyplot as plt

    out_path = check_png_out(out)
    view = load_view(cache_path, sample_id, images_root)
    paths = [out_path if k == 0 else out_path.with_name(f"{out_path.stem}-p{k + 1}.png") for k in range(view.pages)]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for page, path in enumerate(paths):
        fig = page_figure(view, page)
        try:
            fig.savefig(path, dpi=100, format="png")
        finally:
            plt.close(fig)
    return paths


def check_png_out(out: str) -> Path:
    """The file `--out` names, which must be a .png file: matplotlib would otherwise pick the
    format from the suffix (a traceback for .json) or write OUT.png beside a directory."""
    path = Path(out)
    if path.is_dir():
        raise ConfigError(f"--out {out} is a directory; name the PNG file to write, e.g. {path / 'sample.png'}.")
    if path.suffix.lower() != ".png":
        raise ConfigError(f"--out {out} must name a .png file: cache show writes PNG only.")
    return path


@dataclass
class SampleView:
    """What every page of a sample draws from: read once from the cache."""

    sample_id: str
    family: str
    images: list
    grids: list
    focus: np.ndarray
    attn: np.ndarray       # [T, Nv]: the head-mean attention row of each text query
    rows: list[int]        # the text queries that are answer tokens (rows of attn)
    names: list[str]       # their titles

    @property
    def pages(self) -> int:
        return max(1, -(-len(self.rows) // MAX_TOKEN_PANELS))


def sample_figure(cache_path: str, sample_id: str, images_root: str | None = None, page: int = 0):
    """The figure of one page `show_pages` saves: a row of panels per image of the sample."""
    return page_figure(load_view(cache_path, sample_id, images_root), page)


def load_view(cache_path: str, sample_id: str, images_root: str | None = None) -> SampleView:
    from alignkd.cache.reader import open_cache
    from alignkd.cache.inspection.vision_layout import image_grids

    reader = open_cache(cache_path, check_crc=True)  # a damaged sample is refused, never drawn
    try:
        sample = reader[reader.index_of(sample_id)]
    except KeyError as err:
        if isinstance(err, AlignKDError) and "give one of their sample ids" in str(err):
            raise  # a record id that several samples share: the reader lists their keys
        raise AlignKDError(f"sample {sample_id!r} is not in cache {cache_path}.") from None
    if sample.n_images == 0:
        raise AlignKDError(f"sample {sample_id!r} is text only: there is no image attention to show.")
    if len(sample.text_positions) == 0:
        raise AlignKDError(f"sample {sample_id!r} has no text queries after the image to show.")
    family = reader.meta.get("teacher_shapes", {}).get("model_type", "")
    tokenizer, settings = kept_tokenizer_and_settings(reader)
    images = _load_images(sample, images_root)
    grids = image_grids(sample, family, token_name=tokenizer.convert_ids_to_tokens if tokenizer else None,
                        image_sizes=[None if im is None else (im.height, im.width) for im in images],
                        settings=settings)
    label_mask = np.asarray(sample.label_mask, dtype=bool)
    rows = [i for i, pos in enumerate(sample.text_positions) if label_mask[pos]]
    attn = np.zeros((0, 0), np.float32)
    if sample.attn is None:  # built with --skip attn: the focus panel only (the focus is always stored)
        rows = []
    else:
        attn = np.asarray(sample.attn, dtype=np.float32).mean(axis=1)
    positions = [int(sample.text_positions[i]) for i in rows]
    ids = [int(t) for t in sample.input_ids]
    return SampleView(sample_id, family, images, grids, np.asarray(sample.focus, dtype=np.float32), attn, rows,
                      token_texts(tokenizer, [ids[p] for p in positions], context=ids, positions=positions))


def page_figure(view: SampleView, page: int = 0):
    """Page `page` of the sample: the text focus, then up to MAX_TOKEN_PANELS answer tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from alignkd.cache.inspection.vision_layout import layout_image

    first = page * MAX_TOKEN_PANELS
    rows, names = view.rows[first:first + MAX_TOKEN_PANELS], view.names[first:first + MAX_TOKEN_PANELS]
    layouts = [layout_image(view.focus[g.start:g.end], g, view.family) for g in view.grids]
    heights = [PANEL_INCHES * float(np.clip(_aspect(image, layout), 0.3, 1.5)) + 0.7
               for image, layout in zip(view.images, layouts)]
    fig, axes = plt.subplots(len(view.grids), 1 + len(rows), squeeze=False, height_ratios=heights,
                             figsize=(PANEL_INCHES * (1 + len(rows)), sum(heights)))
    for k, (grid, image, layout) in enumerate(zip(view.grids, view.images, layouts)):
        span = slice(grid.start, grid.end)
        _draw(axes[k][0], image, layout, "inferno")
        title = _focus_title(view.sample_id, k, len(view.grids), layout, view.focus[span])
        if view.pages > 1:
            title += (f"\nanswer tokens {first + 1}-{first + len(rows)} of {len(view.rows)} "
                      f"(page {page + 1} of {view.pages})")
        axes[k][0].set_title(title, fontsize=9)
        for ax, row, name in zip(axes[k][1:], rows, names):
            _draw(ax, image, layout_image(view.attn[row, span], grid, view.family), "viridis")
            ax.set_title(f"answer token {name}"[:TITLE_CHARS], fontsize=9)
    fig.tight_layout()
    return fig


def _aspect(image, layout) -> float:
    """Height over width of a panel: the image's, else the picture's."""
    if image is not None:
        return image.height / image.width
    return layout.picture.shape[0] / layout.picture.shape[1]


def _focus_title(sample_id: str, k: int, n_images: int, layout, values: np.ndarray) -> str:
    head = f"{sample_id}: text focus" if n_images == 1 else f"{sample_id} image {k + 1}: text focus"
    note = layout.note
    total = float(values.sum())
    if layout.not_picture.any() and total > 0:
        note += f" ({values[layout.not_picture].sum() / total:.0%} of the focus)"
    return head + "\n" + textwrap.fill(note, 52)


def _draw(ax, image, layout, cmap: str) -> None:
    """The layout's picture over the image, on the part of the image it covers."""
    if image is None:
        ax.imshow(layout.picture, cmap=cmap, interpolation="nearest")
    else:
        top, left, bottom, right = layout.region
        width, height = image.size
        ax.imshow(image, extent=(0, width, height, 0))
        ax.imshow(layout.picture, cmap=cmap, alpha=0.55, interpolation="nearest",
                  extent=(left * width, right * width, bottom * height, top * height))
        ax.set_xlim(min(0.0, left * width), max(width, right * width))
        ax.set_ylim(max(height, bottom * height), min(0.0, top * height))
    ax.set_xticks([])
    ax.set_yticks([])


def _load_images(sample, images_root: str | None) -> list:
    """Each image of the sample, in order; None where it is neither stored nor under `images_root`."""
    stored = sample.image_bytes or ()
    return [_load_image(sample, k, stored[k] if k < len(stored) else None, images_root)
            for k in range(sample.n_images)]


def _load_image(sample, k: int, data: bytes | None, images_root: str | None):
    from PIL import Image

    name = sample.image_paths[k] if k < len(sample.image_paths) else ""
    try:
        if data is not None:
            return Image.open(io.BytesIO(data)).convert("RGB")
        if name and images_root and (Path(images_root) / name).is_file():
            return Image.open(Path(images_root) / name).convert("RGB")
    except (OSError, ValueError) as err:
        raise AlignKDError(f"sample {sample.sample_id!r}: its image {k + 1} cannot be decoded ({err}).") from None
    return None


def kept_tokenizer_and_settings(reader) -> tuple[object | None, dict]:
    """The tokenizer and processor settings kept in the cache (copied down from object
    storage), else the teacher directory's if it is still there; never from the network."""
    from alignkd.cache.inspection.vision_layout import read_settings
    from alignkd.storage_schemas import TOKENIZER_DIR

    teacher = reader.meta.get("teacher", {}).get("path")
    teacher = teacher if teacher and Path(teacher).is_dir() else None
    with reader.store.local_copy(TOKENIZER_DIR) as local:
        tokenizer = _tokenizer_from([local, teacher])
        settings = (read_settings(local) if local else {}) or (read_settings(teacher) if teacher else {})
    return tokenizer, settings


def _tokenizer_from(directories: list):
    from transformers import AutoTokenizer

    for directory in directories:
        if directory is None:
            continue
        try:
            return AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except Exception:  # noqa: BLE001 - a damaged or partial tokenizer: try the next place
            continue
    return None


def token_texts(tokenizer, ids: list[int], context: list[int] | None = None,
                positions: list[int] | None = None) -> list[str]:
    """Each id decoded on its own as text ("building", not the BPE piece "Ġbuilding").

    A token that is only whitespace is named ('\\n', and "' ' (space)" for LLaVA's lone "▁",
    which decodes to nothing on its own); a token that is part of a character spread over
    several tokens (an emoji's bytes) is named by that character, found in `context` (the
    sample's ids) around `positions`, and which part it is. "id N" without a tokenizer.
    """
    texts = []
    for k, i in enumerate(ids):
        try:
            text = tokenizer.decode([i])
        except Exception:  # noqa: BLE001 - no tokenizer, or an id it does not know
            texts.append(f"id {i}")
            continue
        if "\ufffd" in text and context is not None:
            text = _part_of_character(tokenizer, context, positions[k]) or text
        texts.append(text.strip() or _whitespace_name(tokenizer, i, text))
    return texts


def _part_of_character(tokenizer, ids: list[int], at: int) -> str | None:
    """The smallest run of tokens around `at` that decodes whole, as "CHAR part j/n"."""
    for width in range(2, 9):
        for start in range(max(0, at - width + 1), at + 1):
            end = start + width
            text = tokenizer.decode(ids[start:end]).strip() if end <= len(ids) else ""
            if text and "\ufffd" not in text:
                return f"{_printable(text)} part {at - start + 1}/{width}"
    return None


def _printable(text: str) -> str:
    """Characters the titles' font draws as they are, U+XXXX for the rest (emoji, CJK)."""
    return "".join(c if ord(c) < 0x2E80 else f" U+{ord(c):04X} " for c in text).strip()


def _whitespace_name(tokenizer, token_id: int, text: str) -> str:
    if text == "":  # a SentencePiece "▁" alone: the space it stands for is dropped when decoded alone
        piece = tokenizer.convert_ids_to_tokens(token_id) or ""
        spaces = len(piece) if piece and set(piece) <= {"▁", "Ġ"} else 0
        return f"{' ' * spaces!r} (space)" if spaces else repr(piece)
    return f"{text!r} (space)" if set(text) == {" "} else repr(text)


def _token_labels(reader, ids: list[int]) -> list[str]:
    """The texts of `ids` from the tokenizer kept in `reader`'s cache."""
    return token_texts(kept_tokenizer_and_settings(reader)[0], ids)
