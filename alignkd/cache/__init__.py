"""The cache stage: teacher outputs on disk, queryable, verifiable and fast to read.

Storage API (imported lazily, so importing a submodule stays light):
`CacheWriter`, `SampleRecord` (writer), `open_cache`, `CacheReader`, `CachedSample`
(reader), `run_sql`, `rebuild_catalog` (catalog), `verify_cache`, `Problem` (verify),
`open_store` (storage: the one seam between the cache and local disk or object storage).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CacheWriter": "writer", "SampleRecord": "writer",
    "open_cache": "reader", "CacheReader": "reader", "CachedSample": "reader",
    "run_sql": "catalog", "rebuild_catalog": "catalog",
    "verify_cache": "verify", "Problem": "verify",
    "CacheFormatError": "shard_format", "CacheLockedError": "lock", "open_store": "storage",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"alignkd.cache.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'alignkd.cache' has no attribute {name!r}")
