"""CacheWriter: computed numpy tensors in, committed shards out. Knows nothing of models.

The writer is the sum of four small parts, each with one job:

- `cache_setup`: create the cache (cache.json first) or resume it (same encodings; its
  rank's stale temp shard directories deleted; `done_rows` to skip);
- `sample_encoding`: a record's tensors checked, encoded and compressed;
- `shard_commit`: the shard in flight, filled in `shards/.tmp-shard-NNNNNN/` and committed
  whole: shard.json LAST, fsync, then published through the storage seam (a rename locally,
  an upload with shard.json last on object storage), and only then the catalog row;
- `write_thread`: encoding on a pool of encoder threads, writes, commits and catalog
  updates in order on one writer thread behind a bounded queue, so the teacher's next
  forward overlaps all of it (`background=True`, the default); an error there is
  re-raised by the next `add`, `reject` or `close`.

A crash loses at most the shard in flight. Every byte goes through the cache's
`CacheStore` (alignkd/cache/storage/), so none of this asks where the cache lives. The
writer takes ownership of the arrays handed to `add`: do not modify them afterwards.
"""

from __future__ import annotations


from alignkd.cache import cache_setup
from alignkd.cache.lock import CacheLock
from alignkd.cache.record import SampleRecord  # noqa: F401  (builders import it from here)
from alignkd.cache.sample_encoding import check_record, encode_sample, vision_key
from alignkd.cache.shard_commit import ShardInProgress
from alignkd.cache.storage import open_store
from alignkd.cache.write_thread import WriteThread
from alignkd.errors import AlignKDError, ConfigError, describe_os_error
from alignkd.storage_schemas import (ARRAY_SPECS, ATTN_DTYPES, ATTN_RECOMPUTED, ATTN_STORES, CACHE_JSON_FIELDS,
                                     PACKED_ENCODINGS, SHARDS_DIR, SKIPPABLE_TARGETS, UINT16_VOCAB, VISION_DTYPES,
                                     skipped_encodings)


class CacheWriteError(AlignKDError, OSError):
    """The disk refused a write; the shard in flight was discarded. Still an OSError to callers."""


def check_attn_topk(attn_topk: int, attn_dtype: str) -> None:
    """`cache build` asks this before loading the teacher, the writer again on opening."""
    if attn_topk < 0:
        raise ConfigError(f"--attn-topk must be 0 (every column) or more, not {attn_topk}.")
    if attn_topk and attn_dtype in PACKED_ENCODINGS:
        raise ConfigError(f"--attn-topk keeps an odd number of columns for some rows; --attn-dtype {attn_dtype} "
                          "packs two per byte, so choose an 8- or 16-bit attention dtype.")


def check_attn_store(attn_store: str, attn_topk: int) -> None:
    """`cache build` asks this before loading the teacher, the writer again on opening."""
    if attn_store not in ATTN_STORES:
        raise ConfigError(f"--attn-store must be one of {', '.join(ATTN_STORES)}, not {attn_store}.")
    if attn_store == "layer0" and attn_topk:
        raise ConfigError("--attn-topk selects stored attention columns, and --attn-store layer0 stores none; "
                          "leave --attn-topk out.")


def check_skip(skip, attn_store: str, attn_topk: int) -> None:
    """`cache build` asks this before loading the teacher, the writer again on opening."""
    unknown = sorted(set(skip) - set(SKIPPABLE_TARGETS))
    if unknown:
        raise ConfigError(f"--skip {unknown[0]}: only {' and '.join(SKIPPABLE_TARGETS)} may be left out of a cache.")
    if "vision" in skip and attn_store == "layer0":
        raise ConfigError("--attn-store layer0 recomputes the attention rows from the stored vision tokens, so "
                          "--skip vision cannot go with it; use --attn-store maps or keep the vision tokens.")
    if "attn" in skip and (attn_store == "layer0" or attn_topk):
        option = "--attn-store layer0" if attn_store == "layer0" else "--attn-topk"
        raise ConfigError(f"--skip attn stores no attention, so {option} has nothing to do; leave one of them out.")


