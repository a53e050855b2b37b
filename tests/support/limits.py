"""A full disk without filling one: code run in a child whose files may not grow past a limit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def in_child_with_file_size_limit(body, limit: int, timeout_s: float = 300.0) -> int:
    """Run `body()` in a forked child whose files may not grow past `limit` bytes, and return
    the child's exit code (body's return value, 99 if it raised).

    RLIMIT_FSIZE with SIGXFSZ ignored makes a write past the limit fail with EFBIG, as a full
    disk fails it, without filling a real disk. A child still running after `timeout_s` is
    killed and fails the test: code that hangs on a failed write must not stall the suite.
    """
    import resource
    import signal
    import time

    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
            code = body()
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"the child hung for {timeout_s:.0f} s after its writes were limited to {limit} bytes a file")


def invoke_cli_with_file_size_limit(args: list, log: Path, limit: int) -> int:
    """The CLI in such a child; its output (and any exception that escaped click) goes to `log`."""
    from click.testing import CliRunner

    from alignkd.cli import main

    def body() -> int:
        result = CliRunner().invoke(main, [str(a) for a in args])
        log.write_text(result.output + ("" if isinstance(result.exception, (SystemExit, type(None)))
                                        else f"escaped: {result.exception!r}"))
        return result.exit_code

    return in_child_with_file_size_limit(body, limit)
