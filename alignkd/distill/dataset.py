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
from alignkd.storage_schemas import SCALE_OF
from alignkd.storage_schemas import TOKEN_INPUT_COLUMNS as TOKEN_INPUTS  # replayed per-token model inputs
from alignkd.storage_schemas.kinds import TARGET_KINDS, TARGET_POSITIONS, kinds_where, scaled_kinds

# Processed images kept per dataset (per worker), keyed by the image's sha256: LLaVA-style
# data asks several questions about one image, and the image processor is ~2/3 of the
# per-sample load time (bench/distill_step.py). The bound is in bytes, not images: 256 MB
# holds ~190 LLaVA images at 336 px (fp32) but every one of a small world's 48 px images,
# which then never go through the processor twice in a run of many epochs.
IMAGE_CACHE_BYTES = 256 * 2**20


class CachedDistillDataset(Dataset):
    """Index i -> one student example with its teacher targets, as tensors."""

    def __init__(self, cache_path: str, processor, images_root: str | None = None, *,
                 image_token_id: int | None = None, vocab_size: int | None = None, check_crc: bool = False,
                 prefetch_shards: bool = False) -> None:
        from alignkd.cache.reader import open_cache

        self.cache_path = str(cache_path)
        # crc32 per tensor names a sample corrupted after `verify`, at ~1/3 of the read's CPU;
        # `alignkd distill` turns it on when --no-verify skipped the sha256 check of every file
        self.reader = open_cache(cache_path, check_crc=check_crc, prefetch_shards=prefetch_shards)
        self.processor = processor
        self.images_root = images_root
        self.image_token_id = image_token_id  # to check the student's image tokens per sample
        self.vocab_size = vocab_size  # the student's logit width; teacher ids past it are dropped
        self.logit_mode = self.reader.meta.get("build_options", {}).get("logit_mode", "topk")
        self._image_cache: OrderedDict[str, tuple[dict, int | None]] = OrderedDict()
        self._image_cache_bytes = 0

    def __len__(self) -> int:
        return len(self.reader)

    @property
    def shard_of(self) -> np.ndarray:
        """Each sample's shard number: what the window order groups by (distill.sampling)."""
        return self.reader.shard_of

    def collate(self, items: list[dict]) -> dict:
        return collate_distill(items, self.processor.tokenizer.pad_token_id)

    def _image_blobs(self, sample) -> list[bytes]:
        """The sample's encoded images in order: from the cache, or from --images."""
        if sample.image_bytes is not None:
            return list(sample.image_bytes)
        blobs = []
        for name in sample.image_paths:
            if self.images_root is None or not name:
                raise AlignKDError(
                    f"cache {self.cache_path} holds no image bytes for sample {sample.sample_id}; "
                    + ("pass --images with the directory the cache was built from." if name else
                       "its image came as bytes with no path, so rebuild the cache with --store-images."))
            path = Path(self.images_root) / name
            if not path.is_file():
                raise AlignKDError(f"image {path} for sample {sample.sample_id} does not exist.")
            blobs.append(path.read_bytes())
        return blobs

    def __getitem__(self, index: int) -> dict:
        from alignkd.data import concat_padded

        sample = self.reader.get(index, widen=False)  # stored widths: the objective widens on its device
        blobs = self._image_blobs(sample)
        if not blobs:
            return item_from_record(sample, {}, self.vocab_size, self.logit_mode)
        encoded = []
        for k, blob in enumerate(blobs):
            key = sample.image_sha256[k] if k < len(sample.image_sha256) else hashlib.sha256(blob).hexdigest()
            entry = self._image_cache.get(key)
            if entry is None:
                entry = self._encode_image(blob, sample)
                self._remember_image(key, entry)
            else:
                self._image_cache.move_to_end(key)
            encoded.append(entry)
        check_images_fit(sample, encoded, self.image_token_id)
        image_inputs = {name: concat_padded([inputs[name] for inputs, _ in encoded]) for name in encoded[0][0]}
        return item_from_record(sample, image_inputs, self.vocab_size, self.logit_mode)

    def _encode_image(self, image_bytes: bytes, sample) -> tuple[dict, int | None]:
        """(image inputs, how many image tokens the student's processor gives this image)."""
        from alignkd.data import image_encoding_from_bytes

        inputs, ids = image_encoding_from_bytes(self.processor, image_bytes, sample_id=sample.sample_id)
        count = None if self.image_token_id is None else int((ids == self.image_token_id).sum())
        return inputs, count

    def _remember_image(self, key: str, entry: tuple[dict, int | None]) -> None:
        """Least-recently-used eviction until the kept tensors fit IMAGE_CACHE_BYTES."""
        self._image_cache[key] = entry
        self._image_cache_bytes += _nbytes(entry[0])
        while self._image_cache_bytes > IMAGE_CACHE_BYTES and len(self._image_cache) > 1:
            _, evicted = self._image_cache.popitem(last=False)
            self._image_cache_bytes -= _nbytes(evicted[0])