def _check_options(meta: dict, attn_dtype: str, vision_dtype: str, shard_size: int, attn_topk: int) -> None:
    if attn_dtype not in ATTN_DTYPES:
        raise ConfigError(f"--attn-dtype must be one of {', '.join(ATTN_DTYPES)}, not {attn_dtype}.")
    check_attn_topk(attn_topk, attn_dtype)
    if vision_dtype not in VISION_DTYPES:
        raise ConfigError(f"--vision-dtype must be one of {', '.join(VISION_DTYPES)}, not {vision_dtype}.")
    if shard_size < 1:
        raise ConfigError(f"--shard-size must be at least 1, not {shard_size}.")
    clash = sorted(set(meta) & set(CACHE_JSON_FIELDS))
    if clash:
        raise ValueError(f"builder meta may not use the writer's cache.json keys {clash}")


class CacheWriter:
    """Create or resume the cache at `path`; `add`/`reject` samples; `close` commits the rest.

    Holds CACHE/.lock for its whole life. Rank 0 updates catalog.duckdb after each commit;
    other ranks leave it alone and rank 0 calls `rebuild_catalog` once all ranks closed.
    """

    def __init__(self, path, meta: dict, *, shard_size: int = 256, attn_dtype: str = "bfloat16",
                 vision_dtype: str = "bfloat16", store_images: bool = True, background: bool = True,
                 overwrite: bool = False, rank: int = 0, vocab_size: int | None = None, attn_topk: int = 0,
                 share_vision: bool = True, attn_store: str = "maps", layer0_kit: dict | None = None,
                 skip: tuple[str, ...] = ()) -> None:
        """`layer0_kit` ({"files": {name: {"bytes", "sha256"}}}) is required with attn_store "layer0":
        the builder writes the kit's files, the writer records what they must hash to. `skip` names
        the optional targets (storage_schemas.kinds.SKIPPABLE_TARGETS) not to store."""
        _check_options(meta, attn_dtype, vision_dtype, shard_size, attn_topk)
        check_attn_store(attn_store, attn_topk)
        check_skip(skip, attn_store, attn_topk)
        if (attn_store == "layer0") != (layer0_kit is not None):
            raise ValueError("a layer0_kit goes with attn_store='layer0' and only with it")
        self.store = open_store(path)
        cache_setup.check_location(self.store, overwrite=overwrite and rank == 0)  # before creating anything
        # Shards are filled in a local staging directory: the cache itself on local disk, a
        # temporary directory for object storage (docs/cache-format.md, "Object storage").
        self.path = self.store.new_staging()
        self.rank, self.shard_size, self.store_images = rank, shard_size, store_images
        vocab_size = vocab_size or meta.get("teacher_shapes", {}).get("vocab_size")
        id_dtype = "uint16" if vocab_size and vocab_size <= UINT16_VOCAB else "uint32"
        self.storage = {"attn_dtype": attn_dtype, "vision_dtype": vision_dtype, "logit_id_dtype": id_dtype,
                        "shard_size": shard_size, "store_images": store_images, "attn_topk": attn_topk,
                        "share_vision": share_vision, "attn_store": attn_store, "skip": sorted(set(skip))}
        if layer0_kit is not None:
            self.storage["layer0_kit"] = layer0_kit
        self.encodings = {k: spec.get("encoding") or self.storage[spec["option"]]
                          for k, spec in ARRAY_SPECS.items()}
        if attn_store == "layer0":  # the shard says so itself: its attn array holds nothing
            self.encodings["attn"] = ATTN_RECOMPUTED
        self.encodings = skipped_encodings(self.encodings, skip)  # and so do a skipped target's arrays
        self._lock = CacheLock(self.path, rank).acquire()
        try:
            self.existing_meta = cache_setup.open_or_create(self.store, meta, self.storage, rank=rank,
                                                            overwrite=overwrite)
            (self.path / SHARDS_DIR).mkdir(exist_ok=True)
            cache_setup.clean_temp_dirs(self.path, rank)
            self.done_rows, holders = cache_setup.read_committed(self.store)
            self._next_index = cache_setup.first_free_index(self.store, rank)
            # samples holding vision tokens that later samples with the same images point at
            self._vision_holders = holders if share_vision else {}
        except BaseException:
            self._release()
            raise
        self._shard: ShardInProgress | None = None
        self._failed_shard: ShardInProgress | None = None
        self._catalog_stale = False
        self._closed = False
        self._work = WriteThread(self._handle, self._finish, background)

    # ---------------------------------------------------------------- public API
    def add(self, rec: SampleRecord) -> None:
        self._work.raise_pending()
        check_record(rec)
        vision_from = self._vision_holder_of(rec)
        # encoding starts now on the pool; the writer thread takes the results in order
        encoded = self._work.encode(encode_sample, rec, self.encodings, self.storage["attn_topk"], vision_from)
        self._submit(("add", (rec, vision_from, encoded)))

    def _vision_holder_of(self, rec: SampleRecord) -> str:
        """The earlier sample that holds the vision tokens of the same images, or "" when this
        one stores its own (and becomes the holder). Shards commit in order, so a holder is
        always committed no later than the samples that point at it."""
        key = vision_key(rec.image_sha256, rec.image_n_vision, rec.vision.shape[1]) \
            if self.storage["share_vision"] else None
        if key is None:
            return ""
        holder = self._vision_holders.setdefault(key, rec.sample_id)
        return "" if holder == rec.sample_id else holder

    def reject(self, sample_id: str, manifest_row: int, reason: str, message: str, *,
               record_id: str = "", source: str = "") -> None:
        self._work.raise_pending()
        self._submit(("reject", {"sample_id": sample_id, "manifest_row": int(manifest_row),
                                 "record_id": record_id or sample_id, "source": source,
                                 "reason": reason, "message": message}))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._work.close()
            if self._work.error is not None:
                if self._shard is not None:
                    self._shard.discard()
                raise self._work.error
        finally:
            self._release()

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _release(self) -> None:
        self._lock.release()
        self.store.drop_staging(self.path)

    # ---------------------------------------------------------------- the work (writer thread)
    def _submit(self, item) -> None:
        if self._closed:
            raise RuntimeError("CacheWriter is closed")
        self._work.submit(item)

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
        return CacheWriteError(f"cannot write {name} of cache {self.store} ({describe_os_error(exc).rstrip('.')}); "
                               "nothing of it was kept, and rerunning the same command resumes after the last "
                               "committed shard.")

    def _handle_item(self, item) -> None:
        op, payload = item
        if self._shard is None:
            self._shard = ShardInProgress(self.store, self.path, self._next_index, self.rank, self.encodings)
            self._next_index += 1
        if op == "add":
            rec, vision_from, encoded = payload
            encoded = encoded.result() if encoded is not None else \
                encode_sample(rec, self.encodings, self.storage["attn_topk"], vision_from)
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
            raise CacheWriteError(f"catalog.duckdb of cache {self.store} could not be rebuilt "
                                  f"({str(exc).splitlines()[0]}); rerunning the same command rebuilds it.") from None

    def _finish_shards(self) -> None:
        if self._shard is not None and (self._shard.rows or self._shard.rejects):
            self._commit()
        elif self._shard is not None:
            self._shard.discard()
        if self._catalog_stale and self.rank == 0:
            from alignkd.cache.catalog import rebuild_catalog

            rebuild_catalog(self.store)

    def _commit(self) -> None:
        import duckdb

        from alignkd.cache.catalog import record_shard

        shard, self._shard = self._shard, None
        self._failed_shard = shard  # until it is published: what _write_failed discards
        doc = shard.commit()
        self._failed_shard = None
        if self.rank != 0:
            return
        try:
            record_shard(self.store, doc)  # nothing on object storage: `cache sql` builds it in memory
        except duckdb.Error:  # e.g. a client holds the catalog open, a full disk; the shards are the truth
            self._catalog_stale = True  # rebuilt on close, which says why in one sentence if it fails again
