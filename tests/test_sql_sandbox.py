"""`cache sql` is a sandbox: one SELECT over the cache's own tables, and no other file.

Each refusal must be one sentence through the CLI (exit 1, no traceback) and a
SQLRefusedError through the Python API, and must leave the cache unchanged.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from alignkd.cache.catalog import SQLRefusedError, run_sql
from alignkd.cli import main
from test_cache_storage import tree_digest, write_cache


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
