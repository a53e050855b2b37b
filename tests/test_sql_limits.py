"""`cache sql` is bounded: --timeout, --memory-limit and Ctrl-C each stop a query with one
sentence naming the limit (exit 1), and no SQL can lift the limits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from alignkd.cache.catalog import SQLRefusedError, run_sql
from alignkd.cache.sql_limits import SQLLimitError, SQLLimits, default_threads
from alignkd.cli import main
from test_cache_storage import write_cache

REPO = Path(__file__).resolve().parents[1]
ENDLESS = "SELECT count(*) AS n FROM range(10000000000) WHERE hash(range) % 7 = 3"
HUNGRY = ("SELECT count(*) AS n FROM (SELECT DISTINCT a.range * 100000 + b.range "
          "FROM range(100000) a, range(100000) b)")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("limits") / "cache"
    write_cache(path, n=3)
    return path


def _sql(*args) -> tuple[int, str, float]:
    start = time.monotonic()
    result = CliRunner().invoke(main, ["cache", "sql", *map(str, args)])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.output, time.monotonic() - start


def test_timeout_stops_an_endless_query(cache):
    code, output, seconds = _sql(cache, ENDLESS, "--timeout", "2")
    assert code == 1 and seconds < 8, (output, seconds)
    assert output == (f"error: the query on {cache} ran past --timeout 2 s and was stopped; "
                      f"narrow it (a WHERE or a LIMIT) or raise --timeout.\n")


def test_memory_limit_stops_a_hungry_query(cache):
    code, output, seconds = _sql(cache, HUNGRY, "--memory-limit", "64MB")
    assert code == 1 and seconds < 30, (output, seconds)
    assert output.startswith(f"error: the query on {cache} needed more than --memory-limit 64MB (Out of Memory")
    assert output.endswith("); narrow it (a WHERE, fewer columns, a LIMIT) or raise --memory-limit.\n")
    assert output.count("\n") == 1
    with pytest.raises(SQLLimitError, match="--memory-limit 64MB"):
        run_sql(cache, HUNGRY, SQLLimits(memory="64MB"))


# A child that runs the CLI and says on stderr when its query is under way (the SIGINT
# handler is in place), so the signal below never lands during start-up.
CHILD = """
import signal, sys, threading, time
from alignkd.cli import main

def announce():
    deadline = time.monotonic() + 30
    while signal.getsignal(signal.SIGINT) is signal.default_int_handler and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    print("running", file=sys.stderr, flush=True)

threading.Thread(target=announce, daemon=True).start()
main(sys.argv[1:])
"""


def test_ctrl_c_stops_a_query_promptly(cache):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, "cache", "sql", str(cache), ENDLESS, "--timeout", "600"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stderr.readline() == "running\n"
        sent = time.monotonic()
        child.send_signal(signal.SIGINT)
        code = child.wait(timeout=20)
        seconds = time.monotonic() - sent
        rest = child.stderr.read()
    finally:
        child.kill()
        child.wait()
    assert code == 1 and seconds < 2.5, (code, seconds, rest)
    assert rest == f"error: the query on {cache} was stopped by Ctrl-C.\n"


@pytest.mark.parametrize("query", ["SET memory_limit = '100GB'", "RESET memory_limit", "SET threads = 64",
                                   "PRAGMA memory_limit = '100GB'", "SET max_expression_depth TO 100000",
                                   "SELECT 1; SET memory_limit = '100GB'"])
def test_sql_cannot_lift_the_limits(cache, query):
    with pytest.raises(SQLRefusedError, match="runs exactly one SELECT"):
        run_sql(cache, query)


def test_limits_reach_duckdb(cache):
    got = run_sql(cache, "SELECT current_setting('memory_limit') AS m, current_setting('threads') AS t",
                  SQLLimits(memory="256MiB")).to_pylist()
    assert got == [{"m": "256.0 MiB", "t": default_threads()}]
    cores = len(os.sched_getaffinity(0))
    assert 1 <= default_threads() <= max(1, cores // 2)


@pytest.mark.parametrize("option,value,message", [
    ("--timeout", "0", "--timeout 0 must be a finite number of seconds above 0."),
    ("--timeout", "nan", "--timeout nan must be a finite number of seconds above 0."),
    ("--timeout", "-5", "--timeout -5 must be a finite number of seconds above 0."),
    ("--timeout", "inf", "--timeout inf must be a finite number of seconds above 0."),
    ("--memory-limit", "12 parsecs", "--memory-limit '12 parsecs' must be a size such as 4GB, 512MiB or 25% "
                                     "(of this machine's memory)."),
    ("--memory-limit", "0%", "--memory-limit '0%' must be a share of memory above 0% and at most 100%."),
    ("--memory-limit", "100KB", "--memory-limit '100KB' is below 1MiB, too little for DuckDB to run any query."),
])
def test_bad_limits_are_one_sentence(cache, option, value, message):
    code, output, _ = _sql(cache, "SELECT 1", option, value)
    assert code == 1 and output == f"error: {message}\n"
