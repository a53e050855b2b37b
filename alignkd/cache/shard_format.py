"""The byte level of a shard: tensor encodings, and one Zarr v3 sharded array file.

Over 300 lines on purpose: one byte format, written and read in one module so the two sides
cannot drift.

The writer produces, and the reader consumes, the sharding codec's on-disk layout
directly instead of going through zarr-python:

    KIND/c/0 = blosc(chunk 0) | blosc(chunk 1) | ... | index | crc32c(index)
    index    = uint64 little-endian [n_chunks, 2] of (byte offset, byte length)

Why: zarr-python 3.1 costs ~2 ms per call, which caps random single-sample reads at
45-100 samples/s, and writing a shard through it re-reads and re-writes the whole shard
file for every partial update. Writing chunks as they come and parsing the index
ourselves gives one pwrite per chunk and one pread per sample and array. The arrays'
zarr.json is still produced by zarr-python, and a test checks that zarr-python reads
every array exactly as our reader does, so any zarr v3 client can open a shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numcodecs.blosc
import numpy as np
from numcodecs import Blosc

from alignkd.cache.storage import CacheStore, open_store
from alignkd.errors import AlignKDError
from alignkd.storage_schemas import (BLOSC, CACHE_JSON, ENCODED_DTYPE, ENCODING_ATTR, FORMAT_NAME,
                                     REJECTS_FILE, SAMPLES_FILE, SCHEMA_VERSION, SHARD_JSON, SHARDS_DIR,
                                     UNCOMPRESSED_ENCODINGS, chunk_elements)

EMPTY_CHUNK = np.uint64(2**64 - 1)  # zarr's marker for a chunk that was never written


class CacheFormatError(AlignKDError):
    """A cache (or a part of one) is missing, foreign, or of another schema version."""


# ------------------------------------------------------------------ writing one array
@dataclass
class CompressedSample:
    data: bytes          # the sample's chunks back to back: blosc frames, or the raw bytes
    sizes: np.ndarray    # bytes of each chunk in `data` (the last chunk was zero-padded)
    crc32: int           # of the uncompressed stored values


def codec_for(encoding: str) -> Blosc | None:
    """The compressor of an array holding `encoding` (None: chunks stored raw)."""
    if encoding in UNCOMPRESSED_ENCODINGS:
        return None
    return Blosc(cname=BLOSC["cname"], clevel=BLOSC["clevel"], shuffle=Blosc.BITSHUFFLE)


def compress_sample(stored: np.ndarray, chunk: int, codec: Blosc | None) -> CompressedSample:
    """One sample's flat stored values -> its chunks' blosc frames, or the raw chunk bytes when
    `codec` is None (thread-safe: the GIL is released while blosc and crc32 run)."""
    n = stored.size
    crc = zlib.crc32(memoryview(stored).cast("B")) if n else 0
    if n % chunk:
        padded = np.zeros(n + chunk - n % chunk, stored.dtype)
        padded[:n] = stored
        stored = padded
    n_chunks = stored.size // chunk
    if codec is None:  # raw: one buffer, every chunk the same size
        return CompressedSample(stored.tobytes(), np.full(n_chunks, chunk * stored.itemsize), crc)
    blobs = [codec.encode(stored[k * chunk:(k + 1) * chunk]) for k in range(n_chunks)]
    return CompressedSample(b"".join(blobs), np.array([len(b) for b in blobs], dtype=np.int64), crc)


@dataclass
class FileInfo:
    path: str      # relative to the shard directory
    bytes: int
    sha256: str


class ArrayFileWriter:
    """Appends samples (compressed by `compress_sample`) to one sharded array file, a chunk at a time."""

    def __init__(self, shard_dir: Path, kind: str, encoding: str) -> None:
        self.kind, self.encoding = kind, encoding
        self.compressed = encoding not in UNCOMPRESSED_ENCODINGS
        self.dtype = np.dtype(ENCODED_DTYPE[encoding])
        self.chunk = chunk_elements(kind, encoding)
        self.rel = f"{kind}/c/0"
        self.path = shard_dir / self.rel
        self.path.parent.mkdir(parents=True)
        self.file = open(self.path, "wb")
        self.sha = hashlib.sha256()
        self.index: list[np.ndarray] = []  # per sample, [n_chunks, 2] of (byte offset, length)
        self.pos = 0      # bytes written
        self.length = 0   # elements, always a multiple of self.chunk

    def append_compressed(self, sample: CompressedSample) -> tuple[int, int]:
        """Write one sample compressed by `compress_sample`; return (element offset, crc32).

        Samples start on chunk boundaries, so a sample compresses without knowing where it
        lands: the writer's encoder threads compress, and only these writes are serial."""
        offset = self.length
        if len(sample.sizes):
            self._write_sample(sample)
        self.length += len(sample.sizes) * self.chunk
        return offset, sample.crc32

    def _write_sample(self, sample: CompressedSample) -> None:
        self.file.write(sample.data)
        self.sha.update(sample.data)
        starts = self.pos + np.concatenate([[0], np.cumsum(sample.sizes)[:-1]])
        self.index.append(np.stack([starts, sample.sizes], axis=1))
        self.pos += len(sample.data)

    def finish(self) -> FileInfo | None:
        """Write the shard index, fsync, close. An array with no data gets no file."""
        import google_crc32c  # a zarr dependency; zarr's default index codec is crc32c

        if not self.index:
            self.file.close()
            self.path.unlink()
            return None
        index = np.concatenate(self.index).astype("<u8").tobytes()
        tail = index + google_crc32c.value(index).to_bytes(4, "little")
        self.file.write(tail)
        self.sha.update(tail)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return FileInfo(self.rel, self.pos + len(tail), self.sha.hexdigest())

    def write_metadata(self, store) -> None:
        """zarr.json for this array, written by zarr-python itself."""
        import zarr
        from zarr.codecs import BloscCodec

        zarr.create_array(
            store=store, name=self.kind, shape=(self.length,), dtype=self.dtype,
            chunks=(self.chunk,), shards=(max(self.length, self.chunk),),
            compressors=BloscCodec(**BLOSC) if self.compressed else None, fill_value=0,
            attributes={ENCODING_ATTR: self.encoding})


