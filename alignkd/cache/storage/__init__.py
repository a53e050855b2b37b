"""Where a cache's bytes live: the one storage seam (objects.py is the only module that imports fsspec).

A cache is a local directory or a prefix on object storage (`s3://bucket/prefix`, through
fsspec/s3fs). Every byte alignkd reads from or writes to a cache goes through the
`CacheStore` that `open_store(location)` returns, so no other module asks where the cache
lives. A store speaks in paths relative to its root (`"shards/shard-000000/shard.json"`),
and `sub(rel)` is a store rooted below, so a shard is handed around the same way on either.

`base.CacheStore` is the interface, `local.LocalStore` and `objects.ObjectStore` its two
implementations. They differ only where the medium does (docs/cache-format.md, "Object storage"):

- **Positional reads.** `LocalStore` hands out OS file descriptors: one `pread` per sample
  and array, and a run of raw chunks goes with one `os.preadv` straight into the caller's
  array, no copy. An object costs a ~ms round trip per ranged GET, so `ObjectStore` sets
  `batched_reads` and a reader fetches all of a sample's ranges in one concurrent batch
  (`read_spans`: s3fs `cat_ranges`). With `ALIGNKD_READ_CACHE=DIR`, objects are read
  through fsspec's `filecache` in DIR, so later epochs read local copies.
- **Writes.** A new directory (a shard, the tokenizer) is filled in a local staging
  directory, then published: locally the staging directory *is* the cache directory and
  publishing is a rename; on object storage, which has no rename, the files are uploaded
  with the one named `last` (shard.json) after all others, so its presence is the commit.
  A single file is written atomically: temporary name, fsync, rename; or one PUT.
- **DuckDB.** catalog.duckdb must be a local file (`local_path`), so object storage has
  none, and `cache sql` reads the Parquet through the fsspec filesystem registered on the
  connection (`register_with`).

- **Staying inside.** A local cache may be reached through a symbolic link, but nothing in it
  may lead outside it: every file a `LocalStore` opens, lists or writes is resolved and
  refused (`OutsideCacheError`, one sentence) when it lands outside the cache's real root,
  so a hostile cache (`shards -> /`) cannot make a reader, `cache sql` or a build touch
  another file. `links_outside` lists such links for `cache verify`.

S3 endpoint and credentials come from the standard AWS environment (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`), read by botocore.
"""

from __future__ import annotations

import os
from pathlib import Path

from alignkd.cache.storage.base import CacheStore, OutsideCacheError
from alignkd.cache.storage.local import LocalFile, LocalStore, fsync_dir, write_durable
from alignkd.cache.storage.objects import READ_CACHE_ENV, ObjectFile, ObjectStore

__all__ = ["CacheStore", "LocalFile", "LocalStore", "ObjectFile", "ObjectStore", "OutsideCacheError", "READ_CACHE_ENV",
           "check_local_dir", "fsync_dir", "is_object_url", "open_store", "write_durable"]


def is_object_url(location) -> bool:
    """Whether a location names object storage (an fsspec URL other than file://), not a local path."""
    text = os.fspath(location) if isinstance(location, os.PathLike) else str(location)
    return "://" in text and not text.startswith("file://")


def open_store(location) -> "CacheStore":
    """The store of a cache location: a local path (or file:// URL), or any other fsspec URL.

    A command opens its cache once and hands the store down: the entry points (`CacheWriter`,
    `open_cache`, `run_sql`, `verify_cache`, `cache_stats`, `rebuild_catalog`, ...) take a
    location or a store (a store is returned as it is), the functions below them a store."""
    if isinstance(location, CacheStore):
        return location
    if is_object_url(location):
        return ObjectStore(str(location))
    text = os.fspath(location) if isinstance(location, os.PathLike) else str(location)
    return LocalStore(Path(text.removeprefix("file://")))


def check_local_dir(location, what: str) -> None:
    """A local location must be an existing directory (one sentence otherwise); a URL is
    checked when it is opened, since listing a bucket is not free."""
    from alignkd.errors import check_dir

    if not is_object_url(location):
        check_dir(str(location).removeprefix("file://"), what)
