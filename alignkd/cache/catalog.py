"""The DuckDB catalog: an index over the shards, never the truth.

`catalog.duckdb` holds a `shards` table (one row per committed shard, copied from its
shard.json) and two views, `samples` and `rejects`, over the Parquet files of exactly
those shards, each named by its absolute path with DuckDB's glob characters escaped (a
cache may live at `run[1]`; in-flight `.tmp-` shards are never listed). A cache with no
shard yet gets typed empty views, so queries never fail on an empty cache. The writer
opens the file read-write only for the moment of a commit, because a read-write holder
blocks every reader.

`run_sql` does not open catalog.duckdb at all: it builds the same tables and views in an
in-memory connection from the shard directories where they are *now* (so a moved or
copied cache still answers, and a running build never blocks a query), and it accepts
exactly one SELECT statement. Anything else (INSERT, CREATE, COPY, ATTACH, SET, ...)
is refused before it runs, so the cache cannot change.

A SELECT can still call DuckDB's table functions (read_csv, read_text, glob, ...), so the
connection is also sandboxed once the views exist: `allowed_directories` is the cache's
shards directory only, external access is off (no other file, no URL, no extension) and
the configuration is locked, so no later statement can lift it, nor the memory, thread
and time limits set before it (sql_limits.py). Settings that would name host paths (the
home, secret and extension directories) are pointed at a path that does not exist, so
`duckdb_settings()` shows nothing of the machine. On object storage the store registers
its filesystem on the connection before the views are made (`CacheStore.register_with`),
and `sandbox_roots` is the URL prefix of its shards.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import duckdb
import pyarrow as pa

from alignkd.cache.shard_format import committed_shards, load_cache_json, read_shard_json
from alignkd.cache.sql_limits import SQLLimitError, SQLLimits, stoppable
from alignkd.cache.storage import CacheStore, open_store
from alignkd.errors import AlignKDError, describe_os_error
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


def shards_table(store: CacheStore) -> pa.Table:
    rows = [shard_row(read_shard_json(d)) for d in committed_shards(store)]
    return pa.Table.from_pylist(rows, schema=SHARDS_TABLE_SCHEMA)


def glob_literal(path: str) -> str:
    """`path` as a DuckDB glob that matches only itself. DuckDB globs every path it reads, so
    a cache at `run[1]` would match nothing and one at `c*` would read its siblings too."""
    return re.sub(r"([*?\[])", r"[\1]", path)


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _view_sql(con, cache: CacheStore, file_name: str, schema: pa.Schema, shard_names: list[str]) -> str:
    if shard_names:
        # each committed shard's file by name (an absolute path, or a URL that DuckDB reads
        # through the store's registered filesystem): no directory listing, no pattern
        files = ", ".join(_sql_string(glob_literal(cache.absolute(f"{SHARDS_DIR}/{name}/{file_name}")))
                          for name in shard_names)
        return f"SELECT * FROM read_parquet([{files}])"
    types = con.from_arrow(schema.empty_table()).dtypes
    cols = ", ".join(f'CAST(NULL AS {t}) AS "{f.name}"' for f, t in zip(schema, types))
    return f"SELECT {cols} WHERE false"


def _create_views(con, cache: CacheStore) -> None:
    """`samples` and `rejects` over exactly the shards the `shards` table lists."""
    shard_names = [name for (name,) in con.execute("SELECT name FROM shards ORDER BY name").fetchall()]
    for view, file_name, schema in (("samples", SAMPLES_FILE, SAMPLE_SCHEMA),
                                    ("rejects", REJECTS_FILE, REJECT_SCHEMA)):
        con.execute(f"CREATE OR REPLACE VIEW {view} AS {_view_sql(con, cache, file_name, schema, shard_names)}")


def _populate(con, cache: CacheStore, table: pa.Table) -> None:
    con.register("shard_rows", table)
    con.execute("CREATE TABLE shards AS SELECT * FROM shard_rows")
    con.unregister("shard_rows")
    _create_views(con, cache)


class CatalogWriteError(AlignKDError):
    """catalog.duckdb could not be written (a full disk, a client holding it open)."""


def rebuild_catalog(cache) -> Path | None:
    """Recreate catalog.duckdb from the shard directories (atomically replaced; on failure
    the temporary file and its WAL are removed and a CatalogWriteError says why).

    Caches on object storage have no catalog.duckdb (a DuckDB file cannot be updated in
    place there); `run_sql` builds the same tables in memory for every cache."""
    store = open_store(cache)
    target = store.local_path(CATALOG_FILE)
    if target is None:
        return None
    tmp = target.with_name(f"{CATALOG_FILE}.tmp-{os.getpid()}")
    _remove_database(tmp)
    try:
        _write_catalog(tmp, store)
        # A process killed while writing the old catalog leaves its WAL behind, and DuckDB
        # refuses to open the new file next to it ("WAL does not match database file").
        Path(f"{target}.wal").unlink(missing_ok=True)
        os.replace(tmp, target)
    except BaseException as exc:
        _remove_database(tmp)
        if isinstance(exc, OSError):
            raise CatalogWriteError(_catalog_failed(store, describe_os_error(exc).rstrip("."))) from None
        if isinstance(exc, duckdb.Error):
            # "FATAL Error: Failed to create checkpoint because of error: Could not write file ..."
            raise CatalogWriteError(_catalog_failed(store, re.sub(r"^.*: (?=Could not)", "", _first_line(exc)))) \
                from None
        raise
    return target


def _write_catalog(path: Path, store: CacheStore) -> None:
    con = duckdb.connect(str(path))
    try:
        _populate(con, store, shards_table(store))
        # into the file now: a checkpoint that fails at close() (a full disk) is silent, and
        # would leave a file without its tables beside a WAL holding them
        con.execute("CHECKPOINT")
    finally:
        con.close()


def _remove_database(path: Path) -> None:
    for leftover in (path, Path(f"{path}.wal")):
        leftover.unlink(missing_ok=True)


def _catalog_failed(store: CacheStore, reason: str) -> str:
    return (f"catalog.duckdb of cache {store} could not be written ({reason}); the shards are "
            f"untouched, and rerunning the same command rebuilds it.")


def record_shard(cache: CacheStore, info: dict) -> None:
    """Add one freshly committed shard to catalog.duckdb (held read-write only briefly);
    nothing on object storage, which has no catalog.duckdb."""
    target = cache.local_path(CATALOG_FILE)
    if target is None:
        return
    con = duckdb.connect(str(target))
    try:
        con.execute("DELETE FROM shards WHERE name = ?", [info["name"]])
        con.register("shard_rows", pa.Table.from_pylist([shard_row(info)], schema=SHARDS_TABLE_SCHEMA))
        con.execute("INSERT INTO shards SELECT * FROM shard_rows")
        con.unregister("shard_rows")
        _create_views(con, cache)
        con.execute("CHECKPOINT")  # a failure here raises; the one in close() would be silent
    finally:
        con.close()


def catalog_shards(store: CacheStore) -> pa.Table:
    """The `shards` table as catalog.duckdb has it, opened read-only."""
    con = duckdb.connect(str(store.local_path(CATALOG_FILE)), read_only=True)
    try:
        return con.sql("SELECT * FROM shards ORDER BY name").to_arrow_table()
    finally:
        con.close()


# Set when the connection opens, before the lock: no spill directory to allow, no persistent
# secrets, and a home that does not exist, so the secret and extension directories DuckDB
# derives from it (and duckdb_settings() shows) name nothing on this machine.
SANDBOX_CONFIG = {"temp_directory": "", "allow_persistent_secrets": False,
                  "home_directory": "/nonexistent-alignkd-sql-home"}


def run_sql(cache, query: str, limits: SQLLimits | None = None) -> pa.Table:
    """Run one read-only SELECT over `samples`, `rejects` and `shards`; refuse anything else.

    `limits` bounds its memory, threads and time (default: 25 % of memory, 60 s); Ctrl-C
    stops it. A query stopped by any of them raises SQLLimitError naming the limit."""
    limits = limits or SQLLimits()
    cache = open_store(cache)
    load_cache_json(cache)  # names a path that is not a cache (or of another version)
    _check_one_select(cache, query)
    con = duckdb.connect(":memory:", config=SANDBOX_CONFIG | limits.duckdb_config())
    cache.register_with(con)  # before the lock: object storage is read through its own filesystem
    try:
        with stoppable(con, limits, cache) as stopper:
            try:
                _populate(con, cache, shards_table(cache))
                sandbox(con, sandbox_roots(cache))
                stopper.raise_if_stopped()
                return con.sql(query).to_arrow_table()
            except duckdb.InterruptException:
                stopper.raise_if_stopped()
                raise
    except duckdb.OutOfMemoryException as exc:
        raise SQLLimitError(limits.memory_sentence(cache, _first_line(exc))) from None
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
        raise SQLRefusedError(f"the query does not parse: {_parse_failure(exc)}.") from None
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        kinds = ", ".join(s.type.name for s in statements) or "empty"
        raise SQLRefusedError(
            f"alignkd cache sql is read-only and runs exactly one SELECT, so this {kinds} "
            f"statement was refused and {cache} is unchanged.")


def sandbox_roots(store: CacheStore) -> list[str]:
    """The directories a query may read: the cache's shards (a URL prefix on object storage).

    DuckDB checks a path before it globs it and each file the glob matched, so a root with
    glob characters is allowed both as the views write it (escaped) and as it is."""
    root = store.absolute(SHARDS_DIR) + "/"
    escaped = glob_literal(root)
    if escaped == root:
        return [root]
    if store.local_path() is not None and os.path.lexists(escaped):
        # a directory literally named like the escaped root would pass the files' check too
        raise SQLRefusedError(f"cache sql cannot confine a query to {root}: {escaped} exists beside it "
                              f"and would be readable as well; rename one of the two.")
    return [root, escaped]


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


def _parse_failure(exc: Exception) -> str:
    """DuckDB's words, but for its depth limit, whose advice (SET max_expression_depth) the
    sandbox refuses: say what the user can change instead."""
    words = _first_line(exc)
    if "max_expression_depth" not in words:
        return words
    depth = re.search(r"limit of (\d+)", words)
    return (f"it nests expressions deeper than DuckDB's limit{f' of {depth.group(1)}' if depth else ''}, "
            f"which cache sql cannot raise; flatten it (x IN (1, 2, 3) rather than a chain of ORs, "
            f"list_sum([...]) rather than a chain of +, or one CTE per step)")


def _first_line(exc: Exception) -> str:
    """DuckDB's first line without its closing '!' or '.', so the caller ends the sentence."""
    return str(exc).strip().splitlines()[0].rstrip("!. ")