# ------------------------------------------------------------------ reading one array
@dataclass
class ArrayInfo:
    kind: str
    path: str           # the single shard file KIND/c/0, named for messages
    dtype: np.dtype
    chunk: int
    length: int
    encoding: str
    compressed: bool    # blosc frames; False: raw chunk bytes (the `bytes` codec only)
    rel: str = ""       # KIND/c/0, relative to the shard: what `open_array` opens


def read_array_info(shard, kind: str) -> ArrayInfo:
    """The array `kind` of a shard (a store or a shard directory), from its zarr.json."""
    shard = open_store(shard)
    meta_rel = f"{kind}/zarr.json"
    try:
        meta = json.loads(shard.read_text(meta_rel))
        codec = meta["codecs"][0]
        if codec["name"] != "sharding_indexed":
            raise ValueError(f"codec {codec['name']}")
        inner = [c["name"] for c in codec["configuration"]["codecs"]]
        rel = f"{kind}/c/0"
        return ArrayInfo(kind, shard.name_of(rel), np.dtype(meta["data_type"]),
                         int(codec["configuration"]["chunk_shape"][0]), int(meta["shape"][0]),
                         meta["attributes"][ENCODING_ATTR], "blosc" in inner, rel)
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise CacheFormatError(f"{shard.name_of(meta_rel)} is missing or not an alignkd sharded array "
                               f"({exc}).") from None


