"""Random access to a cache by sample index: `open_cache(path)[i] -> CachedSample`.

Over 300 lines on purpose: opening and random access share the flat columns built at open;
split, one sample read would cross modules.

Opening reads cache.json (refusing another format or version) and every shard's
samples.parquet once, minus the image bytes, into flat numpy columns: offsets, shapes,
token ids and positions. A sample read is then, per array, one positional read of the
sample's contiguous chunks (the writer aligns samples to chunk boundaries) and one blosc
decode per chunk (see shard_format): an `os.pread` (raw chunks: `os.preadv` into the
output) locally, one batch of ranged GETs for all arrays on object storage (the storage
seam, alignkd/cache/storage/). Image bytes are read on demand from the samples.parquet
row group that holds them.

DataLoader workers: file handles, shard indexes and parquet handles are opened lazily and
keyed by pid, so a reader created in the parent can be forked or pickled (spawn) and each
worker opens its own files (and its own object-storage client); nothing held by the
parent is shared.
"""

from __future__ import annotations

import os
import zlib
from collections import OrderedDict

import numpy as np
import pyarrow as pa

from alignkd.cache.encodings import decode
from alignkd.cache.layer0_store import rows_of_record
from alignkd.cache.record import SampleRecord
from alignkd.cache.sample_encoding import rows_from_top
from alignkd.cache.shard_format import (CacheFormatError, byte_span, committed_shards, load_cache_json, open_array,
                                        read_array_info, read_index, read_parquet, read_raw)
from alignkd.cache.storage import open_store
from alignkd.errors import AlignKDError
from alignkd.storage_schemas import (ARRAY_KINDS, ATTN_RECOMPUTED, EMPTY_ENCODINGS, PACKED_ENCODINGS, REPLAYED_COLUMNS,
                                     SAMPLE_SCHEMA, SAMPLES_FILE, SCALE_OF, SCALED_ENCODINGS, element_counts)
from alignkd.storage_schemas.kinds import kinds_of, kinds_where, scaled_kinds

_LIST_COLUMNS = ("input_ids", "label_mask", "vision_positions", "text_positions", "logit_positions",
                 "image_paths", "image_sha256", "image_n_vision", *REPLAYED_COLUMNS)
_STRING_COLUMNS = ("sample_id", "vision_from", "record_id", "source")
VISION_KINDS = kinds_of("vision")  # read from the holder when a sample shares its images' tokens
FLOAT_KINDS = kinds_where(batch="float")  # decoded as they are (focus, logit_tail)
IMAGE_GROUP_BYTES = 64 * 2**20  # image bytes kept per reader (per DataLoader worker)
# Shards whose files stay open per reader (per DataLoader worker), least recently used out:
# each holds one descriptor per array kind, and a uniform order over LLaVA-665K's ~2,600
# shards would otherwise hold ~23k descriptors per worker, past the usual 1,024-20,000 limit.
MAX_OPEN_SHARDS = 64


# A read returns the same record the builder wrote; logit rows come back left-packed
# (valid ids first, then id -1 / value 0).
CachedSample = SampleRecord


class SampleNotFoundError(AlignKDError, KeyError):
    """A sample id that the cache does not hold."""

    def __str__(self) -> str:
        return str(self.args[0])


def open_cache(path, *, images: bool = True, check_crc: bool = False, prefetch_shards: bool = False) -> "CacheReader":
    """Open the cache at `path` for reading; `images=False` skips image bytes,
    `check_crc=True` checks every tensor against its stored crc32 (slower),
    `prefetch_shards=True` asks the OS to read a whole local shard ahead when it is first
    touched (for an order that reads shard by shard, `--shuffle window:N`)."""
    return CacheReader(path, images=images, check_crc=check_crc, prefetch_shards=prefetch_shards)


