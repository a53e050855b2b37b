"""What an alignkd cache *is*: the one place for the format name, version and layouts.

Declarative on purpose: the writer, the reader, `verify` and the catalog all read these
constants, and nothing here imports the rest of alignkd. Any change to what is written
(a column, an array, an encoding, a file name) bumps `SCHEMA_VERSION`; readers refuse
every version they were not written for instead of patching missing keys.
docs/cache-format.md is the prose version of this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

# the target-kind table and its names, re-exported: the format's constants are read from here
from alignkd.storage_schemas.kinds import (ABSENT, ATTN_RECOMPUTED, EMPTY_ENCODINGS, SKIPPABLE_TARGETS,  # noqa: F401
                                           TARGET_KINDS, kinds_of)

FORMAT_NAME = "alignkd-cache"
# 2: per-token model inputs, image_grid_thw, compact encodings; 3: uint8-log/int8 arrays uncompressed;
# 4: any number of images per sample (text-only samples, several images: list-valued image columns)
# 5: sparse attention rows, one copy of the vision tokens per image set
# 6: --attn-store layer0 (no attention arrays; a layer-0 kit in LAYER0_KIT_DIR, its sha256 in
#    cache.json); every record kept (sample_id a unique key, the manifest's id in record_id), a
#    source per row
# 7: `cache build --skip attn|vision` (the target's arrays hold the encoding ABSENT and no elements;
#    cache.json's storage["skip"] lists the skipped targets)
SCHEMA_VERSION = 7

# ---------------------------------------------------------------- file and dir names
CACHE_JSON = "cache.json"
CATALOG_FILE = "catalog.duckdb"
SHARDS_DIR = "shards"
SAMPLES_FILE = "samples.parquet"
REJECTS_FILE = "rejects.parquet"
SHARD_JSON = "shard.json"          # written last: its presence means the shard is complete
TEMP_PREFIX = ".tmp-"              # in-flight shards; readers skip anything starting with "."
LOCK_FILE = ".lock"                # rank 0; rank r > 0 uses ".lock-r{r}"
TOKENIZER_DIR = "tokenizer"        # the teacher's tokenizer (save_pretrained), for distill's id check
LAYER0_KIT_DIR = "layer0_kit"      # --attn-store layer0: the teacher's layer-0 kit (config.json, layer0.safetensors)
# every top-level entry alignkd writes; anything else in a cache directory is the user's
# (`cache build --overwrite` deletes only these, `cache stats` counts only these)
OWN_ENTRIES = frozenset({CACHE_JSON, CATALOG_FILE, f"{CATALOG_FILE}.wal", SHARDS_DIR, TOKENIZER_DIR, LAYER0_KIT_DIR})
# the teacher directory's processor files, copied into TOKENIZER_DIR when present: `cache show`
# reads the processor's settings from them (tile size, grid pinpoints, tokens per tile)
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def shard_name(index: int, rank: int = 0) -> str:
    """Rank 0 writes `shard-000123`; rank r writes `shard-r{r}-000123`, so ranks never collide."""
    return f"shard-{index:06d}" if rank == 0 else f"shard-r{rank}-{index:06d}"


# ---------------------------------------------------------------- zarr arrays
# Every tensor kind is one 1-D Zarr v3 array per shard: samples are flattened C-order and
# concatenated, and each sample's slice starts on an inner-chunk boundary (the gap is
# zero padding). One inner chunk therefore never holds two samples, so a sample is a
# contiguous byte range in the shard file: one read, no neighbour bytes decoded.
# Each array uses the sharding codec with a single shard, i.e. one file `KIND/c/0`.
#
# Inner chunk sizes (elements), chosen for a 7B teacher (attn ~1.5M, vision 590k elems):
# - 65536 for attn/vision: 64-128 KB chunks are where blosc-lz4-bitshuffle reaches its
#   ratio (smaller chunks lose ~3%), and a sample is ~10-25 chunks so the mean zero
#   padding (half a chunk) is ~2% of a sample before compression, ~0 after.
#   144 x 4096 vision tokens are exactly 9 chunks.
# - 16384 for logit entries (top-64 x ~300 positions ~ 20k), 1024 for per-position or
#   per-vision-token vectors: small samples should not pay for a big zero chunk.
# --attn-store: "maps" stores each sample's [T, H, Nv] attention rows; "layer0" stores none and
# keeps the teacher's layer-0 kit once, from which readers recompute the rows. A layer0 shard's
# attn array holds the encoding ATTN_RECOMPUTED and no elements.
ATTN_STORES = ("maps", "layer0")
ATTN_DTYPES = ("bfloat16", "float16", "uint8-sqrt", "uint8-log", "uint4-log")
VISION_DTYPES = ("bfloat16", "float16", "int8-channel", "int4-channel")
LOGIT_ID_DTYPES = ("uint16", "uint32")
UINT16_VOCAB = 65536  # ids 0..65535 fit uint16 (only valid entries are stored: no padding id)



@dataclass(frozen=True)
class EncodingSpec:
    """What the format says of one encoding; alignkd/cache/encodings.py holds its arithmetic
    (one class per row, same names) and the round-trip bound tests/test_encodings.py checks."""

    stored: str               # numpy dtype of the stored values
    scaled: bool = False      # float32 scales beside the values (in the SCALE_OF array)
    packed: bool = False      # two 4-bit values per stored byte
    compressed: bool = True   # blosc over the chunks; False: codes blosc barely shrinks (see BLOSC)


# Every encoding an array may hold, the one table to extend. bfloat16 is kept as its raw
# uint16 bit pattern (zarr 3.1 has no bfloat16), and the array's "alignkd_encoding"
# attribute says so.
ENCODINGS = {
    "bfloat16": EncodingSpec("uint16"),
    "float16": EncodingSpec("float16"),
    "uint8-sqrt": EncodingSpec("uint8"),
    "uint8-log": EncodingSpec("uint8", scaled=True, compressed=False),
    "uint4-log": EncodingSpec("uint8", scaled=True, packed=True),
    "int8-channel": EncodingSpec("int8", scaled=True, compressed=False),
    "int4-channel": EncodingSpec("uint8", scaled=True, packed=True),
    "log-float16": EncodingSpec("float16"),
    "float32": EncodingSpec("float32"),
    "int32": EncodingSpec("int32"),
    "uint16": EncodingSpec("uint16"),
    "uint32": EncodingSpec("uint32"),
    ATTN_RECOMPUTED: EncodingSpec("float16"),  # an attn array with no elements (--attn-store layer0)
    ABSENT: EncodingSpec("float16"),  # an array with no elements: its target was not stored (--skip)
}
# views of the table, by the names the reader and writer use
ENCODED_DTYPE = {name: spec.stored for name, spec in ENCODINGS.items()}
SCALED_ENCODINGS = tuple(name for name, spec in ENCODINGS.items() if spec.scaled)  # need their float32 scales
PACKED_ENCODINGS = tuple(name for name, spec in ENCODINGS.items() if spec.packed)  # two values per stored byte

# The arrays are the rows of the target-kind table (storage_schemas/kinds.py); these are its views.
ARRAY_SPECS = {k.name: {"chunk": k.chunk, "encoding": k.encoding, **({"option": k.option} if k.option else {})}
               for k in TARGET_KINDS}
SCALE_OF = {k.name: k.scale for k in TARGET_KINDS if k.scale}  # where a scaled encoding keeps its scales
ARRAY_KINDS = tuple(ARRAY_SPECS)


def element_counts(row: dict, encodings: dict) -> dict[str, int]:
    """Elements of each array that one sample (a samples.parquet row) holds, given the
    shard's encodings (shard.json "arrays"): scale arrays are empty unless the encoding is scaled,
    an array whose encoding says it holds nothing (`EMPTY_ENCODINGS`) is empty, and so is the
    vision target of a sample that shares another's (`vision_from`)."""
    def count(kind) -> int:
        if encodings[kind.name] in EMPTY_ENCODINGS or (kind.own_vision and row.get("vision_from")):
            return 0
        return kind.elements(row, encodings, PACKED_ENCODINGS, SCALED_ENCODINGS)
    return {kind.name: count(kind) for kind in TARGET_KINDS}


