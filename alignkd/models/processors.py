"""The processor of a local model directory, with or without a working torchvision.

`AutoProcessor` builds every sub-processor a processor class declares. Qwen2/2.5/3-VL,
LLaVA-OneVision and InternVL declare a video processor, and video processors need
torchvision, which has no CPU wheel that pairs with the pinned CPU torch. alignkd never
feeds video, so when the stock processor does not load, the same processor class is
assembled without its video slot: the directory's tokenizer, its image processor (the
`*Pil` classes, chosen automatically when torchvision is absent) and its chat template,
through the class's own `from_pretrained`, so every saved processor option still applies.
The stock processor is used whenever it loads.

A processor class that transformers itself declares torchvision-only (Mistral3's
`PixtralProcessor`) is replaced by alignkd's stand-in of the same name
(`STAND_INS`), which works on the `*Pil` image processor.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

from alignkd.errors import AlignKDError

SKIPPED_SLOTS = ("video_processor",)
# transformers processor classes that cannot be imported without torchvision -> alignkd's stand-in
STAND_INS = {"PixtralProcessor": "alignkd.models.pixtral_processor"}


def load_processor(path: Path, model_type: str, *, trust_remote_code: bool = False):
    """The directory's processor: the stock one, else the same class without a video slot."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as stock_error:  # ImportError, OSError, ValueError... all mean "try without video"
        try:
            return assemble_without_video(path, model_type)
        except Exception as error:
            raise AlignKDError(
                f"cannot load a processor from {path}: AutoProcessor failed ({_first_line(stock_error)}) and "
                f"assembling one without a video processor failed ({_first_line(error)})."
            ) from None


def assemble_without_video(path: Path, model_type: str):
    """`model_type`'s processor class, loaded from `path` with its video slot left out."""
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    name = PROCESSOR_MAPPING_NAMES.get(model_type)
    if name is None:
        raise AlignKDError(f"transformers names no processor class for model type {model_type!r}")

    stock = getattr(transformers, name)
    if getattr(stock, "is_dummy", False) and name in STAND_INS:  # a placeholder for a torchvision-only class
        stock = getattr(importlib.import_module(STAND_INS[name]), name)
    # SmolVLM's __init__ requires a video_processor argument: give it None explicitly
    extra = {slot: None for slot in SKIPPED_SLOTS if slot in inspect.signature(stock.__init__).parameters}
    return without_video(stock).from_pretrained(path, local_files_only=True, **extra)


def without_video(stock):
    """A subclass of processor class `stock` that has no video slot. Same class name, so
    save_pretrained writes the stock processor_class."""
    slots = [a for a in stock.get_attributes() if a not in SKIPPED_SLOTS]
    return type(stock.__name__, (stock,), {"get_attributes": classmethod(lambda _cls: list(slots)),
                                           "__module__": stock.__module__,
                                           "video_processor": AbsentVideoProcessor()})


class AbsentVideoProcessor:
    """Stands in for the missing video slot where a processor reads its defaults even for
    image-only input (SmolVLM's apply_chat_template reads num_frames and fps)."""

    num_frames = None
    fps = None


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__).rstrip(".")
