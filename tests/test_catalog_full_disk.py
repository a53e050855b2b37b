"""catalog.duckdb on a full disk: as in test_full_disk.py, a file size limit (RLIMIT_FSIZE,
SIGXFSZ ignored) set in a forked child makes DuckDB's writes fail for real. Whether the
catalog fails when the cache is created or when a shard is committed, the writer stops
with one sentence (an AlignKDError, so the CLI prints it), no raw Python warning is
printed, no `catalog.duckdb.tmp-*` file or WAL is left, and with the space back a rebuild
gives a cache that verifies."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from alignkd.cache.catalog import rebuild_catalog, run_sql
from alignkd.cache.verify import verify_cache
from alignkd.errors import AlignKDError
from tests.support.limits import in_child_with_file_size_limit
from test_cache_storage import write_cache

# DuckDB grows its file in 256 KiB blocks: an empty catalog fits in 300 kB, one with rows does not
LIMITS = {"on_create": 200_000, "on_commit": 300_000}


def _write_under_limit(path: Path, limit: int, log: Path) -> int:
    """write_cache in a forked child under the limit; what it raised and warned goes to `log`."""
    def body() -> int:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                write_cache(path, n=3)
                error, code = None, 0
            except Exception as exc:  # noqa: BLE001 - the parent asserts what it was
                error, code = {"type": type(exc).__name__, "user_error": isinstance(exc, AlignKDError),
                               "message": str(exc)}, 1
        log.write_text(json.dumps({"error": error, "warnings": [str(w.message) for w in caught]}))
        return code

    return in_child_with_file_size_limit(body, limit, timeout_s=60)


@pytest.mark.parametrize("when", LIMITS)
def test_catalog_on_a_full_disk_is_one_sentence_and_leaves_no_temp_file(tmp_path, when):
    cache, log = tmp_path / "cache", tmp_path / "child.json"
    code = _write_under_limit(cache, LIMITS[when], log)
    report = json.loads(log.read_text())
    assert code == 1, report
    assert report["warnings"] == []
    error = report["error"]
    assert error["type"] == "CatalogWriteError" and error["user_error"], error
    temp = f"{cache}/catalog.duckdb.tmp-"
    assert error["message"].startswith(f"catalog.duckdb of cache {cache} could not be written "
                                       f"(Could not write file \"{temp}")
    assert error["message"].endswith("\": File too large); the shards are untouched, and rerunning the "
                                     "same command rebuilds it.")
    assert [p.name for p in cache.iterdir() if ".tmp-" in p.name] == []

    rebuild_catalog(cache)  # the space is back
    assert verify_cache(cache) == []
    samples = 3 if when == "on_commit" else 0  # on create, no shard was written at all
    assert run_sql(cache, "SELECT count(*) AS n FROM samples").to_pylist() == [{"n": samples}]
