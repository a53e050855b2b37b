"""`alignkd cache show`: what the teacher's text looked at in the image.

The left panel overlays the text focus (Σ over text queries of the head-mean layer-0
attention to each vision token) on the image; the right panels show the head-mean
attention row of each answer token. Everything is read from the cache, the token strings
too (from the tokenizer the build kept in it), on local disk or object storage.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from alignkd.errors import AlignKDError

MAX_TOKEN_PANELS = 8


def _grid(values: np.ndarray) -> np.ndarray:
    """Vision tokens -> a 2-D grid: square when Nv is a square (LLaVA), else one row."""
    side = int(math.isqrt(len(values)))
    return values.reshape(side, side) if side * side == len(values) else values[None, :]


def _load_image(sample, images_root: str | None):
    from PIL import Image

    try:
        if sample.image_bytes is not None:
            return Image.open(io.BytesIO(sample.image_bytes)).convert("RGB")
        if sample.image_path and images_root and (Path(images_root) / sample.image_path).is_file():
            return Image.open(Path(images_root) / sample.image_path).convert("RGB")
    except (OSError, ValueError) as err:
        raise AlignKDError(f"sample {sample.sample_id!r}: its image cannot be decoded ({err}).") from None
    return None


def _token_labels(reader, ids: list[int]) -> list[str]:
    """Token strings from the tokenizer kept in the cache (copied down from object storage),
    else the teacher directory if it is still there; never from the network."""
    import tempfile

    from transformers import AutoTokenizer

    from alignkd.cache.location import filesystem, is_remote
    from alignkd.storage_schemas import TOKENIZER_DIR

    try:
        kept = reader.path / TOKENIZER_DIR
        if not kept.is_dir():
            tok = AutoTokenizer.from_pretrained(reader.meta["teacher"]["path"], local_files_only=True)
        elif is_remote(kept):
            with tempfile.TemporaryDirectory() as tmp:
                filesystem(kept).get(kept.path + "/", tmp, recursive=True)
                tok = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
        else:
            tok = AutoTokenizer.from_pretrained(kept, local_files_only=True)
        return [tok.convert_ids_to_tokens(i) for i in ids]
    except Exception:  # noqa: BLE001 - no tokenizer left anywhere; ids are still informative
        return [f"id {i}" for i in ids]


def show_sample(cache_path: str, sample_id: str, out: str, images_root: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from alignkd.cache.reader import open_cache

    reader = open_cache(cache_path)
    try:
        sample = reader[reader.index_of(sample_id)]
    except KeyError:
        raise AlignKDError(f"sample {sample_id!r} is not in cache {cache_path}.") from None
    if len(sample.text_positions) == 0:
        raise AlignKDError(f"sample {sample_id!r} has no text queries after the image to show.")
    attn = np.asarray(sample.attn, dtype=np.float32)          # [T, H, Nv]
    focus = _grid(np.asarray(sample.focus, dtype=np.float32))
    label_mask = np.asarray(sample.label_mask, dtype=bool)
    rows = [i for i, pos in enumerate(sample.text_positions) if label_mask[pos]][:MAX_TOKEN_PANELS]
    names = _token_labels(reader, [int(sample.input_ids[sample.text_positions[i]]) for i in rows])
    image = _load_image(sample, images_root)

    fig, axes = plt.subplots(1, 1 + len(rows), figsize=(3.4 * (1 + len(rows)), 3.4), squeeze=False)
    ax = axes[0][0]
    extent = (0, image.width, image.height, 0) if image is not None else None
    if image is not None:
        ax.imshow(image, extent=extent)
    ax.imshow(focus, cmap="inferno", alpha=0.55 if image is not None else 1.0, extent=extent,
              interpolation="nearest")
    ax.set_title(f"{sample_id}: text focus")
    for ax, row, name in zip(axes[0][1:], rows, names):
        ax.imshow(_grid(attn[row].mean(axis=0)), cmap="viridis", interpolation="nearest")
        ax.set_title(f"answer token {name!s}"[:28], fontsize=9)
    for ax in axes[0]:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
