"""Random access to a cache by sample index: `open_cache(path)[i] -> CachedSample`.

Opening reads cache.json (refusing another format or version) and every shard's
samples.parquet once, minus the image bytes, into flat numpy columns: offsets, shapes,
token ids and positions. A sample read is then, per array, one `os.pread` of the
sample's contiguous chunks (the writer aligns samples to chunk boundaries) and one blosc
decode per chunk (see shard_format). Image bytes are read on demand from the
samples.parquet row group that holds them.

DataLoader workers: file descriptors, shard indexes and parquet handles are opened
lazily and keyed by pid, so a reader created in the parent can be forked or pickled
(spawn) and each worker opens its own files; nothing held by the parent is shared.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from alignkd.cache.record import SampleRecord
from alignkd.cache.shard_format import (CacheFormatError, committed_shards, decode, load_cache_json,
                                        read_array_info, read_index, read_parquet, read_raw)
from alignkd.errors import AlignKDError
from alignkd.storage_schemas import ARRAY_KINDS, REPLAYED_COLUMNS, SAMPLE_SCHEMA, SAMPLES_FILE

_LIST_COLUMNS = ("input_ids", "label_mask", "vision_positions", "text_positions", "logit_positions",
                 *REPLAYED_COLUMNS)
_STRING_COLUMNS = ("sample_id", "image_path", "image_sha256")


# A read returns the same record the builder wrote; logit rows come back left-packed
# (valid ids first, then id -1 / value 0).
CachedSample = SampleRecord


class SampleNotFoundError(AlignKDError, KeyError):
    """A sample id that the cache does not hold."""

    def __str__(self) -> str:
        return str(self.args[0])


def open_cache(path, *, images: bool = True, check_crc: bool = False) -> "CacheReader":
    """Open the cache at `path` for reading; `images=False` skips image bytes,
    `check_crc=True` checks every tensor against its stored crc32 (slower)."""
    return CacheReader(path, images=images, check_crc=check_crc)


class CacheReader:
    def __init__(self, path, *, images: bool = True, check_crc: bool = False) -> None:
        self.path = Path(path)
        self.meta = load_cache_json(self.path)
        self.images = images and bool(self.meta.get("storage", {}).get("store_images", True))
        self.check_crc = check_crc
        self._load_rows()
        self._pid: int | None = None

    # ---------------------------------------------------------------- rows, loaded once
    def _load_rows(self) -> None:
        self._shard_dirs = committed_shards(self.path)
        columns = [f.name for f in SAMPLE_SCHEMA if f.name != "image_bytes"]
        tables = [read_parquet(d / SAMPLES_FILE, columns=columns) for d in self._shard_dirs]
        table = pa.concat_tables(tables) if tables else SAMPLE_SCHEMA.empty_table().select(columns)
        counts = [t.num_rows for t in tables]
        self._shard_of = np.repeat(np.arange(len(tables), dtype=np.int32), counts)
        self._row_in_shard = np.concatenate([np.arange(c) for c in counts]) if counts else np.zeros(0, int)
        self._cols: dict[str, np.ndarray] = {}
        self._lists: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name in columns:
            col = table.column(name).combine_chunks()
            if name in _LIST_COLUMNS:
                self._lists[name] = (col.values.to_numpy(zero_copy_only=False), col.offsets.to_numpy())
            elif name in _STRING_COLUMNS:
                self._cols[name] = col.to_pylist()
            else:
                self._cols[name] = col.to_numpy(zero_copy_only=False)
        self.sample_ids: list[str] = self._cols["sample_id"]
        self._id_index: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.sample_ids)

    def index_of(self, sample_id: str) -> int:
        if self._id_index is None:
            self._id_index = {s: i for i, s in enumerate(self.sample_ids)}
        try:
            return self._id_index[sample_id]
        except KeyError:
            raise SampleNotFoundError(f"sample {sample_id} is not in cache {self.path}.") from None

    # ---------------------------------------------------------------- per-process handles
    def _process_state(self) -> None:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._open: dict[int, dict] = {}   # shard number -> {kind: (info, fd, index)}
            self._parquet: dict[int, tuple] = {}
            self._image_group: tuple | None = None

    def _shard_arrays(self, shard: int) -> dict:
        arrays = self._open.get(shard)
        if arrays is None:
            arrays = {}
            for kind in ARRAY_KINDS:
                info = read_array_info(self._shard_dirs[shard], kind)
                fd = index = None
                if info.length:
                    try:
                        fd = os.open(info.path, os.O_RDONLY)
                    except FileNotFoundError:
                        raise CacheFormatError(f"{info.path} is missing; run alignkd cache verify.") from None
                    index = read_index(fd, info)
                arrays[kind] = (info, fd, index)
            self._open[shard] = arrays
        return arrays

    def close(self) -> None:
        """Close this process's file descriptors (reopened lazily on the next read)."""
        if self._pid == os.getpid():
            for arrays in self._open.values():
                for _, fd, _ in arrays.values():
                    if fd is not None:
                        os.close(fd)
        self._pid = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in ("_pid", "_open", "_parquet", "_image_group"):
            state.pop(key, None)
        state["_pid"] = None
        return state

    # ---------------------------------------------------------------- samples
    def __getitem__(self, i: int) -> CachedSample:
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"sample index {i} out of range for {n} samples")
        i %= n
        self._process_state()
        shard = int(self._shard_of[i])
        c = {k: int(v[i]) for k, v in self._cols.items() if k not in _STRING_COLUMNS}
        T, H, Nv, D = c["n_text"], c["n_heads"], c["n_vision"], c["vision_dim"]
        P, K, E = c["n_logit_positions"], c["logit_k"], c["logit_entries"]
        sizes = {"attn": T * H * Nv, "vision": Nv * D, "focus": Nv, "logit_ids": E,
                 "logit_values": E, "logit_nnz": P, "logit_tail": P}
        t = {}
        for kind, (info, fd, index) in self._shard_arrays(shard).items():
            raw = read_raw(fd, info, index, c[f"{kind}_offset"], sizes[kind])
            if self.check_crc and zlib.crc32(memoryview(raw).cast("B") if raw.size else b"") != c[f"{kind}_crc32"]:
                raise CacheFormatError(f"sample {self.sample_ids[i]}: {kind} fails its crc32 in "
                                       f"{self._shard_dirs[shard].name}; run alignkd cache verify.")
            t[kind] = decode(raw, info.encoding)
        ids, values = unpack_logits(t["logit_ids"], t["logit_values"], t["logit_nnz"], K)
        return CachedSample(
            sample_id=self.sample_ids[i], manifest_row=c["manifest_row"],
            input_ids=self._list("input_ids", i), label_mask=self._list("label_mask", i),
            vision_positions=self._list("vision_positions", i), text_positions=self._list("text_positions", i),
            attn=t["attn"].reshape(T, H, Nv), vision=t["vision"].reshape(Nv, D), focus=t["focus"],
            logit_positions=self._list("logit_positions", i), logit_ids=ids, logit_values=values,
            logit_tail=t["logit_tail"],
            teacher_ce=float(self._cols["teacher_ce"][i]), teacher_entropy=float(self._cols["teacher_entropy"][i]),
            teacher_tail_mass=float(self._cols["teacher_tail_mass"][i]),
            image_path=self._cols["image_path"][i], image_sha256=self._cols["image_sha256"][i],
            image_bytes=self.image_bytes(i) if self.images else None,
            **{k: self._list(k, i) for k in REPLAYED_COLUMNS})

    def _list(self, name: str, i: int) -> np.ndarray:
        values, offsets = self._lists[name]
        return values[offsets[i]:offsets[i + 1]]

    def image_bytes(self, i: int) -> bytes | None:
        """The stored image of sample i (None when the cache was built without images)."""
        self._process_state()
        shard, row = int(self._shard_of[i]), int(self._row_in_shard[i])
        if shard not in self._parquet:
            pf = pq.ParquetFile(self._shard_dirs[shard] / SAMPLES_FILE)
            starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
            self._parquet[shard] = (pf, starts)
        pf, starts = self._parquet[shard]
        group = int(np.searchsorted(starts, row, side="right") - 1)
        if self._image_group is None or self._image_group[:2] != (shard, group):
            column = pf.read_row_group(group, columns=["image_bytes"]).column(0).to_pylist()
            self._image_group = (shard, group, column)
        return self._image_group[2][row - int(starts[group])]


def unpack_logits(ids: np.ndarray, values: np.ndarray, nnz: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-packed valid entries + counts per position -> [P, K] with -1 / 0 padding."""
    mask = np.arange(k) < nnz[:, None]
    out_ids = np.full((len(nnz), k), -1, np.int64)
    out_values = np.zeros((len(nnz), k), np.float32)
    out_ids[mask] = ids
    out_values[mask] = values
    return out_ids, out_values