def _nbytes(image_inputs: dict) -> int:
    return sum(v.numel() * v.element_size() for v in image_inputs.values() if isinstance(v, torch.Tensor))


def check_images_fit(sample, encoded: list[tuple[dict, int | None]], image_token_id: int | None) -> None:
    """Refuse a sample whose images the student's processor turns into other image tokens
    than the teacher saw (another grid, resolution or tiling): the cached attention and
    vision targets would not line up with the student's vision tokens. `encoded` holds
    (image inputs, image-token count) per image, in order."""
    cached = np.asarray(sample.image_n_vision).tolist()
    if image_token_id is not None and None not in (counts := [n for _, n in encoded]) and counts != cached:
        one = len(counts) == 1
        raise AlignKDError(
            f"sample {sample.sample_id}: the student's processor gives its image{'' if one else 's'} "
            f"{counts[0] if one else counts} image tokens but the teacher saw {cached[0] if one else cached}; "
            "teacher and student must share the image processor.")
    grids = [inputs["image_grid_thw"].reshape(-1).tolist() for inputs, _ in encoded if "image_grid_thw" in inputs]
    grid = [v for g in grids for v in g]
    if grid and len(sample.image_grid_thw) and grid != np.asarray(sample.image_grid_thw).tolist():
        raise AlignKDError(
            f"sample {sample.sample_id}: the student's image grid {grid} differs from the teacher's "
            f"{np.asarray(sample.image_grid_thw).tolist()}; teacher and student must share the image processor.")


def item_from_record(rec, image_inputs: dict, vocab_size: int | None = None, logit_mode: str = "topk") -> dict:
    """A cached (or live-built) `SampleRecord` -> the student's inputs plus `t_*` teacher targets.

    The family's per-token inputs (mm_token_type_ids, token_type_ids) are the teacher's,
    replayed. With `vocab_size`, teacher logit ids the student's head has no row for are
    dropped (`restrict_logits`).

    A record read with `widen=False` keeps attention, vision tokens and logit values in their
    stored width (bf16/fp16/uint8/int8 plus scales, and `t_*_encoding` names the encoding):
    half or a quarter of the float32 bytes cross the DataLoader, and `widen_targets` restores
    float32 on the training device.
    """
    from alignkd.cache.encodings import to_torch_stored
    from alignkd.distill.vocab import restrict_logits

    ids = torch.from_numpy(np.asarray(rec.input_ids, dtype=np.int64))
    item = {"input_ids": ids,
            "labels": ids.masked_fill(~torch.from_numpy(np.asarray(rec.label_mask, dtype=bool)), -100)}
    for name in TOKEN_INPUTS:
        if len(getattr(rec, name)):
            item[name] = torch.from_numpy(np.asarray(getattr(rec, name), dtype=np.int64))
    for name in (*TARGET_POSITIONS, *kinds_where(batch="index")):  # positions and logit ids
        item[f"t_{name}"] = torch.from_numpy(np.asarray(getattr(rec, name), dtype=np.int64))
    for name in kinds_where(batch="float"):  # focus, logit_tail
        item[f"t_{name}"] = torch.from_numpy(np.asarray(getattr(rec, name), dtype=np.float32))
    enc = rec.encodings or {}
    for name in kinds_where(batch="stored"):  # attn [T, H, Nv], vision [Nv, D], values [P, K]
        if getattr(rec, name) is None:  # not stored: --skip, or --attn-store layer0 (recomputed on device)
            if name == "attn" and len(rec.image_grid_thw):  # the layer-0 kit's input: the teacher's own grid
                item["t_image_grid_thw"] = torch.from_numpy(np.asarray(rec.image_grid_thw, np.int64).reshape(-1, 3))
            continue
        if name in enc:
            item[f"t_{name}"] = to_torch_stored(getattr(rec, name), enc[name])
        else:
            item[f"t_{name}"] = torch.from_numpy(np.asarray(getattr(rec, name), dtype=np.float32))
    for name in scaled_kinds():
        if name in enc:
            item[f"t_{name}_encoding"] = enc[name]
            scale = getattr(rec, SCALE_OF[name])
            if scale is not None:
                item[f"t_{SCALE_OF[name]}"] = torch.from_numpy(scale)
    if rec.attn_ids is not None:  # --attn-topk: each row's kept columns and the rest's mass, densified on device
        item["t_attn_ids"] = torch.from_numpy(rec.attn_ids.astype(np.int64))
        item["t_attn_tail"] = torch.from_numpy(np.asarray(rec.attn_tail, np.float32))
    if vocab_size is not None:
        item["t_logit_ids"], item["t_logit_values"], item["t_logit_tail"] = restrict_logits(
            item["t_logit_ids"], item["t_logit_values"], item["t_logit_tail"], vocab_size, logit_mode)
    item.update(image_inputs)
    return item


