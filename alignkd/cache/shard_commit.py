"""One shard in progress: filled in a staging directory, then committed whole.

The shard is built in `shards/.tmp-shard-NNNNNN/` under the store's staging directory (the
cache itself on local disk, a local temporary directory for object storage): each sample's
compressed chunks are appended to one file per array as it arrives (bounded memory), its
row and the rejects collect in memory. `commit` writes each array's shard index and
zarr.json, samples.parquet, rejects.parquet, then shard.json with every other file's size
and sha256 LAST, fsyncs every file and directory, and publishes the directory through the
store (a rename locally; an upload with shard.json last on object storage). Until then no
reader sees the shard, so a crash loses at most this one (docs/cache-format.md, "Commit
protocol").
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from alignkd.cache.record import SampleRecord
from alignkd.cache.sample_encoding import EncodedSample
from alignkd.cache.shard_format import ArrayFileWriter
from alignkd.cache.storage import CacheStore, fsync_dir, write_durable
from alignkd.storage_schemas import (ARRAY_KINDS, FORMAT_NAME, REJECT_SCHEMA, REJECTS_FILE, REPLAYED_COLUMNS,
                                     SAMPLE_SCHEMA, SAMPLES_FILE, SAMPLES_ROW_GROUP, SCHEMA_VERSION, SHARD_JSON,
                                     SHARDS_DIR, TEMP_PREFIX, shard_name)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ShardInProgress:
    """One temp shard directory being filled, published to `store` on commit."""

    def __init__(self, store: CacheStore, staging: Path, index: int, rank: int, encodings: dict) -> None:
        self.store = store
        self.name = shard_name(index, rank)
        self.index, self.rank = index, rank
        self.dir = staging / SHARDS_DIR / f"{TEMP_PREFIX}{self.name}"
        self.dir.mkdir()
        import zarr
        from zarr.storage import LocalStore

        self.zarr_store = LocalStore(self.dir)
        zarr.create_group(store=self.zarr_store)
        self.arrays = {k: ArrayFileWriter(self.dir, k, encodings[k]) for k in ARRAY_KINDS}
        self.rows: list[dict] = []
        self.rejects: list[dict] = []

    def add(self, rec: SampleRecord, encoded: EncodedSample, store_images: bool) -> None:
        row = sample_row(rec, encoded, store_images)
        for kind in ARRAY_KINDS:
            row[f"{kind}_offset"], row[f"{kind}_crc32"] = self.arrays[kind].append_compressed(encoded.arrays[kind])
        self.rows.append(row)

    def commit(self) -> dict:
        """Seal, fsync and publish; return the shard.json document."""
        files = self._seal()
        rows = [r["manifest_row"] for r in self.rows + self.rejects]
        doc = {"format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, "name": self.name,
               "rank": self.rank, "index": self.index, "n_samples": len(self.rows),
               "n_rejects": len(self.rejects),
               "manifest_rows": {"min": min(rows), "max": max(rows)},
               "arrays": {k: {"length": w.length, "encoding": w.encoding} for k, w in self.arrays.items()},
               "files": files, "committed_at": now()}
        write_durable(self.dir / SHARD_JSON, json.dumps(doc, indent=1).encode())
        for d in sorted({p.parent for p in self.dir.rglob("*")}, key=lambda p: -len(p.parts)):
            fsync_dir(d)
        self.store.publish_dir(self.dir, f"{SHARDS_DIR}/{self.name}", last=SHARD_JSON)
        return doc

    def _seal(self) -> list[dict]:
        """Finish every file but shard.json; return their entries (path, bytes, sha256), sorted."""
        files = []
        for writer in self.arrays.values():
            info = writer.finish()
            writer.write_metadata(self.zarr_store)
            if info is not None:
                files.append(info.__dict__)
        _write_parquet(self.dir / SAMPLES_FILE, self.rows, SAMPLE_SCHEMA, SAMPLES_ROW_GROUP)
        _write_parquet(self.dir / REJECTS_FILE, self.rejects, REJECT_SCHEMA, None)
        listed = {f["path"] for f in files}
        for path in sorted(p for p in self.dir.rglob("*") if p.is_file()):
            rel = path.relative_to(self.dir).as_posix()
            if rel not in listed:
                files.append(_file_entry(path, rel))
        return sorted(files, key=lambda f: f["path"])

    def discard(self) -> None:
        for writer in self.arrays.values():
            try:
                writer.file.close()
            except OSError:  # flushing the rest onto the full disk that failed us
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


def sample_row(rec: SampleRecord, encoded: EncodedSample, store_images: bool) -> dict:
    """A sample's samples.parquet row, but for the array offsets and crc32s."""
    return {
        "sample_id": rec.sample_id, "manifest_row": int(rec.manifest_row),
        "record_id": rec.record_id or rec.sample_id, "source": rec.source,
        "input_ids": np.asarray(rec.input_ids, np.int32), "label_mask": np.asarray(rec.label_mask, bool),
        "vision_positions": np.asarray(rec.vision_positions, np.int32),
        "text_positions": np.asarray(rec.text_positions, np.int32),
        "logit_positions": np.asarray(rec.logit_positions, np.int32),
        **{k: np.asarray(getattr(rec, k), np.int32) for k in REPLAYED_COLUMNS},
        "n_text": rec.attn.shape[0], "n_heads": rec.attn.shape[1], "n_vision": rec.attn.shape[2],
        "attn_k": encoded.attn_k, "attn_top16_share": encoded.attn_top16_share,
        "vision_dim": rec.vision.shape[1], "vision_from": encoded.vision_from, "n_logit_positions": rec.logit_ids.shape[0],
        "logit_k": rec.logit_ids.shape[1], "logit_entries": encoded.logit_entries,
        "teacher_ce": float(rec.teacher_ce), "teacher_entropy": float(rec.teacher_entropy),
        "teacher_tail_mass": float(rec.teacher_tail_mass), "n_images": rec.n_images,
        "image_paths": list(rec.image_paths), "image_sha256": list(rec.image_sha256),
        "image_n_vision": np.asarray(rec.image_n_vision, np.int32),
        "image_bytes": list(rec.image_bytes) if store_images and rec.image_bytes is not None else [],
    }


def _file_entry(path: Path, rel: str) -> dict:
    data = path.read_bytes()
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return {"path": rel, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _write_parquet(path: Path, rows: list[dict], schema: pa.Schema, row_group: int | None) -> None:
    table = pa.Table.from_pylist(rows, schema=schema) if rows else schema.empty_table()
    pq.write_table(table, path, row_group_size=row_group or None, compression="zstd")