def skipped_encodings(encodings: dict, skip) -> dict:
    """The shard's encodings with every array of each skipped target marked ABSENT (`cache build --skip`)."""
    absent = {name for target in skip for name in kinds_of(target)}
    return {kind: ABSENT if kind in absent else enc for kind, enc in encodings.items()}


# blosc-lz4 + bitshuffle: measured (BENCHMARKS.md), lz4 decodes ~3x faster than
# zstd for ~10% more bytes; the reader's throughput target makes lz4 the right side.
BLOSC = {"cname": "lz4", "clevel": 5, "shuffle": "bitshuffle"}
# Codes that blosc barely shrinks are stored without a compressor: on 7B-shaped samples
# lz4-bitshuffle gains 1.13x on uint8-log attention and ~1.0x on int8 vision, while
# decoding those chunks cost more CPU than the whole rest of a read (bench/cache_storage.py).
# A raw chunk is read straight into the output buffer; its zarr.json lists only the `bytes`
# codec. uint8-sqrt codes (1.49x) and the packed 4-bit tier keep blosc (ENCODINGS' `compressed`).
UNCOMPRESSED_ENCODINGS = frozenset(name for name, spec in ENCODINGS.items() if not spec.compressed)
# A raw chunk stores its zero padding too (blosc squeezes it to nothing), so raw arrays use
# 4096-element chunks: at most 4 KB of padding per sample, where 65536 made a small
# model's ~2 KB attention sample take 64 KB. 16 index bytes per 4 KB chunk is 0.4%.
RAW_CHUNK = 4096