def widen_targets(batch: dict) -> dict:
    """Stored-width teacher targets -> float32, on whatever device the batch is on."""
    from alignkd.cache.encodings import widen

    out = dict(batch)
    for name in scaled_kinds():
        enc = out.pop(f"t_{name}_encoding", None)
        scale = out.pop(f"t_{SCALE_OF[name]}", None)
        if enc is not None:
            out[f"t_{name}"] = widen(out[f"t_{name}"], enc, scale)
    if "t_attn_ids" in out:
        out["t_attn"] = rows_from_top_torch(out["t_attn"].float(), out.pop("t_attn_ids"), out.pop("t_attn_tail"),
                                            out["t_vision_mask"])
    return out


def rows_from_top_torch(values: torch.Tensor, ids: torch.Tensor, tail: torch.Tensor,
                        vision_mask: torch.Tensor) -> torch.Tensor:
    """Batched `rows_from_top` on the training device: [B, T, H, k] kept values (ids -1 = padding),
    [B, T, H] tail mass -> [B, T, H, Nv] rows, the tail spread evenly over each sample's own other
    vision columns (vision_mask [B, Nv]) and nothing in padded columns."""
    kept = ids >= 0
    n_vision = vision_mask.sum(-1).to(values.dtype)[:, None, None]           # [B, 1, 1]
    fill = tail.float() / (n_vision - kept.sum(-1)).clamp(min=1)              # [B, T, H]
    rows = fill[..., None] * vision_mask[:, None, None, :].to(values.dtype)   # [B, T, H, Nv]
    slot = torch.where(kept, ids, torch.full_like(ids, rows.shape[-1]))       # padding -> a spare column
    rows = torch.cat([rows, rows.new_zeros(*rows.shape[:-1], 1)], -1)
    rows.scatter_(-1, slot, torch.where(kept, values, 0.0))
    return rows[..., :-1]


PAD_IN_PLACE_ELEMENTS = 1 << 20  # above this, fill only the padding (7B-shaped attention batches)


def _pad(tensors: list[torch.Tensor], value) -> torch.Tensor:
    """Right-pad every axis of each tensor to the largest size and stack (ragged T, Nv).

    Inside a DataLoader worker the batch is allocated in shared memory, as torch's default
    collate does: otherwise sending it to the trainer copies every byte once more (a third
    of a 7B-shaped batch's collate time). A large batch has only its padding filled; a small
    one is filled whole, which is cheaper than the per-axis slicing.
    """
    shape = (len(tensors), *(max(t.shape[d] for t in tensors) for d in range(tensors[0].dim())))
    out = _empty_batch(tensors[0], shape)
    in_place = out.numel() > PAD_IN_PLACE_ELEMENTS
    if not in_place:
        out.fill_(value)
    for i, t in enumerate(tensors):
        out[(i, *(slice(0, n) for n in t.shape))] = t
        if in_place:
            _fill_padding(out[i], t.shape, value)
    return out


def _fill_padding(row: torch.Tensor, filled: tuple[int, ...], value) -> None:
    """Set all of `row` outside its leading `filled` box to `value`: for each axis, the part
    past the box on that axis and inside it on the axes before (together, the complement)."""
    for axis, n in enumerate(filled):
        if n < row.shape[axis]:
            row[(*(slice(0, m) for m in filled[:axis]), slice(n, None))] = value


