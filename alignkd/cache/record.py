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
    image_path: str | None = None
    image_sha256: str | None = None
    image_bytes: bytes | None = None
    # the family's per-token model inputs, replayed by the student (empty when unused)
    token_type_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))     # int32 [L] or [0]
    mm_token_type_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # int32 [L] or [0]
    image_grid_thw: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))     # int32 [3 * images] or [0]