def chunk_elements(kind: str, encoding: str) -> int:
    """Inner chunk size (elements) of array `kind` holding `encoding`."""
    return RAW_CHUNK if encoding in UNCOMPRESSED_ENCODINGS else ARRAY_SPECS[kind]["chunk"]


ENCODING_ATTR = "alignkd_encoding"

# ---------------------------------------------------------------- parquet rows
_i32_list = pa.list_(pa.int32())

# Per-token model inputs a family's forward may take besides input_ids and attention_mask
# (its row's `token_inputs`, alignkd/models/families.py, names which): each is a column
# ([L], or [] when the family has none) that the student replays. A new one is a new
# column, so a format change (SCHEMA_VERSION). With Qwen-VL's image grid (t, h, w per image,
# flattened; [] otherwise) they are the columns replayed beside input_ids.
TOKEN_INPUT_COLUMNS = ("token_type_ids", "mm_token_type_ids")
REPLAYED_COLUMNS = (*TOKEN_INPUT_COLUMNS, "image_grid_thw")

SAMPLE_SCHEMA = pa.schema([
    # the sample's unique key: the record's id, or "ID#k" for the k-th record with that id
    # (LLaVA-665K repeats image ids across conversations); record_id is the id as written
    ("sample_id", pa.string()),
    ("manifest_row", pa.int64()),
    ("record_id", pa.string()),
    ("source", pa.string()),  # the --data source (or the mixture entry) the record came from
    ("input_ids", _i32_list),
    ("label_mask", pa.list_(pa.bool_())),
    ("vision_positions", _i32_list),
    ("text_positions", _i32_list),
    ("logit_positions", _i32_list),
    *[(name, _i32_list) for name in REPLAYED_COLUMNS],  # see REPLAYED_COLUMNS
    # per-sample shapes (n_vision varies per sample in dynamic-resolution families): attn [n_text, n_heads, n_vision], vision [n_vision, vision_dim],
    # logits [n_logit_positions, logit_k] with logit_entries valid entries in total
    ("n_text", pa.int32()),
    ("n_heads", pa.int32()),
    ("n_vision", pa.int32()),
    # attention rows keep their attn_k largest vision columns (ids in attn_ids, the rest of the
    # row's vision mass in attn_tail); 0: every column (--attn-topk 0, the default)
    ("attn_k", pa.int32()),
    # the mean share of a row's vision mass in its 16 largest columns: how peaked the rows are,
    # i.e. what --attn-topk would keep (1.0 for rows of at most 16 columns, NaN for text-only samples)
    ("attn_top16_share", pa.float32()),
    ("vision_dim", pa.int32()),
    # "" when the sample stores its own vision tokens; else the sample_id of the earlier sample
    # with the same images that holds them (vision tokens depend on the images alone, so
    # each distinct image set is stored once; --no-share-vision turns this off)
    ("vision_from", pa.string()),
    ("n_logit_positions", pa.int32()),
    ("logit_k", pa.int32()),
    ("logit_entries", pa.int64()),
    *[(f"{kind}_offset", pa.int64()) for kind in ARRAY_KINDS],   # element offset into the array
    *[(f"{kind}_crc32", pa.int64()) for kind in ARRAY_KINDS],    # zlib.crc32 of the stored bytes
    ("teacher_ce", pa.float64()),
    ("teacher_entropy", pa.float64()),
    ("teacher_tail_mass", pa.float64()),
    # the sample's images in order (none for text only): image k owns the next image_n_vision[k]
    # entries of the vision-token axis; image_bytes is [] when the cache keeps no images
    ("n_images", pa.int32()),
    ("image_paths", pa.list_(pa.string())),
    ("image_sha256", pa.list_(pa.string())),
    ("image_n_vision", _i32_list),
    ("image_bytes", pa.list_(pa.binary())),
])