def _empty_batch(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    from torch.utils.data import get_worker_info

    if get_worker_info() is None:
        return like.new_empty(shape)
    numel = int(np.prod(shape))
    storage = like.untyped_storage()._new_shared(numel * like.element_size())
    return like.new_empty(0).set_(storage, 0, shape)


def collate_distill(items: list[dict], pad_token_id: int) -> dict:
    """Pad a list of examples into one batch; teacher targets get explicit validity masks.

    Sequences are right-padded, so the cached positions are also batch positions. The
    vision-token count may differ per sample: t_attn [B, T, H, Nv], t_vision [B, Nv, D] and
    t_focus [B, Nv] are zero-padded to the batch's largest Nv and `t_vision_mask` [B, Nv]
    marks the real columns (the student's capture pads the same way).
    """
    from alignkd.data import concat_padded

    lengths = [it["input_ids"].shape[0] for it in items]
    width = max(it["t_logit_ids"].shape[1] for it in items)  # sampled logits differ per sample
    batch = {
        "input_ids": _pad([it["input_ids"] for it in items], pad_token_id),
        "labels": _pad([it["labels"] for it in items], -100),
        "attention_mask": _pad([torch.ones(n, dtype=torch.long) for n in lengths], 0),
        # the real vision columns, from focus [Nv]: stored whatever --skip left out
        "t_vision_mask": _pad([torch.ones(it["t_focus"].shape[0], dtype=torch.bool) for it in items], False),
    }
    for name in TARGET_POSITIONS:
        batch[f"t_{name}"] = _pad([it[f"t_{name}"] for it in items], -1)
    for kind in TARGET_KINDS:
        # a target absent from every sample (--skip, or layer0's attention rows) is absent from the batch
        if not kind.batch or not any(f"t_{kind.name}" in it for it in items):
            continue
        pad = -1 if kind.batch == "index" else 0.0
        tensors = [it[f"t_{kind.name}"] for it in items]
        batch[f"t_{kind.name}"] = _pad([_pad_k(t, width, pad) for t in tensors] if kind.logit_width else tensors, pad)
    if any("t_image_grid_thw" in it for it in items):  # [images, 3] in batch order, as the processor gives it
        batch["t_image_grid_thw"] = torch.cat([it["t_image_grid_thw"] for it in items if "t_image_grid_thw" in it])
    for name in scaled_kinds():
        encodings = {it.get(f"t_{name}_encoding") for it in items}
        if len(encodings) > 1:
            raise ValueError(f"one batch mixes {name} encodings {sorted(map(str, encodings))}")
        if None not in encodings:
            batch[f"t_{name}_encoding"] = encodings.pop()
    if "t_attn_scale" in items[0]:   # [T, H] per sample, padded like the attention rows
        batch["t_attn_scale"] = _pad([it["t_attn_scale"] for it in items], 0.0)
    if any("t_attn_ids" in it for it in items):  # --attn-topk: [T, H, k] column ids (-1: padding), [T, H] tail
        # a text-only sample has no rows and keeps no columns
        rows = [it["t_attn"].shape[:2] for it in items]
        batch["t_attn_ids"] = _pad([it["t_attn_ids"] if "t_attn_ids" in it else torch.zeros((*r, 0), dtype=torch.long)
                                    for it, r in zip(items, rows)], -1)
        batch["t_attn_tail"] = _pad([it["t_attn_tail"] if "t_attn_tail" in it else torch.zeros(r)
                                     for it, r in zip(items, rows)], 0.0)
    if "t_vision_scale" in items[0]:  # [D] per sample
        batch["t_vision_scale"] = torch.stack([it["t_vision_scale"] for it in items])
    for key in TOKEN_INPUTS:
        if all(key in it for it in items):
            batch[key] = _pad([it[key] for it in items], 0)
    image_keys = [k for k in items[0] if k not in batch and not k.startswith("t_") and k not in TOKEN_INPUTS]
    for key in image_keys:
        batch[key] = concat_padded([it[key] for it in items if key in it])
    return batch


def _pad_k(t: torch.Tensor, width: int, value) -> torch.Tensor:
    """Pad the K axis of a [P, K] logit table to `width`."""
    if t.shape[1] == width:
        return t
    out = t.new_full((t.shape[0], width), value)
    out[:, : t.shape[1]] = t
    return out