class CacheReader:
    def __init__(self, path, *, images: bool = True, check_crc: bool = False, prefetch_shards: bool = False) -> None:
        self.store = open_store(path)
        self.meta = load_cache_json(self.store)
        self.images = images and bool(self.meta.get("storage", {}).get("store_images", True))
        self.check_crc = check_crc
        # A whole-shard read-ahead pays only when the shard's other samples come next; under a
        # uniform order it would read every shard in full for a handful of samples each.
        self.prefetch_shards = prefetch_shards
        self._load_rows()
        self._pid: int | None = None

    # ---------------------------------------------------------------- rows, loaded once
    def _load_rows(self) -> None:
        self._shards = committed_shards(self.store)
        # image bytes load lazily by shard; the row statistics are for SQL and `cache stats`
        columns = [f.name for f in SAMPLE_SCHEMA if f.name not in ("image_bytes", "attn_top16_share")]
        tables = [read_parquet(shard, SAMPLES_FILE, columns=columns) for shard in self._shards]
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
        self.shard_of = self._shard_of  # shard number of each sample, for shard-ordered samplers
        self._id_index: dict[str, int] | None = None
        self._vision_holder = self._holder_indices()

    def _holder_indices(self) -> np.ndarray:
        """Per sample: the index of the sample whose stored vision tokens it shares, -1 for its own."""
        holder = np.full(len(self.sample_ids), -1, dtype=np.int64)
        for i, name in enumerate(self._cols["vision_from"]):
            if name:
                try:
                    holder[i] = self.index_of(name)
                except SampleNotFoundError:
                    raise CacheFormatError(f"sample {self.sample_ids[i]} of cache {self.path} shares the vision "
                                           f"tokens of sample {name}, which is not in the cache; run alignkd "
                                           "cache verify.") from None
        return holder

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def path(self) -> str:
        """The cache's location as it was given (a directory or a URL)."""
        return str(self.store)

    @property
    def vision_counts(self) -> np.ndarray:
        """Each sample's vision-token count (0 for a text-only sample)."""
        return self._cols["n_vision"]

    def index_of(self, sample_id: str) -> int:
        if self._id_index is None:
            self._id_index = {s: i for i, s in enumerate(self.sample_ids)}
        if sample_id in self._id_index:
            return self._id_index[sample_id]
        # the manifest's own id, where several records share it and got keys "ID#k"
        named = [i for i, rid in enumerate(self._cols["record_id"]) if rid == sample_id]
        if len(named) == 1:
            return named[0]
        if named:
            keys = ", ".join(self.sample_ids[i] for i in named[:5]) + (", ..." if len(named) > 5 else "")
            raise SampleNotFoundError(f"id {sample_id} names {len(named)} samples of cache {self.path} ({keys}); "
                                      "give one of their sample ids.")
        raise SampleNotFoundError(f"sample {sample_id} is not in cache {self.path}.")

    # ---------------------------------------------------------------- per-process handles
    def _process_state(self) -> None:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._open: OrderedDict[int, dict] = OrderedDict()   # shard -> {kind: (info, handle, index)}, LRU
            self._parquet: OrderedDict[int, tuple] = OrderedDict()  # shard -> (ParquetFile, row starts), LRU
            self._image_groups: OrderedDict[tuple[int, int], list] = OrderedDict()  # LRU of row groups
            self._image_groups_bytes = 0

    def _shard_arrays(self, shard: int) -> dict:
        arrays = self._open.get(shard)
        if arrays is not None:
            self._open.move_to_end(shard)
        else:
            arrays = {}
            for kind in ARRAY_KINDS:
                info = read_array_info(self._shards[shard], kind)
                handle = index = None
                if info.length:
                    handle = open_array(self._shards[shard], info)
                    index = read_index(handle, info)
                    if self.prefetch_shards:
                        handle.will_need()
                arrays[kind] = (info, handle, index)
            self._open[shard] = arrays
            while len(self._open) > MAX_OPEN_SHARDS:
                _close_arrays(self._open.popitem(last=False)[1])
        return arrays

    def close(self) -> None:
        """Close this process's file handles (reopened lazily on the next read)."""
        if self._pid == os.getpid():
            for arrays in self._open.values():
                _close_arrays(arrays)
            for pf, _ in self._parquet.values():
                pf.close()
        self._pid = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in ("_pid", "_open", "_parquet", "_image_groups", "_image_groups_bytes"):
            state.pop(key, None)
        state["_pid"] = None
        return state

    # ---------------------------------------------------------------- samples
    def __getitem__(self, i: int) -> CachedSample:
        return self.get(i)

    def get(self, i: int, *, widen: bool = True, attn: bool = True) -> CachedSample:
        """Sample i; `widen=False` keeps attn, vision and logit values in their stored width
        (with `encodings` and scales set on the record) for the GPU to widen. A cache built with
        --attn-store layer0 recomputes `attn` from its kit on this process's CPU when widening
        (`attn=False` skips that: `attn` is then None), and leaves it None with widen=False,
        where the training step recomputes a whole batch on its device."""
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"sample index {i} out of range for {n} samples")
        i %= n
        self._process_state()
        c = self._row(i)
        T, H, Nv, D, top_k = c["n_text"], c["n_heads"], c["n_vision"], c["vision_dim"], c["attn_k"]
        raw, enc = self._read_raw(i, c)
        holder = int(self._vision_holder[i])
        if holder >= 0:  # the vision tokens (and their scales) are stored once, with the first sample
            raw.update(self._read_raw(holder, self._row(holder), VISION_KINDS)[0])
        shapes = {"attn": (T, H, top_k or Nv), "attn_scale": (T, H), "vision": (Nv, D), "vision_scale": (D,)}
        top = (decode(raw["attn_ids"], enc["attn_ids"]).reshape(T, H, top_k),  # --attn-topk: kept columns
               decode(raw["attn_tail"], enc["attn_tail"]).reshape(T, H)) if top_k else (None, None)
        recomputed = enc["attn"] == ATTN_RECOMPUTED  # --attn-store layer0: no rows stored
        # the scaled kinds (attn, vision) this cache stores; layer0 and --skip leave theirs None
        kinds = tuple(k for k in scaled_kinds() if enc[k] not in EMPTY_ENCODINGS)
        t = {name: None for k in scaled_kinds() for name in (k, SCALE_OF[k])}
        if widen:
            t.update({k: decode(raw[k], enc[k], raw.get(SCALE_OF[k]), shapes[k]) for k in kinds})
            if top_k:
                t["attn"] = rows_from_top(t["attn"], *top, Nv)
            values, kept, top = decode(raw["logit_values"], enc["logit_values"]), None, (None, None)
        else:
            packed = {k: v for k, v in shapes.items() if k in kinds and enc[k] in PACKED_ENCODINGS}
            shapes.update({k: (*v[:-1], v[-1] // 2) for k, v in packed.items()})  # two values per byte
            t.update({k: raw[k].reshape(shapes[k]) for k in kinds})
            for kind in kinds:  # scales only exist (maybe empty: no image) for scaled encodings
                scale = SCALE_OF[kind]
                t[scale] = raw[scale].reshape(shapes[scale]) if enc[kind] in SCALED_ENCODINGS else raw[scale]
            values, kept = raw["logit_values"], {k: enc[k] for k in (*kinds, "logit_values")}
        ids, values = unpack_logits(decode(raw["logit_ids"], enc["logit_ids"]), values,
                                    raw["logit_nnz"], c["logit_k"])
        rec = CachedSample(
            sample_id=self.sample_ids[i], manifest_row=c["manifest_row"],
            record_id=self._cols["record_id"][i], source=self._cols["source"][i],
            input_ids=self._list("input_ids", i), label_mask=self._list("label_mask", i),
            vision_positions=self._list("vision_positions", i), text_positions=self._list("text_positions", i),
            attn=t["attn"], vision=t["vision"], logit_positions=self._list("logit_positions", i),
            logit_ids=ids, logit_values=values, **{k: decode(raw[k], enc[k]) for k in FLOAT_KINDS},
            teacher_ce=float(self._cols["teacher_ce"][i]), teacher_entropy=float(self._cols["teacher_entropy"][i]),
            teacher_tail_mass=float(self._cols["teacher_tail_mass"][i]),
            image_paths=tuple(self._list("image_paths", i)), image_sha256=tuple(self._list("image_sha256", i)),
            image_n_vision=self._list("image_n_vision", i),
            image_bytes=self.image_bytes(i) if self.images else None, encodings=kept,
            **{k: self._list(k, i) for k in REPLAYED_COLUMNS},
            # a scaled encoding always hands its scales back, even none (a text-only sample's [0, H])
            **{SCALE_OF[k]: None if widen or enc[k] not in SCALED_ENCODINGS else t[SCALE_OF[k]]
               for k in scaled_kinds()},
            attn_ids=top[0], attn_tail=top[1])
        if recomputed and widen and attn:  # the same dense rows a maps-cache returns
            rec.attn = rows_of_record(self.layer0_kit(), rec)
        return rec

    def layer0_kit(self, device="cpu"):
        """The cache's layer-0 kit (--attn-store layer0), loaded once per process and device."""
        from alignkd.cache.layer0_store import load_cache_kit

        return load_cache_kit(self.store, self.meta, device)

    @property
    def skipped(self) -> tuple[str, ...]:
        """The optional targets `cache build --skip` left out of this cache (none: ())."""
        return tuple(self.meta.get("storage", {}).get("skip", ()))

    @property
    def attn_store(self) -> str:
        """"maps" (rows stored per sample) or "layer0" (rows recomputed from the cache's kit)."""
        return self.meta.get("storage", {}).get("attn_store", "maps")

    def _row(self, i: int) -> dict:
        """Sample i's integer columns, and where its vision tokens are stored."""
        c = {k: int(v[i]) for k, v in self._cols.items() if k not in _STRING_COLUMNS and v.dtype.kind in "iu"}
        c["vision_from"] = self._cols["vision_from"][i]
        return c

    def _read_raw(self, i: int, c: dict, kinds=ARRAY_KINDS) -> tuple[dict, dict]:
        """The stored values of sample i (flat, stored dtype) in each of `kinds`, and every
        array's encoding."""
        shard = int(self._shard_of[i])
        arrays = self._shard_arrays(shard)
        enc = {kind: info.encoding for kind, (info, _, _) in arrays.items()}
        sizes = element_counts(c, enc)
        arrays = {k: v for k, v in arrays.items() if k in kinds}
        fetched = self._fetch_batched(shard, arrays, c, sizes)
        raw = {}
        for kind, (info, handle, index) in arrays.items():
            raw[kind] = read_raw(handle, info, index, c[f"{kind}_offset"], sizes[kind], fetched.get(kind))
            if self.check_crc and zlib.crc32(memoryview(raw[kind]).cast("B") if raw[kind].size else b"") \
                    != c[f"{kind}_crc32"]:
                raise CacheFormatError(f"sample {self.sample_ids[i]}: {kind} fails its crc32 in "
                                       f"{self._shards[shard].name}; run alignkd cache verify.")
        return raw, enc

    def _fetch_batched(self, shard: int, arrays: dict, c: dict, sizes: dict) -> dict:
        """Where a read is a round trip (object storage), every array's byte range of one sample in
        one concurrent batch (9 sequential round trips otherwise); locally nothing (one pread each)."""
        store = self._shards[shard]
        if not store.batched_reads:
            return {}
        wanted = {}
        for kind, (info, handle, index) in arrays.items():
            if handle is not None:
                span = byte_span(info, index, c[f"{kind}_offset"], sizes[kind])
                if span is not None:
                    wanted[kind] = (handle, span)
        data = store.read_spans([h for h, _ in wanted.values()], [s for _, s in wanted.values()])
        return dict(zip(wanted, data))

    def _list(self, name: str, i: int) -> np.ndarray:
        values, offsets = self._lists[name]
        return values[offsets[i]:offsets[i + 1]]

    def image_bytes(self, i: int) -> tuple[bytes, ...] | None:
        """The stored images of sample i (None when the cache was built without images)."""
        if not self.images:
            return None
        self._process_state()
        shard, row = int(self._shard_of[i]), int(self._row_in_shard[i])
        if shard not in self._parquet:
            pf = self._shards[shard].parquet_file(SAMPLES_FILE)
            starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
            self._parquet[shard] = (pf, starts)
            while len(self._parquet) > MAX_OPEN_SHARDS:
                self._parquet.popitem(last=False)[1][0].close()
        self._parquet.move_to_end(shard)
        pf, starts = self._parquet[shard]
        group = int(np.searchsorted(starts, row, side="right") - 1)
        column = self._image_groups.get((shard, group))
        if column is None:
            column = pf.read_row_group(group, columns=["image_bytes"]).column(0).to_pylist()
            self._remember_image_group((shard, group), column)
        else:
            self._image_groups.move_to_end((shard, group))
        return tuple(column[row - int(starts[group])])

    def _remember_image_group(self, key: tuple[int, int], column: list) -> None:
        """Keep decoded row groups of image bytes, least recently used out past IMAGE_GROUP_BYTES:
        a shuffled read order jumps between row groups, and re-reading one per sample cost
        ~0.35 ms of a small sample's ~1 ms read."""
        self._image_groups[key] = column
        self._image_groups_bytes += _group_bytes(column)
        while self._image_groups_bytes > IMAGE_GROUP_BYTES and len(self._image_groups) > 1:
            _, old = self._image_groups.popitem(last=False)
            self._image_groups_bytes -= _group_bytes(old)


def _group_bytes(column: list) -> int:
    return sum(len(b) for images in column for b in images or ())


def _close_arrays(arrays: dict) -> None:
    for _, handle, _ in arrays.values():
        if handle is not None:
            handle.close()


def unpack_logits(ids: np.ndarray, values: np.ndarray, nnz: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-packed valid entries + counts per position -> [P, K] with -1 / 0 padding."""
    mask = np.arange(k) < nnz[:, None]
    out_ids = np.full((len(nnz), k), -1, np.int64)
    out_values = np.zeros((len(nnz), k), values.dtype)
    out_ids[mask] = ids
    out_values[mask] = values
    return out_ids, out_values
