"""A record's tensors -> each array's stored bytes: checked, encoded and compressed.

Pure and thread-safe (numpy and blosc release the GIL), so the writer runs `encode_sample`
on a pool of encoder threads (alignkd/cache/write_thread.py) while the teacher computes the
next batch; only appending the results to the shard files is serial.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from alignkd.cache.encodings import encode
from alignkd.cache.record import SampleRecord
from alignkd.cache.shard_format import CompressedSample, codec_for, compress_sample
from alignkd.storage_schemas import ABSENT, ARRAY_KINDS, EMPTY_ENCODINGS, ENCODED_DTYPE, SCALE_OF, chunk_elements


def check_record(rec: SampleRecord) -> None:
    """Shape agreement between the tensors; a mismatch is a builder bug, not a user error."""
    T, Nv = len(rec.text_positions), len(rec.vision_positions)
    P = len(rec.logit_positions)
    problems = []
    if rec.attn.ndim != 3 or rec.attn.shape[0] != T or rec.attn.shape[2] != Nv:
        problems.append(f"attn {rec.attn.shape} vs T={T}, Nv={Nv}")
    if rec.vision.ndim != 2 or rec.vision.shape[0] != Nv:
        problems.append(f"vision {rec.vision.shape} vs Nv={Nv}")
    if rec.focus.shape != (Nv,):
        problems.append(f"focus {rec.focus.shape} vs Nv={Nv}")
    if rec.logit_ids.ndim != 2 or rec.logit_ids.shape[0] != P or rec.logit_values.shape != rec.logit_ids.shape:
        problems.append(f"logit ids {rec.logit_ids.shape} / values {rec.logit_values.shape} vs P={P}")
    if rec.logit_tail.shape != (P,):
        problems.append(f"logit_tail {rec.logit_tail.shape} vs P={P}")
    if len(rec.label_mask) != len(rec.input_ids):
        problems.append("label_mask and input_ids differ in length")
    if problems:
        raise ValueError(f"sample {rec.sample_id}: " + "; ".join(problems))


def pack_logits(ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[P, K] padded rows -> (valid ids, their values, valid count per row), left-packed."""
    valid = ids >= 0
    return ids[valid], values[valid], valid.sum(axis=1).astype(np.int32)


def top_columns(attn: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[T, H, Nv] rows -> (the k largest values of each row in descending order [T, H, k'],
    their column ids, the row's vision mass outside them [T, H]); k' = min(k, Nv)."""
    k = min(k, attn.shape[-1])
    ids = np.argpartition(-attn, k - 1, axis=-1)[..., :k] if k < attn.shape[-1] else \
        np.broadcast_to(np.arange(k), attn.shape).copy()
    values = np.take_along_axis(attn, ids, -1)
    order = np.argsort(-values, axis=-1, kind="stable")
    ids, values = np.take_along_axis(ids, order, -1), np.take_along_axis(values, order, -1)
    tail = np.maximum(attn.sum(-1, dtype=np.float64) - values.sum(-1, dtype=np.float64), 0.0)
    return values, ids, tail.astype(np.float32)


def rows_from_top(values: np.ndarray, ids: np.ndarray, tail: np.ndarray, n_vision: int) -> np.ndarray:
    """The inverse of `top_columns`: [T, H, Nv] rows with the kept columns in place and each row's
    tail mass spread evenly over its other columns (the most even guess, and the row sum kept)."""
    T, H, k = values.shape
    rest = max(n_vision - k, 1)
    out = np.broadcast_to((tail / rest)[..., None], (T, H, n_vision)).astype(np.float32)
    np.put_along_axis(out, ids.astype(np.int64), values.astype(np.float32), -1)
    return out


def top16_share(attn: np.ndarray) -> float:
    """The mean share of a row's vision mass in its 16 largest columns (NaN with no rows, so
    `cache stats` leaves text-only samples out of its distribution)."""
    if attn.size == 0:
        return float("nan")
    values, _, tail = top_columns(attn, 16)
    kept = values.sum(-1, dtype=np.float64)
    total = kept + tail
    return float(np.mean(np.where(total > 0, kept / np.maximum(total, 1e-30), 1.0)))


@dataclass
class EncodedSample:
    arrays: dict[str, CompressedSample]  # every array kind, compressed chunk by chunk
    logit_entries: int
    attn_k: int = 0  # columns kept per attention row (0: all of them)
    attn_top16_share: float = 1.0
    vision_from: str = ""  # the sample that holds this one's vision tokens ("": its own)


def vision_key(image_sha256, image_n_vision, vision_dim: int) -> tuple | None:
    """What a sample's vision tokens depend on: its images, in order, how many tokens each
    kept (a cut image keeps fewer) and their width. None for a text-only sample, which has
    nothing to share. The writer keys records and committed rows alike by it."""
    if not sum(image_n_vision):
        return None
    return tuple(image_sha256), tuple(int(n) for n in image_n_vision), int(vision_dim)


def encode_sample(rec: SampleRecord, encodings: dict[str, str], attn_topk: int = 0,
                  vision_from: str = "") -> EncodedSample:
    """A record's tensors -> each array's stored values, compressed. With `attn_topk` > 0 the
    attention rows keep their `attn_topk` largest vision columns (ids and the rest's mass too).
    With `vision_from` (the sample that already holds the same images' tokens) no vision
    tokens are stored."""
    ids, values, nnz = pack_logits(rec.logit_ids, rec.logit_values)
    attn, attn_ids, attn_tail, attn_k = rec.attn, np.zeros(0, np.int64), np.zeros(0, np.float32), 0
    if attn_topk and rec.attn.shape[-1]:
        attn, attn_ids, attn_tail = top_columns(rec.attn, attn_topk)
        attn_k = attn.shape[-1]
    vision = rec.vision[:0] if vision_from else rec.vision
    # the kinds computed here; every other kind of the table is the record's attribute of its name
    derived = {"attn": attn, "attn_ids": attn_ids, "attn_tail": attn_tail, "vision": vision,
               "logit_ids": ids, "logit_values": values, "logit_nnz": nnz}
    scales = set(SCALE_OF.values())
    stored = {}
    for kind in ARRAY_KINDS:
        if kind in scales:
            continue
        if encodings[kind] in EMPTY_ENCODINGS:  # --attn-store layer0 recomputes the rows, --skip stores none
            stored[kind], scale = np.zeros(0, ENCODED_DTYPE[encodings[kind]]), None
        else:
            stored[kind], scale = encode(derived[kind] if kind in derived else getattr(rec, kind), encodings[kind])
        if kind in SCALE_OF:
            stored[SCALE_OF[kind]] = scale if scale is not None else np.zeros(0, np.float32)
    if vision_from:  # the holder's scales go with the holder's tokens
        stored[SCALE_OF["vision"]] = np.zeros(0, np.float32)
    for kind in ARRAY_KINDS:  # a skipped target's side arrays hold nothing either
        if encodings[kind] == ABSENT:
            stored[kind] = np.zeros(0, ENCODED_DTYPE[ABSENT])
    arrays = {k: compress_sample(stored[k], chunk_elements(k, encodings[k]), codec_for(encodings[k]))
              for k in ARRAY_KINDS}
    return EncodedSample(arrays, int(ids.size), attn_k, top16_share(rec.attn), vision_from)
