"""A cache's layer-0 kit (`--attn-store layer0`): written once, hashed in cache.json, checked,
and turned back into the attention rows a maps-cache would have stored.

The rows come from `alignkd.models.layer0_kit.Layer0Kit` on the cache's own per-sample
inputs: `input_ids`, the stored vision tokens, the replayed columns (token_type_ids,
mm_token_type_ids, image_grid_thw) and the stored text positions. One kit per cache,
device and process (`load_cache_kit`): a reader's single-sample reads and a training
step's batched recompute both reuse it.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict

import numpy as np

from alignkd.cache.shard_format import CacheFormatError
from alignkd.errors import AlignKDError
from alignkd.storage_schemas import LAYER0_KIT_DIR

# a recomputed probability may differ from the live capture by float rounding only
RECOMPUTE_TOLERANCE = 1e-3
# (pid, cache, device) -> Layer0Kit, loaded once per process; the least recently used go past
# MAX_KITS (a 7B teacher's kit is ~0.3 GB, a Qwen-VL-7B's ~1.1 GB: its 152k-row embedding table)
_KITS: OrderedDict[tuple, object] = OrderedDict()
MAX_KITS = 2


def kit_record(kit) -> dict:
    """What cache.json keeps of a kit (storage["layer0_kit"]): each file's size and sha256."""
    return {"files": {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                      for name, data in kit.files().items()}}


def save_kit(store, kit) -> None:
    """Write the kit's files into the cache, whole (a no-op when a resumed cache has them)."""
    def fill(into) -> None:
        for name, data in kit.files().items():
            (into / name).write_bytes(data)

    store.write_dir(LAYER0_KIT_DIR, fill)


def kit_problems(store, storage: dict) -> list[tuple[str, str]]:
    """(file, problem) for every kit file that is missing or does not hash to cache.json's sha256."""
    return _read_kit(store, storage)[1]


def _read_kit(store, storage: dict) -> tuple[dict[str, bytes], list[tuple[str, str]]]:
    """The kit's files as cache.json lists them (read once), and what is wrong with them."""
    files, problems = {}, []
    if storage.get("attn_store") == "layer0" and "layer0_kit" not in storage:
        problems.append((LAYER0_KIT_DIR, "cache.json records no layer-0 kit for --attn-store layer0"))
    for name, want in storage.get("layer0_kit", {}).get("files", {}).items():
        rel = f"{LAYER0_KIT_DIR}/{name}"
        try:
            files[name] = store.read_bytes(rel)
        except FileNotFoundError:
            problems.append((rel, "missing"))
            continue
        if len(files[name]) != want["bytes"] or hashlib.sha256(files[name]).hexdigest() != want["sha256"]:
            problems.append((rel, "sha256 does not match cache.json (corrupted)"))
    return files, problems


def load_cache_kit(store, meta: dict, device="cpu"):
    """The cache's kit as a `Layer0Kit` on `device`, its bytes checked against cache.json; loaded
    once per process, cache and device."""
    import torch

    from alignkd.models.layer0_kit import KIT_CONFIG_FILE, KIT_WEIGHTS_FILE, KitBytes, Layer0Kit

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" are one kit
        device = torch.device("cuda", torch.cuda.current_device())
    key = (os.getpid(), str(store), str(device))
    if key not in _KITS:
        files, problems = _read_kit(store, meta.get("storage", {}))
        if problems:
            rel, why = problems[0]
            raise CacheFormatError(f"{store.name_of(rel)}: {why}; run alignkd cache verify {store}.")
        _KITS[key] = Layer0Kit(KitBytes(config=files[KIT_CONFIG_FILE], weights=files[KIT_WEIGHTS_FILE]), device)
        while len(_KITS) > MAX_KITS:
            _KITS.popitem(last=False)
    _KITS.move_to_end(key)
    return _KITS[key]


def kit_inputs(input_ids, attention_mask, columns: dict) -> dict:
    """The forward inputs the kit replays: ids, mask and the replayed columns that are present
    (image_grid_thw as [images, 3])."""
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    for name, value in columns.items():
        if value is not None and value.numel():
            inputs[name] = value.reshape(-1, 3) if name == "image_grid_thw" else value
    return inputs


def rows_of_record(kit, rec) -> np.ndarray:
    """[T, H, Nv] float32 rows of one cached sample, recomputed on the kit's device."""
    import torch

    from alignkd.storage_schemas import REPLAYED_COLUMNS

    T, Nv = len(rec.text_positions), len(rec.vision_positions)
    if not T or not Nv:
        return np.zeros((T, kit.num_heads, Nv), np.float32)
    ids = torch.from_numpy(np.asarray(rec.input_ids, np.int64))[None]
    columns = {k: torch.from_numpy(np.asarray(getattr(rec, k), np.int64))[None] for k in REPLAYED_COLUMNS}
    columns["image_grid_thw"] = columns["image_grid_thw"][0]
    inputs = kit_inputs(ids, torch.ones_like(ids), columns)
    vision = torch.from_numpy(np.asarray(rec.vision, np.float32))[None]
    text = torch.from_numpy(np.asarray(rec.text_positions, np.int64))[None]
    return kit.text_vision_rows(inputs, vision, text)[0].cpu().numpy()


def check_recompute(kit, model_inputs: dict, cap, family: str) -> None:
    """Refuse --attn-store layer0 for a teacher whose kit does not reproduce its captured layer-0
    attention (a family or checkpoint whose layer 0 depends on something the kit lacks)."""
    import torch

    from alignkd.storage_schemas import REPLAYED_COLUMNS

    columns = {k: model_inputs.get(k) for k in REPLAYED_COLUMNS}
    mask = model_inputs.get("attention_mask")
    ids = model_inputs["input_ids"]
    inputs = kit_inputs(ids, torch.ones_like(ids) if mask is None else mask, columns)
    weights = kit.layer0_weights(inputs, cap.vision_tokens)
    pos = cap.vision_positions.clamp(min=0).to(weights.device)
    got = weights.gather(3, pos[:, None, None, :].expand(-1, weights.shape[1], weights.shape[2], -1))
    valid = (cap.vision_mask.to(weights.device)[:, None, None, :]
             & inputs["attention_mask"].bool().to(weights.device)[:, None, :, None])
    diff = float(torch.where(valid, (got.float() - cap.attn_text_vision.to(weights.device).float()).abs(), 0.0)
                 .max()) if valid.any() else 0.0
    if not diff <= RECOMPUTE_TOLERANCE:
        raise AlignKDError(f"model family {family!r}: its layer-0 attention recomputed from the cache's inputs "
                           f"differs from the teacher's by {diff:.2g}, so --attn-store layer0 cannot hold it "
                           "exactly; build with --attn-store maps.")
