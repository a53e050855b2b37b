"""Image files: safe path resolution, decoding, and the processor's image inputs.

The cache may store the raw image bytes, and the distill stage rebuilds the pixel
inputs from those bytes (`image_inputs_from_bytes`) instead of re-reading the images
directory, so both stages must decode through the same function.
"""

from __future__ import annotations

import hashlib
import io
import re
from contextlib import contextmanager
from pathlib import Path

from alignkd.data.errors import SampleError
from alignkd.data.sample import LoadedImage
from alignkd.storage_schemas import TOKEN_INPUT_COLUMNS

# Keys of a processor's output that are per-token, not per-image. Of these, the
# TOKEN_INPUT_COLUMNS are model inputs some families need (Qwen-VL's mm_token_type_ids,
# Gemma3's token_type_ids), which the cache keeps; the family row says which ones its forward takes.
# ("labels": PaliGemma's processor adds them whenever it returns token_type_ids)
TOKEN_KEYS = frozenset({"input_ids", "attention_mask", "offset_mapping", "text_replacement_offsets", "labels",
                        *TOKEN_INPUT_COLUMNS})


def load_image(images_root: str | Path | None, ref, sample_id: str, row: int | None) -> LoadedImage:
    """Decode one `ImageRef`: its bytes (Parquet), or its path under `images_root`, refusing
    anything that leaves the root."""
    from alignkd.errors import ConfigError

    if ref.data is not None:
        data = ref.data
    elif images_root is None and ref.row_may_lack_root:
        raise SampleError(sample_id, row, "missing_image", f"names image {ref.path!r} by path only (no bytes), and "
                          "no --images directory was given to find it under")
    elif images_root is None:
        raise ConfigError(f"sample {sample_id!r} names image {ref.path!r} but no images directory was given.")
    else:
        path = resolve_image_path(images_root, ref.path, sample_id, row)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise SampleError(sample_id, row, "unreadable_image",
                              f"has image {ref.path!r} that cannot be read ({err.strerror})") from None
    return LoadedImage(decode_image(data, sample_id, row, ref.name), data, hashlib.sha256(data).hexdigest(), ref.path)


def resolve_image_path(images_root: str | Path, rel_path: str, sample_id: str, row: int | None) -> Path:
    root = Path(images_root).resolve()
    if Path(rel_path).is_absolute():
        raise SampleError(sample_id, row, "image_outside_root",
                          f"has an absolute image path {rel_path!r}; paths must be relative to the images root")
    try:
        # resolve() follows symlinks, so a link inside the root that points outside is caught too
        path = (root / rel_path).resolve()
        outside, missing = not path.is_relative_to(root), not path.is_file()
    except (OSError, ValueError) as err:  # a name too long, a NUL byte, a symlink loop, a locked directory
        reason = "unreadable_image" if isinstance(err, PermissionError) else "missing_image"
        raise SampleError(sample_id, row, reason,
                          f"has image path {rel_path[:80]!r} that cannot be resolved ({err})") from None
    if outside:
        raise SampleError(sample_id, row, "image_outside_root",
                          f"has image {rel_path!r} that resolves outside the images root {root}")
    if missing:
        what = "is a directory, not an image file," if path.is_dir() else "does not exist"
        raise SampleError(sample_id, row, "missing_image", f"has image {rel_path!r} that {what} under {root}")
    return path


def decode_image(data: bytes, sample_id: str, row: int | None, name: str = "image"):
    """Decode image bytes to an RGB PIL image, or raise a `corrupt_image` SampleError."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        # PIL names its buffer ("cannot identify image file <_io.BytesIO object at 0x7f...>"): name the image
        words = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", repr(name), str(err))
        raise SampleError(sample_id, row, "corrupt_image", f"has {name!r} that cannot be decoded ({words})") from None


@contextmanager
def image_refusals_as_rejects(processor, loaded: list, sample_id: str, row: int | None):
    """Around the processor's call on one sample: a ValueError that its image processor also
    raises for one of the sample's images alone (Qwen-VL: an aspect ratio over 200) becomes a
    `bad_image` reject with the processor's words, and the build goes on. Any other error is
    not about one image and keeps its traceback."""
    try:
        yield
    except ValueError:
        for index, img in enumerate(loaded):
            reason = _refusal(processor, img)
            if reason is not None:
                name = repr(img.name) if img.name else f"number {index + 1}"
                raise SampleError(sample_id, row, "bad_image",
                                  f"has image {name} that the processor refuses ({reason})") from None
        raise


def _refusal(processor, img) -> str | None:
    """The image processor's ValueError for this image alone, or None if it takes the image."""
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        return None
    try:
        image_processor(images=[img.image], return_tensors="pt")
    except ValueError as err:
        return str(err).strip().rstrip(".") or type(err).__name__
    return None


def image_inputs_from_bytes(processor, image_bytes: bytes, *, sample_id: str = "<unknown>",
                            row: int | None = None) -> dict:
    """The processor's image inputs (e.g. pixel_values, batch dim 1) rebuilt from raw bytes.

    Goes through the processor's own __call__ with a lone image token, so every
    processor-level image kwarg applies exactly as it did when the sample was rendered.
    """
    return image_encoding_from_bytes(processor, image_bytes, sample_id=sample_id, row=row)[0]


def image_encoding_from_bytes(processor, image_bytes: bytes, *, sample_id: str = "<unknown>",
                              row: int | None = None) -> tuple[dict, "object"]:
    """(image inputs, input_ids [1, n]) of the processor on a lone image token: the ids say
    how many image tokens this processor gives this image."""
    image = decode_image(image_bytes, sample_id, row)
    out = processor(text=[processor.image_token], images=[image], return_tensors="pt")
    return image_inputs_of(out), out["input_ids"]


def image_inputs_of(processor_output) -> dict:
    return {k: v for k, v in processor_output.items() if k not in TOKEN_KEYS}
