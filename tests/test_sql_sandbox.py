"""`cache sql` is a sandbox: one SELECT over the cache's own tables, and no other file.

Each refusal must be one sentence through the CLI (exit 1, no traceback) and a
SQLRefusedError through the Python API, and must leave the cache unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from alignkd.cache.catalog import SQLRefusedError, run_sql
from alignkd.cache.writer import CacheWriter
from alignkd.cli import main
from test_cache_storage import META, make_record, tree_digest, write_cache

CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


@pytest.fixture(scope="module")
def sandboxed(tmp_path_factory):
    root = tmp_path_factory.mktemp("sandbox")
    write_cache(root / "cache", rejects=(7,))
    outside = root / "outside.parquet"
    pq.write_table(pa.table({"secret": ["leaked"]}), outside)
    (root / "secret.txt").write_text("leaked\n")
    return root / "cache", root


# (query template, what the refusal must name); {root} is a directory beside the cache
REFUSED = [
    ("SELECT * FROM read_csv('{root}/secret.txt')", "secret.txt"),
    ("SELECT * FROM read_csv('/etc/passwd')", "/etc/passwd"),
    ("SELECT * FROM read_text('{root}/secret.txt')", "secret.txt"),
    ("SELECT * FROM read_blob('{root}/secret.txt')", "secret.txt"),
    ("SELECT * FROM glob('{root}/*')", "{root}/*"),
    ("SELECT * FROM read_parquet('{root}/outside.parquet')", "outside.parquet"),
    ("SELECT * FROM '{root}/outside.parquet'", "outside.parquet"),
    ("SELECT * FROM read_parquet('{cache}/shards/../../outside.parquet')", "outside.parquet"),
    ("SELECT * FROM read_text('{cache}/cache.json')", "cache.json"),
    ("SELECT * FROM read_text('file:///etc/hostname')", "/etc/hostname"),
    ("ATTACH '{root}/other.duckdb' AS o", "ATTACH"),
    ("COPY (SELECT * FROM samples) TO '{root}/leak.csv'", "COPY"),
    ("INSTALL httpfs", "LOAD"),
    ("LOAD httpfs", "LOAD"),
    ("SET enable_external_access = true", "SET"),
    ("SET allowed_directories = ['/']", "SET"),
    ("RESET lock_configuration", "SET"),
    ("PRAGMA enable_profiling", "PRAGMA"),
    ("SELECT 1; SELECT * FROM read_text('/etc/passwd')", "SELECT, SELECT"),
    ("SELECT count(*) FROM samples; DROP TABLE shards", "SELECT, DROP"),
]


def _query(template: str, cache, root) -> str:
    return template.format(cache=cache, root=root)


@pytest.mark.parametrize("template,named", REFUSED, ids=[q for q, _ in REFUSED])
def test_sql_refuses_python_and_cli(sandboxed, template, named):
    cache, root = sandboxed
    query, named = _query(template, cache, root), _query(named, cache, root)
    before = tree_digest(root)
    with pytest.raises(SQLRefusedError) as err:
        run_sql(cache, query)
    message = str(err.value)
    assert named in message and "leaked" not in message and "\n" not in message
    result = CliRunner().invoke(main, ["cache", "sql", str(cache), query])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip() == f"error: {message}"
    assert tree_digest(root) == before  # nothing written, nothing leaked into a new file


def test_sql_still_answers_over_the_cache(sandboxed):
    cache, _ = sandboxed
    assert run_sql(cache, "SELECT count(*) AS n FROM samples").to_pylist() == [{"n": 5}]
    assert run_sql(cache, "SELECT sample_id FROM rejects").to_pylist() == [{"sample_id": "bad7"}]
    got = run_sql(cache, "SELECT sum(n_samples) AS n, sum(n_rejects) AS r FROM shards").to_pylist()
    assert got == [{"n": 5, "r": 1}]
    joined = run_sql(cache, "SELECT count(*) AS n FROM samples s JOIN shards h "
                            "ON s.manifest_row BETWEEN h.min_manifest_row AND h.max_manifest_row")
    assert joined.to_pylist() == [{"n": 5}]
    result = CliRunner().invoke(main, ["cache", "sql", str(cache), "SELECT count(*) AS n FROM samples",
                                       "--format", "csv"])
    assert result.exit_code == 0 and result.output.split() == ['"n"', "5"]


# ---------------------------------------------------------------- paths are paths
SIBLINGS = {"c1": 3, "c*": 5, "run[1]": 4, "run1": 2}  # cache name -> samples


@pytest.fixture(scope="module")
def siblings(tmp_path_factory):
    root = tmp_path_factory.mktemp("siblings")
    for name, n in SIBLINGS.items():
        write_cache(root / name, n=n)
    return root


@pytest.mark.parametrize("name", SIBLINGS)
def test_glob_characters_in_a_cache_path_are_plain_characters(siblings, name):
    """`c*` must not read c1's shards, `run[1]` must find its own (not "No files found")."""
    cache, n = siblings / name, SIBLINGS[name]
    assert run_sql(cache, "SELECT count(*) AS n FROM samples").to_pylist() == [{"n": n}]
    assert run_sql(cache, "SELECT count(*) AS n FROM rejects").to_pylist() == [{"n": 0}]
    stats = CliRunner().invoke(main, ["cache", "stats", str(cache), "--json"])
    assert stats.exit_code == 0, stats.output
    assert json.loads(stats.output)["samples"] == n
    # the cache's path written as a glob by the user still cannot reach the sibling it matches
    own_files = f"SELECT count(*) AS n FROM read_parquet('{cache}/shards/*/samples.parquet')"
    sibling = {"c*": "c1", "run[1]": "run1"}.get(name)
    if sibling is None:
        assert run_sql(cache, own_files).to_pylist() == [{"n": n}]
    else:
        with pytest.raises(SQLRefusedError, match=re.escape(f"so {siblings}/{sibling}/shards/shard-0000")):
            run_sql(cache, own_files)