def open_array(shard: CacheStore, info: ArrayInfo):
    """A positional-read handle on the array's file (see `CacheStore.open_ranged`)."""
    try:
        return shard.open_ranged(info.rel)
    except FileNotFoundError:
        raise CacheFormatError(f"{info.path} is missing; run alignkd cache verify.") from None


def read_index(handle, info: ArrayInfo) -> np.ndarray:
    """The [n_chunks, 2] (offset, nbytes) table at the end of the shard file."""
    import google_crc32c

    n_chunks = max(info.length, info.chunk) // info.chunk
    size = handle.size()
    nbytes = 16 * n_chunks + 4
    if size < nbytes:
        raise CacheFormatError(f"{info.path} is truncated ({size} bytes).")
    raw = handle.pread(nbytes, size - nbytes)
    if google_crc32c.value(raw[:-4]).to_bytes(4, "little") != raw[-4:]:
        raise CacheFormatError(f"{info.path} has a corrupt shard index (crc32c mismatch).")
    return np.frombuffer(raw[:-4], dtype="<u8").reshape(n_chunks, 2)


def _chunk_table(info: ArrayInfo, index: np.ndarray, offset: int, n: int) -> tuple[int, np.ndarray, np.ndarray]:
    """First chunk number, and the byte offsets and lengths of the chunks holding elements
    [offset, offset+n)."""
    c0, c1 = offset // info.chunk, -(-(offset + n) // info.chunk)
    rows = index[c0:c1]
    return c0, rows[:, 0], rows[:, 1]


def _adjacent_span(starts: np.ndarray, sizes: np.ndarray) -> tuple[int, int] | None:
    """[start, end) bytes covering the chunks when they are written back to back, else None."""
    if (starts != EMPTY_CHUNK).all() and (starts[1:] == starts[:-1] + sizes[:-1]).all():
        return int(starts[0]), int(starts[-1] + sizes[-1])
    return None


def byte_span(info: ArrayInfo, index: np.ndarray, offset: int, n: int) -> tuple[int, int] | None:
    """[start, end) bytes of the file holding elements [offset, offset+n) when those chunks are
    adjacent (what the writer produces), else None."""
    if n == 0:
        return None
    _, starts, sizes = _chunk_table(info, index, offset, n)
    return _adjacent_span(starts, sizes)


def read_raw(handle, info: ArrayInfo, index: np.ndarray, offset: int, n: int,
             data: bytes | None = None) -> np.ndarray:
    """Elements [offset, offset+n) in the stored dtype: one pread when the chunks are adjacent.
    `data`: the bytes of `byte_span` already fetched (object stores fetch a sample's spans at once)."""
    if n == 0:
        return np.empty(0, info.dtype)
    c = info.chunk
    c0, starts, sizes = _chunk_table(info, index, offset, n)
    out = np.empty(len(starts) * c, info.dtype)
    span = _adjacent_span(starts, sizes)
    if span is not None:
        first, end = span
        if not info.compressed and data is None:
            _pread_into(handle, out, first, end, info)  # raw chunks: straight into the output, no copy
        else:
            buf = memoryview(data if data is not None else handle.pread(end - first, first))
            for k, (s, z) in enumerate(zip(starts.tolist(), sizes.tolist())):
                _decompress(buf[s - first:s - first + z], out[k * c:(k + 1) * c], info)
    else:
        for k, (s, z) in enumerate(zip(starts.tolist(), sizes.tolist())):
            if s == int(EMPTY_CHUNK):
                out[k * c:(k + 1) * c] = 0
            else:
                _decompress(handle.pread(z, s), out[k * c:(k + 1) * c], info)
    skip = offset - c0 * c
    return out[skip:skip + n]


def _pread_into(handle, out: np.ndarray, first: int, end: int, info: ArrayInfo) -> None:
    if end - first != out.nbytes or handle.pread_into(memoryview(out).cast("B"), first) != out.nbytes:
        raise CacheFormatError(f"{info.path}: raw chunks at bytes {first}-{end} do not hold the "
                               f"{out.size} values the index promises (truncated?).")


