"""The one table of target kinds: every array a shard holds, what one sample stores in it, how it
is encoded, which loss term reads it and how a batch carries it.

The writer (`cache/sample_encoding.py`), the reader, `cache verify`, `cache stats` and the
student's collate (`distill/dataset.py`) iterate `TARGET_KINDS` instead of naming kinds, so a
new teacher target is a row here plus the code that computes it (docs/design.md, "How to add
a target kind"). Torch-free and declarative, like the rest of `storage_schemas`.

A *target* is what `cache build --skip` names (`attn`, `vision`): its main array and the side
arrays that only serve it (scales, kept columns) are stored or skipped together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

# Encoding of an array that holds nothing: `--attn-store layer0` (the rows are recomputed from the
# layer-0 kit) and `--skip TARGET` (the target was not stored). Both keep the array, empty, so a
# shard's layout never depends on its options.
ATTN_RECOMPUTED = "layer0"
ABSENT = "absent"
EMPTY_ENCODINGS = (ATTN_RECOMPUTED, ABSENT)


def _halved(kind: str, n: int, enc: dict, packed: tuple[str, ...]) -> int:
    """Stored elements of `n` values: packed 4-bit encodings hold two per byte."""
    return n // 2 if enc[kind] in packed else n


@dataclass(frozen=True)
class TargetKind:
    """One array of a shard. `elements(row, encodings, packed, scaled)` is how many stored elements
    one sample (a samples.parquet row) holds, given the shard's encodings before the empty-array
    rule (`EMPTY_ENCODINGS` and a shared vision holder) applies."""

    name: str                 # the array, the SampleRecord attribute and the batch key t_NAME
    shape: str                # one sample's values, in samples.parquet's columns (docs)
    chunk: int                # inner chunk elements for a compressed encoding (storage_schemas)
    elements: Callable[[dict, dict, tuple, tuple], int]
    target: str               # the target it belongs to: what `--skip` names, what the loss term reads
    encoding: str | None = None  # fixed encoding; None: the build option `option` chooses it
    option: str | None = None
    raw_bytes: str | None = None  # SQL over samples: bytes a naive fp16/int32 dump takes (`cache stats`)
    scale: str | None = None      # the array a scaled encoding keeps its float32 scales in
    batch: str = ""           # how collate carries it: index (int64, -1 padded), float (float32),
                              # stored (stored width, widened on device), "" (read into another kind)
    logit_width: bool = False  # last axis is the per-sample logit width K, padded to the batch's widest
    term: str | None = None   # the loss term (distill/terms.py) that reads it
    optional: bool = False    # `cache build --skip TARGET` may leave the whole target out
    own_vision: bool = False  # empty for a sample whose images another sample holds (vision_from, --share-vision)


def _product(*cols: str) -> Callable:
    """elements = the product of the row's `cols`."""
    def count(row, enc, packed, scaled):
        n = 1
        for c in cols:
            n *= row.get(c, 0)
        return n
    return count


def _attn(row, enc, packed, scaled):  # a top-k cache keeps attn_k columns per row
    return _halved("attn", row["n_text"] * row["n_heads"] * (row.get("attn_k", 0) or row["n_vision"]), enc, packed)


def _attn_tail(row, enc, packed, scaled):  # --attn-topk only
    return row["n_text"] * row["n_heads"] if row.get("attn_k", 0) else 0


def _scale_of(kind: str, *cols: str) -> Callable:
    """A scale array: the product of `cols` when `kind`'s encoding is scaled, else empty."""
    def count(row, enc, packed, scaled):
        return _product(*cols)(row, enc, packed, scaled) if enc[kind] in scaled else 0
    return count


def _vision(row, enc, packed, scaled):
    return _halved("vision", row["n_vision"] * row["vision_dim"], enc, packed)


# The order is the shard's array order (samples.parquet's offset and crc32 columns follow it).
# Chunk sizes were chosen for a 7B teacher; see storage_schemas' "zarr arrays" block.
TARGET_KINDS: tuple[TargetKind, ...] = (
    TargetKind("attn", "[n_text, n_heads, attn_k or n_vision]", 65536, _attn, "attn", option="attn_dtype",
               raw_bytes="2 * n_text * n_heads * n_vision", scale="attn_scale", batch="stored", term="attn",
               optional=True),
    TargetKind("attn_scale", "[n_text, n_heads] (scaled encodings)", 4096, _scale_of("attn", "n_text", "n_heads"),
               "attn", encoding="float32"),
    TargetKind("attn_ids", "[n_text, n_heads, attn_k] (--attn-topk)", 16384, _product("n_text", "n_heads", "attn_k"),
               "attn", encoding="uint16"),
    TargetKind("attn_tail", "[n_text, n_heads] (--attn-topk)", 4096, _attn_tail, "attn",
               encoding="float16"),
    TargetKind("vision", "[n_vision, vision_dim]", 65536, _vision, "vision", option="vision_dtype",
               raw_bytes="2 * n_vision * vision_dim", scale="vision_scale", batch="stored", term="vis",
               optional=True, own_vision=True),
    TargetKind("vision_scale", "[vision_dim] (scaled encodings)", 4096, _scale_of("vision", "vision_dim"), "vision",
               encoding="float32", own_vision=True),
    TargetKind("focus", "[n_vision]", 1024, _product("n_vision"), "focus", encoding="float32", raw_bytes="2 * n_vision",
               batch="float", term="vis"),
    TargetKind("logit_ids", "[logit_entries] (valid entries only)", 16384, _product("logit_entries"), "logits",
               option="logit_id_dtype", raw_bytes="4 * logit_entries", batch="index", logit_width=True,
               term="logit"),
    TargetKind("logit_values", "[logit_entries] (log-probs, or counts when sampled)", 16384, _product("logit_entries"),
               "logits", encoding="float16", raw_bytes="2 * logit_entries", batch="stored", logit_width=True,
               term="logit"),
    TargetKind("logit_nnz", "[n_logit_positions] (valid entries per position)", 1024, _product("n_logit_positions"),
               "logits", encoding="int32", raw_bytes="4 * n_logit_positions", term="logit"),
    TargetKind("logit_tail", "[n_logit_positions] (log of the tail mass)", 1024, _product("n_logit_positions"), "logits",
               encoding="log-float16", raw_bytes="2 * n_logit_positions", batch="float", term="logit"),
)
# what `cache build --skip` accepts: the optional targets
SKIPPABLE_TARGETS = tuple(kind.target for kind in TARGET_KINDS if kind.optional)
# the samples.parquet list columns a batch carries beside the arrays (int64, -1 padded)
TARGET_POSITIONS = ("text_positions", "logit_positions")


def kinds_of(target: str) -> tuple[str, ...]:
    """The arrays of one target (`attn` -> attn, attn_scale, attn_ids, attn_tail)."""
    return tuple(kind.name for kind in TARGET_KINDS if kind.target == target)


def kinds_where(**fields) -> tuple[str, ...]:
    """Names of the kinds whose fields equal `fields` (`kinds_where(batch="float")`)."""
    return tuple(k.name for k in TARGET_KINDS if all(getattr(k, f) == v for f, v in fields.items()))


def scaled_kinds() -> tuple[str, ...]:
    """The kinds with a scale array beside them (attn, vision)."""
    return tuple(k.name for k in TARGET_KINDS if k.scale)