# image bytes are read per sample; small row groups keep one random read to ~32 images
SAMPLES_ROW_GROUP = 32

REJECT_SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("manifest_row", pa.int64()),
    ("record_id", pa.string()),
    ("source", pa.string()),
    ("reason", pa.string()),
    ("message", pa.string()),
])

# ---------------------------------------------------------------- json documents
# cache.json: these keys are the writer's; the builder's meta dict is merged at top level
# beside them (teacher, teacher_shapes, build_options, ...) and may not reuse these names.
CACHE_JSON_FIELDS = ("format", "schema_version", "alignkd_version", "created_at", "storage")
STORAGE_FIELDS = ("attn_store", "attn_dtype", "vision_dtype", "logit_id_dtype", "shard_size", "store_images",
                  "attn_topk", "share_vision", "layer0_kit", "skip")
# storage["skip"]: the optional targets (SKIPPABLE_TARGETS) `cache build --skip` left out; [] or absent: none
# storage["layer0_kit"] (attn_store "layer0" only): {"files": {name: {"bytes", "sha256"}}} of LAYER0_KIT_DIR

# shard.json: "files" lists every other file of the shard with "path", "bytes", "sha256".
SHARD_JSON_FIELDS = ("format", "schema_version", "name", "rank", "index", "n_samples",
                     "n_rejects", "manifest_rows", "arrays", "files", "committed_at")

# catalog.duckdb `shards` table (the samples/rejects views mirror the parquet schemas)
SHARDS_TABLE_SCHEMA = pa.schema([
    ("name", pa.string()),
    ("rank", pa.int32()),
    ("shard_index", pa.int32()),
    ("n_samples", pa.int64()),
    ("n_rejects", pa.int64()),
    ("bytes", pa.int64()),
    ("min_manifest_row", pa.int64()),
    ("max_manifest_row", pa.int64()),
    ("committed_at", pa.string()),
])
