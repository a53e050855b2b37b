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
from alignkd.storage_schemas import ARRAY_KINDS, SCALE_OF, chunk_elements


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


@dataclass
class EncodedSample:
    arrays: dict[str, CompressedSample]  # every array kind, compressed chunk by chunk
    logit_entries: int


def encode_sample(rec: SampleRecord, encodings: dict[str, str]) -> EncodedSample:
    """A record's tensors -> each array's stored values, compressed."""
    ids, values, nnz = pack_logits(rec.logit_ids, rec.logit_values)
    tensors = {"attn": rec.attn, "vision": rec.vision, "focus": rec.focus, "logit_ids": ids,
               "logit_values": values, "logit_nnz": nnz, "logit_tail": rec.logit_tail}
    stored = {}
    for kind, tensor in tensors.items():
        stored[kind], scale = encode(tensor, encodings[kind])
        if kind in SCALE_OF:
            stored[SCALE_OF[kind]] = scale if scale is not None else np.zeros(0, np.float32)
    arrays = {k: compress_sample(stored[k], chunk_elements(k, encodings[k]), codec_for(encodings[k]))
              for k in ARRAY_KINDS}
    return EncodedSample(arrays, int(ids.size))
