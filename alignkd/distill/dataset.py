"""Student batches built purely from the cache: cached token ids plus the student's image inputs.

Nothing is re-tokenised: the teacher's `input_ids` and label mask are the student's
inputs, which is why the trainer first checks that the student tokenizer agrees with
them. Images come from the bytes stored in the cache, or from `--images` when the
cache was built with `--no-store-images`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from alignkd.errors import AlignKDError

# Processed images kept per dataset (per worker), keyed by the image's sha256: LLaVA-style
# data asks several questions about one image, and the image processor is ~2/3 of the
# per-sample load time (bench/distill_step.py). The bound is in bytes, not images: 256 MB
# holds ~190 LLaVA images at 336 px (fp32) but every one of a small world's 48 px images,
# which then never go through the processor twice in a run of many epochs.
IMAGE_CACHE_BYTES = 256 * 2**20


class CachedDistillDataset(Dataset):
    """Index i -> one student example with its teacher targets, as tensors."""

    def __init__(self, cache_path: str, processor, images_root: str | None = None) -> None:
        from alignkd.cache.reader import open_cache

        self.cache_path = str(cache_path)
        # crc32 per tensor is cheap next to decoding, and names a sample corrupted after verify
        self.reader = open_cache(cache_path, check_crc=True)
        self.processor = processor
        self.images_root = images_root
        self._image_cache: OrderedDict[str, dict] = OrderedDict()
        self._image_cache_bytes = 0

    def __len__(self) -> int:
        return len(self.reader)

    def collate(self, items: list[dict]) -> dict:
        return collate_distill(items, self.processor.tokenizer.pad_token_id)

    def _image_bytes(self, sample) -> bytes | None:
        if sample.image_bytes is not None:
            return sample.image_bytes
        if sample.image_path is None:
            return None
        if self.images_root is None:
            raise AlignKDError(
                f"cache {self.cache_path} holds no image bytes for sample {sample.sample_id}; "
                "pass --images with the directory the cache was built from."
            )
        path = Path(self.images_root) / sample.image_path
        if not path.is_file():
            raise AlignKDError(f"image {path} for sample {sample.sample_id} does not exist.")
        return path.read_bytes()

    def __getitem__(self, index: int) -> dict:
        from alignkd.data import image_inputs_from_bytes

        sample = self.reader[index]
        image_bytes = self._image_bytes(sample)
        if image_bytes is None:
            return item_from_record(sample, {})
        key = sample.image_sha256 or hashlib.sha256(image_bytes).hexdigest()
        image_inputs = self._image_cache.get(key)
        if image_inputs is None:
            image_inputs = image_inputs_from_bytes(self.processor, image_bytes)
            self._remember_image(key, image_inputs)
        else:
            self._image_cache.move_to_end(key)
        return item_from_record(sample, image_inputs)

    def _remember_image(self, key: str, image_inputs: dict) -> None:
        """Least-recently-used eviction until the kept tensors fit IMAGE_CACHE_BYTES."""
        self._image_cache[key] = image_inputs
        self._image_cache_bytes += _nbytes(image_inputs)
        while self._image_cache_bytes > IMAGE_CACHE_BYTES and len(self._image_cache) > 1:
            _, evicted = self._image_cache.popitem(last=False)
            self._image_cache_bytes -= _nbytes(evicted)


def _nbytes(image_inputs: dict) -> int:
    return sum(v.numel() * v.element_size() for v in image_inputs.values() if isinstance(v, torch.Tensor))


def item_from_record(rec, image_inputs: dict) -> dict:
    """A cached (or live-built) `SampleRecord` -> the student's inputs plus `t_*` teacher targets."""
    ids = torch.from_numpy(np.asarray(rec.input_ids, dtype=np.int64))
    item = {"input_ids": ids,
            "labels": ids.masked_fill(~torch.from_numpy(np.asarray(rec.label_mask, dtype=bool)), -100)}
    for name in ("text_positions", "logit_positions", "logit_ids"):
        item[f"t_{name}"] = torch.from_numpy(np.asarray(getattr(rec, name), dtype=np.int64))
    for name in ("attn", "vision", "focus", "logit_values", "logit_tail"):  # attn [T, H, Nv], vision [Nv, D]
        item[f"t_{name}"] = torch.from_numpy(np.asarray(getattr(rec, name), dtype=np.float32))
    item.update(image_inputs)
    return item


def _pad(tensors: list[torch.Tensor], value, length: int | None = None) -> torch.Tensor:
    """Right-pad the first axis of each tensor to a common length and stack."""
    length = length or max(t.shape[0] for t in tensors)
    out = tensors[0].new_full((len(tensors), length, *tensors[0].shape[1:]), value)
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t
    return out


def collate_distill(items: list[dict], pad_token_id: int) -> dict:
    """Pad a list of examples into one batch; teacher targets get explicit validity masks.

    Sequences are right-padded, so the cached positions are also batch positions.
    """
    lengths = [it["input_ids"].shape[0] for it in items]
    width = max(it["t_logit_ids"].shape[1] for it in items)  # sampled logits differ per sample
    batch = {
        "input_ids": _pad([it["input_ids"] for it in items], pad_token_id),
        "labels": _pad([it["labels"] for it in items], -100),
        "attention_mask": _pad([torch.ones(n, dtype=torch.long) for n in lengths], 0),
        "t_text_positions": _pad([it["t_text_positions"] for it in items], -1),
        "t_attn": _pad([it["t_attn"] for it in items], 0.0),
        "t_vision": torch.stack([it["t_vision"] for it in items]),
        "t_focus": torch.stack([it["t_focus"] for it in items]),
        "t_logit_positions": _pad([it["t_logit_positions"] for it in items], -1),
        "t_logit_ids": _pad([_pad_k(it["t_logit_ids"], width, -1) for it in items], -1),
        "t_logit_values": _pad([_pad_k(it["t_logit_values"], width, 0.0) for it in items], 0.0),
        "t_logit_tail": _pad([it["t_logit_tail"] for it in items], 0.0),
    }
    image_keys = [k for k in items[0] if k not in batch and not k.startswith("t_")]
    for key in image_keys:
        batch[key] = torch.cat([it[key] for it in items if key in it])
    return batch


def _pad_k(t: torch.Tensor, width: int, value) -> torch.Tensor:
    """Pad the K axis of a [P, K] logit table to `width`."""
    if t.shape[1] == width:
        return t
    out = t.new_full((t.shape[0], width), value)
    out[:, : t.shape[1]] = t
    return out
