"""The one record type both halves of the cache share: what the builder hands the writer is
exactly what the reader hands back (tensors decoded to float32, ids to int64)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SampleRecord:
    """One teacher-processed sample, all numpy: what build hands the writer and the reader returns."""
    sample_id: str
    manifest_row: int
    input_ids: np.ndarray        # int32 [L]
    label_mask: np.ndarray       # bool [L]
    vision_positions: np.ndarray  # int32 [Nv]
    text_positions: np.ndarray   # int32 [T]
    attn: np.ndarray             # float32 [T, H, Nv]
    vision: np.ndarray           # float32 [Nv, D]
    focus: np.ndarray            # float32 [Nv]
    logit_positions: np.ndarray  # int32 [P]
    logit_ids: np.ndarray        # int64 [P, K], -1 = padding
    logit_values: np.ndarray     # float32 [P, K]
    logit_tail: np.ndarray       # float32 [P]
    teacher_ce: float
    teacher_entropy: float
    teacher_tail_mass: float
    # one entry per image, in placeholder order (none for a text-only sample); image k's
    # vision tokens are the next image_n_vision[k] entries of the vision-token axis
    image_paths: tuple[str, ...] = ()           # the manifest's path ("" for bytes without one)
    image_sha256: tuple[str, ...] = ()
    image_bytes: tuple[bytes, ...] | None = None  # None: the cache keeps no image bytes
    image_n_vision: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # int32 [n_images]
    # the replayed columns (storage_schemas.REPLAYED_COLUMNS, one field each): the family's per-token
    # model inputs and Qwen-VL's image grid, replayed by the student (empty when unused)
    token_type_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))     # int32 [L] or [0]
    mm_token_type_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # int32 [L] or [0]
    image_grid_thw: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))     # int32 [3 * images] or [0]
    record_id: str = ""  # the manifest's id ("" = sample_id); sample_id is the unique key
    source: str = ""     # the --data source the record came from

    @property
    def n_images(self) -> int:
        return len(self.image_sha256)

    def vision_ranges(self) -> list[tuple[int, int]]:
        """[start, end) of each image's tokens on the vision-token axis."""
        ends = np.cumsum(np.asarray(self.image_n_vision, dtype=np.int64)).tolist()
        return list(zip([0, *ends[:-1]], ends))
    # Set only by `CacheReader.get(i, widen=False)`: attn, vision and logit_values then stay in
    # their stored width (see alignkd/cache/encodings.py) and these say how to widen them.
    encodings: dict | None = None         # {"attn": ..., "vision": ..., "logit_values": ...}
    attn_scale: np.ndarray | None = None  # float32 [T, H] for uint8-log attention
    # A cache built with --attn-topk k read with widen=False: `attn` holds each row's k kept
    # values [T, H, k], these their vision columns and the rest of each row's vision mass.
    attn_ids: np.ndarray | None = None    # int64 [T, H, k]
    attn_tail: np.ndarray | None = None   # float32 [T, H]
    vision_scale: np.ndarray | None = None  # float32 [D] for int8-channel vision