def test_escaped_twin_directory_is_refused(tmp_path):
    """A directory literally named like the escaped path (`c[*]` beside `c*`) would pass
    DuckDB's file check too, so the query is refused rather than confined loosely."""
    write_cache(tmp_path / "c*", n=1)
    (tmp_path / "c[*]" / "shards").mkdir(parents=True)
    with pytest.raises(SQLRefusedError) as err:
        run_sql(tmp_path / "c*", "SELECT count(*) FROM samples")
    assert str(err.value) == (f"cache sql cannot confine a query to {tmp_path}/c*/shards/: {tmp_path}/c[*]/shards/ "
                              f"exists beside it and would be readable as well; rename one of the two.")


# ---------------------------------------------------------------- what the answers show
def test_settings_name_no_host_path(sandboxed):
    cache, _ = sandboxed
    settings = run_sql(cache, "SELECT name, value FROM duckdb_settings()").to_pylist()
    home = str(Path.home())
    assert [s for s in settings if s["value"] and home in s["value"]] == []
    # every absolute path a setting names is the cache's own or under the made-up home
    paths = {s["name"]: re.findall(r"(?<![\w.])/[^\s,\]]*", s["value"] or "") for s in settings}
    assert {name: found for name, found in paths.items() if found} == {
        "allowed_directories": [f"{cache}/shards/"],
        "home_directory": ["/nonexistent-alignkd-sql-home"],
        "secret_directory": ["/nonexistent-alignkd-sql-home/.duckdb/stored_secrets"]}
    assert run_sql(cache, "SELECT count(*) AS n FROM duckdb_secrets()").to_pylist() == [{"n": 0}]
    with pytest.raises(SQLRefusedError) as err:  # it lists an extension directory: a made-up one
        run_sql(cache, "SELECT * FROM duckdb_extensions()")
    assert home not in str(err.value) and "/nonexistent-alignkd-sql-home/" in str(err.value)


def test_csv_writes_lists_and_structs_as_json(sandboxed):
    cache, _ = sandboxed
    query = ("SELECT sample_id, text_positions, image_bytes, {'k': n_text, 'v': [1.5]} AS s, "
             "map(['a'], [1]) AS m FROM samples WHERE manifest_row = 0")
    result = CliRunner().invoke(main, ["cache", "sql", str(cache), query, "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        '"sample_id","text_positions","image_bytes","s","m"',
        '"s000","[34, 35, 36, 37, 38, 39]","[""<4 bytes>""]","{""k"": 6, ""v"": [1.5]}","[[""a"", 1]]"']


EVIL = "evil\x1b]0;pwned\x07\x1b[2J\u202eid"


@pytest.fixture(scope="module")
def evil_cache(tmp_path_factory):
    """A cache whose sample id and reject id hold a terminal title sequence, a screen clear
    and a right-to-left override, as a hostile manifest could give them."""
    path = tmp_path_factory.mktemp("evil") / "cache"
    with CacheWriter(path, META, shard_size=2) as writer:
        writer.add(dataclasses.replace(make_record(0), sample_id=EVIL))
        writer.reject(EVIL + "-r", 1, "too_long", f"sample {EVIL}-r is longer than 2048 tokens")
    return path


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_control_characters_never_reach_the_terminal(evil_cache, fmt):
    for table in ("samples", "rejects"):
        query = f"SELECT sample_id{', message' if table == 'rejects' else ''} FROM {table}"
        result = CliRunner().invoke(main, ["cache", "sql", str(evil_cache), query, "--format", fmt])
        assert result.exit_code == 0, result.output
        assert not CONTROL.search(result.output.replace("\n", "")), repr(result.output)
        shown = r"\u001b]0;pwned\u0007\u001b[2J\u202eid" if fmt == "json" else r"\x1b]0;pwned\x07\x1b[2J\u202eid"
        assert f"evil{shown}" in result.output
    if fmt == "table":
        assert result.output.splitlines()[2].startswith(r"evil\x1b]0;pwned\x07\x1b[2J\u202eid-r  sample evil")


def test_depth_refusal_suggests_what_a_user_can_do(sandboxed):
    cache, _ = sandboxed
    with pytest.raises(SQLRefusedError) as err:
        run_sql(cache, "SELECT " + "1 + " * 1200 + "1")
    assert str(err.value) == (
        "the query does not parse: it nests expressions deeper than DuckDB's limit of 1000, which cache sql "
        "cannot raise; flatten it (x IN (1, 2, 3) rather than a chain of ORs, list_sum([...]) rather than "
        "a chain of +, or one CTE per step).")
    assert "SET" not in str(err.value)
