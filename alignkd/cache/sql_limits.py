"""How much `cache sql` may take: memory, time and threads, and the ways a query is stopped.

DuckDB left to itself takes 80 % of the machine's memory and every core, and a query such
as `count(*) FROM range(10000000000)` runs for hours and ignores Ctrl-C. `run_sql` gives
each connection a memory limit (DuckDB's `memory_limit`, set before the sandbox locks the
configuration, so no query can raise it; there is no spill directory either), at most
half the cores, and a deadline: a timer thread calls `con.interrupt()` when the query runs
past it, and so does a SIGINT handler while the query runs. Each way of stopping ends in
one sentence naming the limit (`SQLLimitError`).
"""

from __future__ import annotations

import math
import os
import re
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

from alignkd.errors import AlignKDError, ConfigError

DEFAULT_MEMORY = "25%"
DEFAULT_TIMEOUT_S = 60.0
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class SQLLimitError(AlignKDError):
    """A query stopped by --timeout, --memory-limit or Ctrl-C."""


def machine_memory() -> int:
    """Bytes of memory this process may use: the machine's, or its cgroup's limit when lower."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        return min(total, int(limit)) if limit.isdigit() else total
    except OSError:
        return total


def parse_memory_limit(text: str) -> int:
    """"4GB", "512MiB" or "25%" (of `machine_memory`) -> bytes; units as DuckDB reads them."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*(%|[kmgt]?i?b)\s*", str(text), flags=re.I)
    if not found or found.group(2).lower() not in UNITS | {"%": 0}:
        raise ConfigError(f"--memory-limit {text!r} must be a size such as 4GB, 512MiB or 25% "
                          f"(of this machine's memory).")
    number, unit = float(found.group(1)), found.group(2).lower()
    if unit == "%":
        if not 0 < number <= 100:
            raise ConfigError(f"--memory-limit {text!r} must be a share of memory above 0% and at most 100%.")
        return int(machine_memory() * number / 100)
    size = int(number * UNITS[unit])
    if size < 2**20:
        raise ConfigError(f"--memory-limit {text!r} is below 1MiB, too little for DuckDB to run any query.")
    return size


def default_threads() -> int:
    """Half the cores this process may use (at least 1, at most 8): a query should not starve
    a build or a training run beside it, and past 8 threads these scans gain little."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, min(8, cores // 2))


def describe_size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


@dataclass(frozen=True)
class SQLLimits:
    """What one `run_sql` query may use; `timeout_s=None` for the library's own summaries
    (`cache stats`, a build's closing line), which must not fail on a large cache."""

    memory: str = DEFAULT_MEMORY  # as --memory-limit takes it: "4GB", "512MiB", "25%"
    timeout_s: float | None = DEFAULT_TIMEOUT_S
    threads: int = field(default_factory=default_threads)

    def __post_init__(self) -> None:
        parse_memory_limit(self.memory)
        if self.timeout_s is not None and not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ConfigError(f"--timeout {self.timeout_s:g} must be a finite number of seconds above 0.")
        if self.threads < 1:
            raise ConfigError(f"threads {self.threads} must be at least 1.")

    @property
    def memory_bytes(self) -> int:
        return parse_memory_limit(self.memory)

    def duckdb_config(self) -> dict:
        return {"memory_limit": f"{self.memory_bytes}B", "threads": self.threads}

    def memory_sentence(self, cache, detail: str) -> str:
        shown = self.memory if not self.memory.strip().endswith("%") else \
            f"{self.memory.strip()} ({describe_size(self.memory_bytes)})"
        return (f"the query on {cache} needed more than --memory-limit {shown} "
                f"({detail}); narrow it (a WHERE, fewer columns, a LIMIT) or raise --memory-limit.")

    def timeout_sentence(self, cache) -> str:
        return (f"the query on {cache} ran past --timeout {self.timeout_s:g} s and was stopped; "
                f"narrow it (a WHERE or a LIMIT) or raise --timeout.")


class Stopper:
    """Interrupts a DuckDB connection and remembers why (the sentence to end with)."""

    def __init__(self, con) -> None:
        self._con = con
        self.reason: str | None = None

    def stop(self, reason: str) -> None:
        self.reason = self.reason or reason
        self._con.interrupt()

    def raise_if_stopped(self) -> None:
        """An interrupt that came between two statements is lost by DuckDB; this keeps it."""
        if self.reason is not None:
            raise SQLLimitError(self.reason)


@contextmanager
def stoppable(con, limits: SQLLimits, cache):
    """Interrupt `con` at the deadline and on Ctrl-C (SIGINT) for the duration of the block."""
    stopper = Stopper(con)
    timer = None
    if limits.timeout_s is not None:
        timer = threading.Timer(limits.timeout_s, stopper.stop, [limits.timeout_sentence(cache)])
        timer.daemon = True
        timer.start()
    previous = None
    if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
        sentence = f"the query on {cache} was stopped by Ctrl-C."
        previous = signal.signal(signal.SIGINT, lambda *_: stopper.stop(sentence))
    try:
        yield stopper
    finally:
        if timer is not None:
            timer.cancel()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
