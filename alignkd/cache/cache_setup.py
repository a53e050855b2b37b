"""Opening a cache for writing: create it, or resume it.

A new cache gets cache.json before anything else (atomically: a temporary name and a
rename, or one PUT), so any later entry belongs to a real cache, and a directory or prefix
that holds anything else is refused. `--overwrite` deletes only what alignkd writes
(`own_files`), and only once cache.json names the alignkd format: a user's files beside a
cache stay byte for byte. A resumed cache must store the same encodings; the
resumed writer deletes its own rank's stale temp shard directories (a shard that was in
flight when a build died) and skips `done_rows`, the manifest rows of every committed
samples.parquet and rejects.parquet.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from alignkd.cache.sample_encoding import vision_key
from alignkd.cache.shard_commit import now
from alignkd.cache.shard_format import CacheFormatError, committed_shards, load_cache_json, read_parquet
from alignkd.cache.storage import CacheStore
from alignkd.errors import ConfigError
from alignkd.storage_schemas import (CACHE_JSON, CATALOG_FILE, FORMAT_NAME, REJECTS_FILE, SAMPLES_FILE,
                                     SCHEMA_VERSION, SHARDS_DIR, TEMP_PREFIX, TOKENIZER_DIR, LAYER0_KIT_DIR,
                                     OWN_ENTRIES, shard_name)

OWN_CATALOG_TEMP = re.compile(rf"{re.escape(CATALOG_FILE)}\.tmp-\d+(\.wal)?")  # rebuild_catalog's


def check_location(store: CacheStore, *, overwrite: bool) -> None:
    """Refuse a location before anything is created in it (the lock file included): a
    non-empty directory that is not an alignkd cache, a cache whose shards/ leads outside it,
    and, with --overwrite, a cache.json that is not an alignkd cache's or an --out that is a
    symbolic link. `open_or_create` asks again under the lock."""
    root = store.local_path()
    if overwrite and root is not None and root.is_symlink():
        raise ConfigError(f"--out {store} is a symbolic link (to {root.resolve()}); --overwrite deletes only in the "
                          "directory it is given, so give that directory itself.")
    store.check_inside(SHARDS_DIR, CATALOG_FILE, TOKENIZER_DIR, LAYER0_KIT_DIR)  # written (or read) by builds
    _check_existing(store, overwrite)


def _check_existing(store: CacheStore, overwrite: bool) -> list[str]:
    """The directory's visible entries, once it is known to be empty or an alignkd cache (or,
    with --overwrite, one whose cache.json at least names the alignkd format)."""
    # Hidden entries are ours (locks, .tmp- files): a build killed while creating the
    # cache leaves at most a .tmp-cache.json, and that directory still counts as empty.
    entries = [name for name in store.list() if not name.startswith(".")]
    if entries and not store.is_file(CACHE_JSON):
        raise CacheFormatError(f"{store} exists and is not an alignkd cache (no {CACHE_JSON}); "
                               f"choose an empty or new {store.place}.")
    if entries and overwrite:
        _check_format_name(store)
    return entries


def _check_format_name(store: CacheStore) -> None:
    """--overwrite deletes only from an alignkd cache: its cache.json must name the format
    (any schema version: overwriting an old cache is how it is rebuilt)."""
    try:
        doc = json.loads(store.read_text(CACHE_JSON))
        found = f"format {doc.get('format')!r}" if isinstance(doc, dict) else f"a JSON {type(doc).__name__}"
    except (OSError, ValueError) as exc:
        found, doc = f"it cannot be read: {exc}", None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise CacheFormatError(f"{store.name_of(CACHE_JSON)} does not describe an alignkd cache ({found}), so "
                               "--overwrite deleted nothing: it deletes only what alignkd wrote into a cache.")


def open_or_create(store: CacheStore, meta: dict, storage: dict, *, rank: int, overwrite: bool) -> dict | None:
    """The existing cache.json of a cache being resumed, or None after creating the cache."""
    entries = _check_existing(store, overwrite)
    if overwrite and rank == 0:
        remove_own_files(store)
    elif entries:
        existing = load_cache_json(store)
        check_storage(store, existing.get("storage", {}), storage)
        return existing
    if rank != 0:
        raise CacheFormatError(f"{store} has no {CACHE_JSON}; rank 0 must create the cache first.")
    create(store, meta, storage)
    return None


def own_files(store: CacheStore) -> list[str]:
    """What alignkd writes into a cache, relative to it: cache.json, the catalog and its WAL and
    temporary files, the tokenizer, every shard (committed or in flight) and the .tmp- files.
    The lock files are left: the build deleting the rest holds one."""
    top = [n for n in store.list() if n in OWN_ENTRIES or n.startswith(TEMP_PREFIX) or OWN_CATALOG_TEMP.fullmatch(n)]
    shards = [f"{SHARDS_DIR}/{n}" for n in store.list(SHARDS_DIR)
              if n.startswith("shard-") or n.startswith(f"{TEMP_PREFIX}shard-")]
    return [n for n in top if n != SHARDS_DIR] + shards


def remove_own_files(store: CacheStore) -> None:
    """--overwrite: delete what alignkd wrote and nothing else (a user's file beside a cache,
    or inside its shards/, stays as it was). cache.json goes last, so an overwrite killed
    midway leaves a directory that is still a cache, which the rerun can overwrite."""
    for rel in own_files(store):
        if rel != CACHE_JSON:
            store.remove(rel)
    if store.is_dir(SHARDS_DIR) and not store.list(SHARDS_DIR):
        store.remove(SHARDS_DIR)
    store.remove(CACHE_JSON)


def check_storage(store: CacheStore, stored: dict, storage: dict) -> None:
    for key in ("attn_store", "attn_dtype", "vision_dtype", "logit_id_dtype", "attn_topk", "share_vision", "skip"):
        if key in stored and stored[key] != storage[key]:
            raise ConfigError(f"cache {store} stores --{key.replace('_', '-')}={stored[key]} but this "
                              f"run asks for {storage[key]}; use the same option or pass --overwrite.")


def create(store: CacheStore, meta: dict, storage: dict) -> None:
    from alignkd import __version__
    from alignkd.cache.catalog import rebuild_catalog

    doc = {"format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, "alignkd_version": __version__,
           "created_at": now(), "storage": storage, **meta}
    store.write_bytes(CACHE_JSON, json.dumps(doc, indent=1).encode())  # first: see the module docstring
    rebuild_catalog(store)  # an empty catalog (none on object storage)


def clean_temp_dirs(staging: Path, rank: int) -> None:
    """Delete this rank's temp shard directories: shards that were in flight when a build died."""
    own = re.compile(rf"^{re.escape(TEMP_PREFIX)}{re.escape(shard_name(0, rank))[:-6]}\d{{6}}$")
    for p in (staging / SHARDS_DIR).iterdir():
        if own.match(p.name) and p.is_symlink():  # removed, never followed
            p.unlink()
        elif own.match(p.name):
            shutil.rmtree(p)


def read_committed(store: CacheStore) -> tuple[set[int], dict[tuple, str]]:
    """In one pass over the committed shards: the manifest rows done (as a sample or as a
    reject), and the samples holding their own vision tokens by `vision_key`, which a
    resumed build may point new samples at."""
    done: set[int] = set()
    holders: dict[tuple, str] = {}
    columns = ["manifest_row", "sample_id", "vision_from", "vision_dim", "image_sha256", "image_n_vision"]
    for shard in committed_shards(store):
        done.update(read_parquet(shard, REJECTS_FILE, columns=["manifest_row"]).column(0).to_pylist())
        for row in read_parquet(shard, SAMPLES_FILE, columns=columns).to_pylist():
            done.add(row["manifest_row"])
            key = vision_key(row["image_sha256"], row["image_n_vision"], row["vision_dim"])
            if key is not None and not row["vision_from"]:
                holders.setdefault(key, row["sample_id"])
    return done, holders


def first_free_index(store: CacheStore, rank: int) -> int:
    prefix = shard_name(0, rank)[:-6]
    taken = [int(shard.name[len(prefix):]) for shard in committed_shards(store)
             if shard.name.startswith(prefix) and shard.name[len(prefix):].isdigit()]
    return max(taken, default=-1) + 1
