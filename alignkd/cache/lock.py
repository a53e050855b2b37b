"""One build per cache: an exclusive `fcntl.flock` on CACHE/.lock, refused with the holder's pid.

flock is released by the kernel when the holding process dies, so a SIGKILLed build
never leaves a stale lock behind; the pid written into the file is only for the message.
Each torchrun rank locks its own file (`.lock-r{rank}`), so the ranks of one build do not
refuse each other while two builds of the same rank still do.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from alignkd.errors import AlignKDError
from alignkd.storage_schemas import LOCK_FILE


class CacheLockedError(AlignKDError):
    """Another process is building into the same cache."""


class CacheLock:
    def __init__(self, cache: Path, rank: int = 0) -> None:
        self.cache = Path(cache)
        self.path = self.cache / (LOCK_FILE if rank == 0 else f"{LOCK_FILE}-r{rank}")
        self.fd: int | None = None

    def acquire(self) -> "CacheLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CacheLockedError(f"cache {self.cache} is locked by another build (pid {pid}).") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
