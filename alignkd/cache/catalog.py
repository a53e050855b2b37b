"""The DuckDB catalog: an index over the shards, never the truth.

`catalog.duckdb` holds a `shards` table (one row per committed shard, copied from its
shard.json) and two views, `samples` and `rejects`, over the shards' Parquet files by an
absolute glob (`shards/shard-*/...`, which never matches the `.tmp-` directories of
in-flight shards). A cache with no shard yet gets typed empty views, so queries never
fail on an empty cache. The writer opens the file read-write only for the moment of a
commit, because a read-write holder blocks every reader.

`run_sql` does not open catalog.duckdb at all: it builds the same tables and views in an
in-memory connection from the shard directories where they are *now* (so a moved or
copied cache still answers, and a running build never blocks a query), and it accepts
exactly one SELECT statement. Anything else (INSERT, CREATE, COPY, ATTACH, SET, ...)
is refused before it runs, so the cache cannot change.

A SELECT can still call DuckDB's table functions (read_csv, read_text, glob, ...), so the
connection is also sandboxed once the views exist: `allowed_directories` is the cache's
shards directory only, external access is off (no other file, no URL, no extension) and
the configuration is locked, so no later statement can lift it. On object storage the
store registers its filesystem on the connection before the views are made
(`CacheStore.register_with`), and `sandbox_roots` is the URL prefix of its shards.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import duckdb
import pyarrow as pa

from alignkd.cache.shard_format import committed_shards, load_cache_json, read_shard_json
from alignkd.cache.storage import CacheStore, open_store
from alignkd.errors import AlignKDError
from alignkd.storage_schemas import (CATALOG_FILE, REJECT_SCHEMA, REJECTS_FILE, SAMPLE_SCHEMA,
                                     SAMPLES_FILE, SHARDS_DIR, SHARDS_TABLE_SCHEMA)


class SQLRefusedError(AlignKDError):
    """A query that would write, or that DuckDB cannot run."""


def shard_row(info: dict) -> dict:
    """The `shards` table row of one shard.json document."""
    rows = info["manifest_rows"]
    return {"name": info["name"], "rank": info["rank"], "shard_index": info["index"],
            "n_samples": info["n_samples"], "n_rejects": info["n_rejects"],
            "bytes": sum(f["bytes"] for f in info["files"]),
            "min_manifest_row": rows["min"], "max_manifest_row": rows["max"],
            "committed_at": info["committed_at"]}


def shards_table(cache) -> pa.Table:
    rows = [shard_row(read_shard_json(d)) for d in committed_shards(cache)]
    return pa.Table.from_pylist(rows, schema=SHARDS_TABLE_SCHEMA)


def _view_sql(con, cache: CacheStore, file_name: str, schema: pa.Schema, have_shards: bool) -> str:
    if have_shards:
        # an absolute path, or a URL glob that DuckDB resolves through the store's registered filesystem
        glob = f"{cache.absolute(SHARDS_DIR)}/shard-*/{file_name}".replace("'", "''")
        return f"SELECT * FROM read_parquet('{glob}')"
    types = con.from_arrow(schema.empty_table()).dtypes
    cols = ", ".join(f'CAST(NULL AS {t}) AS "{f.name}"' for f, t in zip(schema, types))
    return f"SELECT {cols} WHERE false"


def _create_views(con, cache: CacheStore, have_shards: bool) -> None:
    for view, file_name, schema in (("samples", SAMPLES_FILE, SAMPLE_SCHEMA),
                                    ("rejects", REJECTS_FILE, REJECT_SCHEMA)):
        con.execute(f"CREATE OR REPLACE VIEW {view} AS {_view_sql(con, cache, file_name, schema, have_shards)}")


def _populate(con, cache: CacheStore, table: pa.Table) -> None:
    con.register("shard_rows", table)
    con.execute("CREATE TABLE shards AS SELECT * FROM shard_rows")
    con.unregister("shard_rows")
    _create_views(con, cache, table.num_rows > 0)


def rebuild_catalog(cache) -> Path | None:
    """Recreate catalog.duckdb from the shard directories (atomically replaced).

    Caches on object storage have no catalog.duckdb (a DuckDB file cannot be updated in
    place there); `run_sql` builds the same tables in memory for every cache."""
    store = open_store(cache)
    target = store.local_path(CATALOG_FILE)
    if target is None:
        return None
    tmp = target.with_name(f"{CATALOG_FILE}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    con = duckdb.connect(str(tmp))
    try:
        _populate(con, store, shards_table(store))
    finally:
        con.close()
    # A process killed while writing the old catalog leaves its WAL behind, and DuckDB
    # refuses to open the new file next to it ("WAL does not match database file").
    Path(f"{target}.wal").unlink(missing_ok=True)
    os.replace(tmp, target)
    return target


def record_shard(cache, info: dict) -> None:
    """Add one freshly committed shard to catalog.duckdb (held read-write only briefly);
    nothing on object storage, which has no catalog.duckdb."""
    cache = open_store(cache)
    target = cache.local_path(CATALOG_FILE)
    if target is None:
        return
    con = duckdb.connect(str(target))
    try:
        con.execute("DELETE FROM shards WHERE name = ?", [info["name"]])
        con.register("shard_rows", pa.Table.from_pylist([shard_row(info)], schema=SHARDS_TABLE_SCHEMA))
        con.execute("INSERT INTO shards SELECT * FROM shard_rows")
        con.unregister("shard_rows")
        _create_views(con, cache, True)
    finally:
        con.close()


def catalog_shards(cache) -> pa.Table:
    """The `shards` table as catalog.duckdb has it, opened read-only."""
    con = duckdb.connect(str(open_store(cache).local_path(CATALOG_FILE)), read_only=True)
    try:
        return con.sql("SELECT * FROM shards ORDER BY name").to_arrow_table()
    finally:
        con.close()


def run_sql(cache, query: str) -> pa.Table:
    """Run one read-only SELECT over `samples`, `rejects` and `shards`; refuse anything else."""
    cache = open_store(cache)
    load_cache_json(cache)  # names a path that is not a cache (or of another version)
    _check_one_select(cache, query)
    con = duckdb.connect(":memory:", config={"temp_directory": ""})  # no spill dir to allow
    cache.register_with(con)  # before the lock: object storage is read through its own filesystem
    try:
        _populate(con, cache, shards_table(cache))
        sandbox(con, sandbox_roots(cache))
        return con.sql(query).to_arrow_table()
    except duckdb.PermissionException as exc:
        raise SQLRefusedError(_refusal(cache, exc)) from None
    except duckdb.Error as exc:
        raise SQLRefusedError(f"the query failed on {cache}: {_first_line(exc)}.") from None
    finally:
        con.close()


def _check_one_select(cache: CacheStore, query: str) -> None:
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as exc:
        raise SQLRefusedError(f"the query does not parse: {_first_line(exc)}.") from None
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        kinds = ", ".join(s.type.name for s in statements) or "empty"
        raise SQLRefusedError(
            f"alignkd cache sql is read-only and runs exactly one SELECT, so this {kinds} "
            f"statement was refused and {cache} is unchanged.")


def sandbox_roots(cache) -> list[str]:
    """The directories a query may read: the cache's shards (a URL prefix on object storage)."""
    return [open_store(cache).absolute(SHARDS_DIR) + "/"]


def sandbox(con, roots: list[str]) -> None:
    """Confine `con` to `roots`: must run after the views exist (creating them reads files)."""
    listed = ", ".join("'" + r.replace("'", "''") + "'" for r in roots)
    con.execute(f"SET allowed_directories = [{listed}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def _refusal(cache: CacheStore, exc: Exception) -> str:
    named = re.search(r'(?:file|directory) "([^"]*)"', str(exc))
    what = f"{named.group(1)} was refused" if named else f"this was refused ({_first_line(exc)})"
    return (f"alignkd cache sql reads only the samples, rejects and shards of {cache}, "
            f"so {what}.")


def _first_line(exc: Exception) -> str:
    """DuckDB's first line without its closing '!' or '.', so the caller ends the sentence."""
    return str(exc).strip().splitlines()[0].rstrip("!. ")
