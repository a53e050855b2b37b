"""CacheWriter: computed numpy tensors in, committed shards out. Knows nothing of models.

A shard is built in `shards/.tmp-shard-NNNNNN/`: tensors are encoded, checksummed and
cut into chunks (blosc-compressed, or raw for uint8-log/int8 codes) as samples arrive
(bounded memory, one sequential file per array), rows and rejects collect in memory. At `shard_size` samples (or on close)
the shard is committed: array indexes and zarr.json, samples.parquet, rejects.parquet,
then shard.json with every file's size and sha256 LAST, fsync, rename to `shard-NNNNNN`,
fsync the parent, and only then the catalog row. A crash loses at most the shard in
flight; a resumed writer deletes its stale temp dirs and skips `done_rows`.

With `background=True` (the default) each sample is encoded and compressed on a small
pool of encoder threads, and the writes, commits and catalog updates run in order on one
writer thread behind a bounded queue, so the teacher's next forward overlaps all of it;
an error there is re-raised by the next `add`, `reject` or `close`. The writer takes ownership of
the arrays handed to `add`: do not modify them afterwards.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from alignkd.cache.lock import CacheLock
from alignkd.cache.record import SampleRecord  # noqa: F401  (builders import it from here)
from alignkd.cache.encodings import encode
from alignkd.cache.location import cache_path, is_remote, remove_tree, upload_dir
from alignkd.cache.shard_format import (ArrayFileWriter, CacheFormatError, CompressedSample, codec_for,
                                        committed_shards, compress_sample, load_cache_json, read_parquet)
from alignkd.errors import AlignKDError, ConfigError, describe_os_error
from alignkd.storage_schemas import (ARRAY_KINDS, ARRAY_SPECS, ATTN_DTYPES, CACHE_JSON,
                                     CACHE_JSON_FIELDS, FORMAT_NAME, REJECT_SCHEMA, REJECTS_FILE, REPLAYED_COLUMNS,
                                     SCALE_OF, UINT16_VOCAB,
                                     SAMPLE_SCHEMA, SAMPLES_FILE, SAMPLES_ROW_GROUP, SCHEMA_VERSION,
                                     SHARD_JSON, SHARDS_DIR, TEMP_PREFIX, VISION_DTYPES, chunk_elements,
                                     shard_name)


class CacheWriteError(AlignKDError, OSError):
    """The disk refused a write; the shard in flight was discarded. Still an OSError to callers."""


QUEUE_DEPTH = 4  # samples in flight to the writer thread (~8 MB each at 7B shapes)
# Encoding and compressing a 7B-shaped sample is ~15 ms of numpy/blosc CPU, which one
# thread cannot do at a GPU teacher's rate; the writer thread then only appends and hashes.
ENCODER_THREADS = min(4, os.cpu_count() or 1)


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
    """A record's tensors -> each array's stored values, compressed. Pure and thread-safe
    (numpy and blosc release the GIL), so the writer runs it on a pool of encoder threads."""
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


class _ShardInProgress:
    """One temp shard directory being filled."""

    def __init__(self, shards_dir: Path, index: int, rank: int, encodings: dict) -> None:
        self.name = shard_name(index, rank)
        self.index, self.rank = index, rank
        self.final = shards_dir / self.name
        self.dir = shards_dir / f"{TEMP_PREFIX}{self.name}"
        self.dir.mkdir()
        import zarr
        from zarr.storage import LocalStore

        self.store = LocalStore(self.dir)
        zarr.create_group(store=self.store)
        self.arrays = {k: ArrayFileWriter(self.dir, k, encodings[k]) for k in ARRAY_KINDS}
        self.rows: list[dict] = []
        self.rejects: list[dict] = []

    def add(self, rec: SampleRecord, encoded: EncodedSample, store_images: bool) -> None:
        row = {
            "sample_id": rec.sample_id, "manifest_row": int(rec.manifest_row),
            "input_ids": np.asarray(rec.input_ids, np.int32), "label_mask": np.asarray(rec.label_mask, bool),
            "vision_positions": np.asarray(rec.vision_positions, np.int32),
            "text_positions": np.asarray(rec.text_positions, np.int32),
            "logit_positions": np.asarray(rec.logit_positions, np.int32),
            **{k: np.asarray(getattr(rec, k), np.int32) for k in REPLAYED_COLUMNS},
            "n_text": rec.attn.shape[0], "n_heads": rec.attn.shape[1], "n_vision": rec.attn.shape[2],
            "vision_dim": rec.vision.shape[1], "n_logit_positions": rec.logit_ids.shape[0],
            "logit_k": rec.logit_ids.shape[1], "logit_entries": encoded.logit_entries,
            "teacher_ce": float(rec.teacher_ce), "teacher_entropy": float(rec.teacher_entropy),
            "teacher_tail_mass": float(rec.teacher_tail_mass), "n_images": rec.n_images,
            "image_paths": list(rec.image_paths), "image_sha256": list(rec.image_sha256),
            "image_n_vision": np.asarray(rec.image_n_vision, np.int32),
            "image_bytes": list(rec.image_bytes) if store_images and rec.image_bytes is not None else [],
        }
        for kind in ARRAY_KINDS:
            row[f"{kind}_offset"], row[f"{kind}_crc32"] = self.arrays[kind].append_compressed(encoded.arrays[kind])
        self.rows.append(row)

    def commit(self) -> dict:
        """Seal, fsync and rename into place; return the shard.json document."""
        files = []
        for writer in self.arrays.values():
            info = writer.finish()
            writer.write_metadata(self.store)
            if info is not None:
                files.append(info.__dict__)
        _write_parquet(self.dir / SAMPLES_FILE, self.rows, SAMPLE_SCHEMA, SAMPLES_ROW_GROUP)
        _write_parquet(self.dir / REJECTS_FILE, self.rejects, REJECT_SCHEMA, None)
        listed = {f["path"] for f in files}
        for path in sorted(p for p in self.dir.rglob("*") if p.is_file()):
            rel = path.relative_to(self.dir).as_posix()
            if rel not in listed:
                files.append(_file_entry(path, rel))
        files.sort(key=lambda f: f["path"])
        rows = [r["manifest_row"] for r in self.rows + self.rejects]
        doc = {"format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, "name": self.name,
               "rank": self.rank, "index": self.index, "n_samples": len(self.rows),
               "n_rejects": len(self.rejects),
               "manifest_rows": {"min": min(rows), "max": max(rows)},
               "arrays": {k: {"length": w.length, "encoding": w.encoding} for k, w in self.arrays.items()},
               "files": files, "committed_at": _now()}
        _write_durable(self.dir / SHARD_JSON, json.dumps(doc, indent=1).encode())
        for d in sorted({p.parent for p in self.dir.rglob("*")}, key=lambda p: -len(p.parts)):
            _fsync_dir(d)
        os.rename(self.dir, self.final)
        _fsync_dir(self.final.parent)
        return doc

    def discard(self) -> None:
        for writer in self.arrays.values():
            try:
                writer.file.close()
            except OSError:  # flushing the rest onto the full disk that failed us
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


def _file_entry(path: Path, rel: str) -> dict:
    import hashlib

    data = path.read_bytes()
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return {"path": rel, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _write_parquet(path: Path, rows: list[dict], schema: pa.Schema, row_group: int | None) -> None:
    table = pa.Table.from_pylist(rows, schema=schema) if rows else schema.empty_table()
    pq.write_table(table, path, row_group_size=row_group or None, compression="zstd")


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class CacheWriter:
    """Create or resume the cache at `path`; `add`/`reject` samples; `close` commits the rest.

    Holds CACHE/.lock for its whole life. Rank 0 updates catalog.duckdb after each commit;
    other ranks leave it alone and rank 0 calls `rebuild_catalog` once all ranks closed.
    """

    def __init__(self, path, meta: dict, *, shard_size: int = 256, attn_dtype: str = "bfloat16",
                 vision_dtype: str = "bfloat16", store_images: bool = True, background: bool = True,
                 overwrite: bool = False, rank: int = 0, vocab_size: int | None = None) -> None:
        if attn_dtype not in ATTN_DTYPES:
            raise ConfigError(f"--attn-dtype must be one of {', '.join(ATTN_DTYPES)}, not {attn_dtype}.")
        if vision_dtype not in VISION_DTYPES:
            raise ConfigError(f"--vision-dtype must be one of {', '.join(VISION_DTYPES)}, not {vision_dtype}.")
        if shard_size < 1:
            raise ConfigError(f"--shard-size must be at least 1, not {shard_size}.")
        clash = sorted(set(meta) & set(CACHE_JSON_FIELDS))
        if clash:
            raise ValueError(f"builder meta may not use the writer's cache.json keys {clash}")
        # On object storage shards are built in a local staging directory and uploaded at
        # commit, shard.json last (docs/cache-format.md, "Object storage").
        self.remote = cache_path(path) if is_remote(path) else None
        staging = Path(tempfile.mkdtemp(prefix="alignkd-stage-")) if self.remote is not None else None
        self.path, self.rank, self.shard_size = staging or Path(path), rank, shard_size
        self.location = self.remote if self.remote is not None else self.path
        self.store_images = store_images
        vocab_size = vocab_size or meta.get("teacher_shapes", {}).get("vocab_size")
        id_dtype = "uint16" if vocab_size and vocab_size <= UINT16_VOCAB else "uint32"
        self.storage = {"attn_dtype": attn_dtype, "vision_dtype": vision_dtype, "logit_id_dtype": id_dtype,
                        "shard_size": shard_size, "store_images": store_images}
        self.encodings = {k: spec.get("encoding") or self.storage[spec["option"]]
                          for k, spec in ARRAY_SPECS.items()}
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = CacheLock(self.path, rank).acquire()
        try:
            self.existing_meta = self._open_or_create(meta, overwrite)
            self._clean_temp_dirs()
            self.done_rows = self._read_done_rows()
            self._next_index = self._first_free_index()
        except BaseException:
            self._lock.release()
            raise
        self._shard: _ShardInProgress | None = None
        self._failed_shard: _ShardInProgress | None = None
        self._error: BaseException | None = None
        self._catalog_stale = False
        self._closed = False
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._encoders: ThreadPoolExecutor | None = None
        if background:
            self._encoders = ThreadPoolExecutor(ENCODER_THREADS, thread_name_prefix="alignkd-cache-encode")
            self._queue = queue.Queue(maxsize=QUEUE_DEPTH)
            self._thread = threading.Thread(target=self._drain, name="alignkd-cache-writer", daemon=True)
            self._thread.start()

    # ---------------------------------------------------------------- public API
    def add(self, rec: SampleRecord) -> None:
        self._raise_pending()
        check_record(rec)
        # encoding starts now on the pool; the writer thread takes the results in order
        encoded = self._encoders.submit(encode_sample, rec, self.encodings) if self._encoders else None
        self._submit(("add", (rec, encoded)))

    def reject(self, sample_id: str, manifest_row: int, reason: str, message: str) -> None:
        self._raise_pending()
        self._submit(("reject", {"sample_id": sample_id, "manifest_row": int(manifest_row),
                                 "reason": reason, "message": message}))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._thread is not None:
                self._queue.put(None)
                self._thread.join()
                self._encoders.shutdown(cancel_futures=True)
            elif self._error is None:
                self._finish()
            if self._error is not None:
                if self._shard is not None:
                    self._shard.discard()
                raise self._error
        finally:
            self._lock.release()
            if self.remote is not None:
                shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- opening
    def _open_or_create(self, meta: dict, overwrite: bool) -> dict | None:
        if self.remote is not None:
            return self._open_or_create_remote(meta, overwrite)
        cache_json = self.path / CACHE_JSON
        # Hidden entries are ours (locks, .tmp- files): a build killed while creating the
        # cache leaves at most a .tmp-cache.json, and that directory still counts as empty.
        entries = [p for p in self.path.iterdir() if not p.name.startswith(".")]
        if entries and not cache_json.is_file():
            raise CacheFormatError(f"{self.path} exists and is not an alignkd cache (no {CACHE_JSON}); "
                                   "choose an empty or new directory.")
        if overwrite and self.rank == 0:
            for p in entries:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        elif cache_json.is_file():
            existing = load_cache_json(self.path)
            self._check_storage(existing.get("storage", {}))
            return existing
        if self.rank != 0:
            raise CacheFormatError(f"{self.path} has no {CACHE_JSON}; rank 0 must create the cache first.")
        self._create(meta)
        return None

    def _open_or_create_remote(self, meta: dict, overwrite: bool) -> dict | None:
        remote = self.remote
        entries = list(remote.iterdir()) if remote.exists() else []
        if entries and not (remote / CACHE_JSON).is_file():
            raise CacheFormatError(f"{remote} exists and is not an alignkd cache (no {CACHE_JSON}); "
                                   "choose an empty or new prefix.")
        (self.path / SHARDS_DIR).mkdir(exist_ok=True)
        if overwrite and self.rank == 0:
            remove_tree(remote)
        elif entries:
            existing = load_cache_json(remote)
            self._check_storage(existing.get("storage", {}))
            return existing
        if self.rank != 0:
            raise CacheFormatError(f"{remote} has no {CACHE_JSON}; rank 0 must create the cache first.")
        from alignkd import __version__

        doc = {"format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, "alignkd_version": __version__,
               "created_at": _now(), "storage": self.storage, **meta}
        (remote / CACHE_JSON).write_bytes(json.dumps(doc, indent=1).encode())  # one PUT: atomic
        return None

    def _check_storage(self, stored: dict) -> None:
        for key in ("attn_dtype", "vision_dtype", "logit_id_dtype"):
            if key in stored and stored[key] != self.storage[key]:
                raise ConfigError(f"cache {self.path} stores --{key.replace('_', '-')}={stored[key]} but this "
                                  f"run asks for {self.storage[key]}; use the same option or pass --overwrite.")

    def _create(self, meta: dict) -> None:
        from alignkd import __version__
        from alignkd.cache.catalog import rebuild_catalog

        doc = {"format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, "alignkd_version": __version__,
               "created_at": _now(), "storage": self.storage, **meta}
        tmp = self.path / f"{TEMP_PREFIX}{CACHE_JSON}"
        _write_durable(tmp, json.dumps(doc, indent=1).encode())
        os.rename(tmp, self.path / CACHE_JSON)  # first, so any later entry belongs to a real cache
        (self.path / SHARDS_DIR).mkdir(exist_ok=True)
        rebuild_catalog(self.path)
        _fsync_dir(self.path)

    def _clean_temp_dirs(self) -> None:
        own = re.compile(rf"^{re.escape(TEMP_PREFIX)}{re.escape(shard_name(0, self.rank))[:-6]}\d{{6}}$")
        for p in (self.path / SHARDS_DIR).iterdir():
            if own.match(p.name):
                shutil.rmtree(p)

    def _read_done_rows(self) -> set[int]:
        done: set[int] = set()
        for d in committed_shards(self.location):
            for name in (SAMPLES_FILE, REJECTS_FILE):
                done.update(read_parquet(d / name, columns=["manifest_row"]).column(0).to_pylist())
        return done

    def _first_free_index(self) -> int:
        prefix = shard_name(0, self.rank)[:-6]
        taken = [int(d.name[len(prefix):]) for d in committed_shards(self.location)
                 if d.name.startswith(prefix) and d.name[len(prefix):].isdigit()]
        return max(taken, default=-1) + 1

    # ---------------------------------------------------------------- the work
    def _submit(self, item) -> None:
        if self._closed:
            raise RuntimeError("CacheWriter is closed")
        if self._queue is None:
            try:
                self._handle(item)
            except BaseException as exc:
                self._error = exc
                raise
        else:
            self._queue.put(item)

    def _raise_pending(self) -> None:
        if self._error is not None:
            raise self._error

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if self._error is not None:      # keep draining so add() never blocks forever
                if item is None:
                    return
                continue
            try:
                if item is None:
                    self._finish()
                    return
                self._handle(item)
            except BaseException as exc:     # surfaced by the next add/reject/close
                self._error = exc

    def _handle(self, item) -> None:
        try:
            self._handle_item(item)
        except OSError as exc:
            raise self._write_failed(exc) from None

    def _write_failed(self, exc: OSError) -> CacheWriteError:
        """A full disk (or a file size limit, or a vanished directory) mid-shard: the shard in
        flight is discarded, so nothing half-written is left, and a rerun resumes."""
        shard, self._shard = self._failed_shard or self._shard, None
        self._failed_shard = None
        name = shard.name if shard is not None else "the catalog"
        if shard is not None:
            shard.discard()
        return CacheWriteError(f"cannot write {name} of cache {self.path} ({describe_os_error(exc).rstrip('.')}); nothing "
                               "of it was kept, and rerunning the same command resumes after the last "
                               "committed shard.")

    def _handle_item(self, item) -> None:
        op, payload = item
        if self._shard is None:
            self._shard = _ShardInProgress(self.path / SHARDS_DIR, self._next_index, self.rank, self.encodings)
            self._next_index += 1
        if op == "add":
            rec, encoded = payload
            encoded = encoded.result() if encoded is not None else encode_sample(rec, self.encodings)
            self._shard.add(rec, encoded, self.store_images)
            if len(self._shard.rows) >= self.shard_size:
                self._commit()
        else:
            self._shard.rejects.append(payload)

    def _finish(self) -> None:
        import duckdb

        try:
            self._finish_shards()
        except OSError as exc:
            raise self._write_failed(exc) from None
        except duckdb.Error as exc:  # the shards are complete; only the index lags
            raise CacheWriteError(f"catalog.duckdb of cache {self.path} could not be rebuilt "
                                  f"({str(exc).splitlines()[0]}); rerunning the same command rebuilds it.") from None

    def _finish_shards(self) -> None:
        if self._shard is not None and (self._shard.rows or self._shard.rejects):
            self._commit()
        elif self._shard is not None:
            self._shard.discard()
        if self._catalog_stale and self.rank == 0 and self.remote is None:
            from alignkd.cache.catalog import rebuild_catalog

            rebuild_catalog(self.path)

    def _commit(self) -> None:
        import duckdb

        from alignkd.cache.catalog import record_shard

        shard, self._shard = self._shard, None
        self._failed_shard = shard  # until the rename: what _write_failed discards
        doc = shard.commit()
        self._failed_shard = None
        if self.remote is not None:
            target = self.remote / SHARDS_DIR / shard.name
            remove_tree(target)  # objects of an upload killed before its shard.json
            upload_dir(shard.final, target, last=SHARD_JSON)
            shutil.rmtree(shard.final)
            return  # no catalog.duckdb on object storage: `cache sql` builds it in memory
        if self.rank != 0:
            return
        try:
            record_shard(self.path, doc)
        except duckdb.Error as exc:  # e.g. a client holds the catalog open; the shards are the truth
            warnings.warn(f"catalog.duckdb not updated for {doc['name']} ({exc}); rebuilt on close.")
            self._catalog_stale = True

