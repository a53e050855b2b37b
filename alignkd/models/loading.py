"""Load a local VLM directory (weights, processor, family row) the one way alignkd trusts.

Only local directories and only safetensors: a pickle checkpoint can run code on load,
and the cache records a weights fingerprint that must describe exactly what ran.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkd.errors import AlignKDError
from alignkd.models.families import VLMFamily, get_family
from alignkd.models.placement import Placement, check_covers, check_gpus, from_pretrained_kwargs

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class LoadedVLM:
    """A loaded model with its processor and family facts. `model` is in eval mode."""

    model: Any
    processor: Any
    family: VLMFamily
    path: Path


def load_vlm(path, *, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False,
             placement: Placement | None = None) -> LoadedVLM:
    """Load the VLM in local directory `path` for capture; the caller switches to train() if it trains.

    With a `placement`, transformers and accelerate spread the model over the devices it
    names (`device` is then unused), offloading what it places on "disk" to its folder;
    `alignkd.models.placement.input_device(model)` says where the inputs go.
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from alignkd.models.processors import load_processor

    path = Path(path)
    _check_model_dir(path)
    if dtype not in DTYPES:
        raise AlignKDError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    with _naming(path, "config.json"):
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    family = get_family(config)
    placed = {}
    if placement is not None:
        check_gpus(placement)
        check_covers(path, config, placement, trust_remote_code)
        placed = from_pretrained_kwargs(placement)
    with _naming(path, "weights"):
        model = AutoModelForImageTextToText.from_pretrained(
            path,
            dtype=getattr(torch, dtype),
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            local_files_only=True,
            attn_implementation=family.get_attn_implementation(config),
            **placed,
        )
    if placement is None:  # a dispatched model stays where accelerate put it
        model.to(device)
    model.eval()
    with _naming(path, "tokenizer or processor"):
        processor = load_processor(path, config.model_type, trust_remote_code=trust_remote_code)
    return LoadedVLM(model=model, processor=processor, family=family, path=path)


@contextmanager
def _naming(path: Path, part: str):
    """A model directory that fails to load is a user error naming the directory and the part.

    transformers, safetensors and tokenizers raise many unrelated types for damaged files
    (OSError, ValueError, SafetensorError, JSONDecodeError, Exception from Rust), so this
    boundary catches Exception; our own AlignKDErrors pass through unchanged.
    """
    try:
        yield
    except AlignKDError:
        raise
    except Exception as exc:  # noqa: BLE001 - see the docstring
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AlignKDError(f"model directory {path}: the {part} could not be loaded ({detail}).") from None


def _check_model_dir(path: Path) -> None:
    if not path.exists():
        raise AlignKDError(f"model directory {path} does not exist.")
    if not path.is_dir():
        raise AlignKDError(f"model directory {path} is not a directory.")
    if not (path / "config.json").is_file():
        raise AlignKDError(f"model directory {path} has no config.json.")
    if not any(path.glob("*.safetensors")):
        raise AlignKDError(
            f"model directory {path} has no .safetensors weights (alignkd loads safetensors only)."
        )
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        try:  # transformers reports an unreadable weights file as a missing one
            with open(file, "rb"):
                pass
        except PermissionError:
            raise AlignKDError(f"model directory {path}: {file.name} cannot be read (permission denied).") from None