def _decompress(src, dest: np.ndarray, info: ArrayInfo) -> None:
    if not info.compressed:
        if len(src) != dest.nbytes:
            raise CacheFormatError(f"{info.path}: a raw chunk has {len(src)} bytes, not {dest.nbytes}.")
        dest.view(np.uint8)[:] = np.frombuffer(src, np.uint8)
        return
    try:
        numcodecs.blosc.decompress(src, dest)
    except Exception as exc:  # numcodecs raises RuntimeError/ValueError on bad frames
        raise CacheFormatError(f"{info.path}: a chunk failed to decompress ({exc}).") from None


# ------------------------------------------------------------------ shard directories
def committed_shards(cache) -> list[CacheStore]:
    """Complete shards (shard.json present) of a cache, as stores named by the shard, sorted by
    name; temp dirs skipped.

    A cache whose shards/, shard directory, shard.json or Parquet file leads outside it (a
    symbolic link) is refused here, where every reader lists its shards: `cache sql` hands
    the Parquet files of every `shard-*` directory, committed or not, to DuckDB by a glob,
    and the other files are checked by the store as they are opened."""
    store = open_store(cache)
    store.check_inside(SHARDS_DIR)
    names = [n for n in store.list(SHARDS_DIR) if n.startswith("shard-")]
    store.check_entries_inside(SHARDS_DIR, names, (SHARD_JSON, SAMPLES_FILE, REJECTS_FILE))
    return [store.sub(f"{SHARDS_DIR}/{n}") for n in names if store.is_file(f"{SHARDS_DIR}/{n}/{SHARD_JSON}")]


def read_shard_json(shard: CacheStore) -> dict:
    """A committed shard's shard.json, or a CacheFormatError naming it."""
    try:
        doc = json.loads(shard.read_text(SHARD_JSON))
        if not isinstance(doc, dict):
            raise ValueError(f"a JSON {type(doc).__name__}, not an object")
        return doc
    except (OSError, ValueError) as exc:
        raise CacheFormatError(f"{shard.name_of(SHARD_JSON)} cannot be read ({exc}); "
                               "run `alignkd cache verify`.") from None


def read_parquet(shard, name: str, columns=None):
    """The Parquet table `name` of a shard (samples or rejects), or a CacheFormatError naming the
    damaged file."""
    import pyarrow as pa

    shard = open_store(shard)
    try:
        return shard.read_parquet(name, columns=columns)
    except (OSError, ValueError, pa.ArrowException) as exc:
        path = shard.name_of(name)
        if isinstance(exc, PermissionError) or "[errno 13]" in str(exc).lower():  # not damage: say so
            raise CacheFormatError(f"{path} cannot be read (permission denied).") from None
        detail = str(exc).split(": ")[-1].strip().rstrip(".")
        raise CacheFormatError(f"{path} cannot be read as Parquet ({detail}); run `alignkd cache verify`.") from None


def load_cache_json(store: CacheStore) -> dict:
    """cache.json, refusing another format or schema version with a named error."""
    cache_json = store.name_of(CACHE_JSON)
    try:
        doc = json.loads(store.read_text(CACHE_JSON))
    except FileNotFoundError:
        raise CacheFormatError(f"{store} is not an alignkd cache: {CACHE_JSON} is missing.") from None
    except (OSError, ValueError) as exc:
        raise CacheFormatError(f"{cache_json} cannot be read ({exc}).") from None
    if doc.get("format") != FORMAT_NAME:
        raise CacheFormatError(f"{cache_json} has format {doc.get('format')!r}, not {FORMAT_NAME!r}.")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise CacheFormatError(
            f"{store} is an alignkd cache of schema version {doc.get('schema_version')}, but this alignkd "
            f"reads version {SCHEMA_VERSION}; rebuild the cache or use a matching alignkd."
        )
    return doc
