"""One build per cache: an exclusive `fcntl.flock` on CACHE/.lock, refused with the holder's pid.

flock is released by the kernel when the holding process dies, so a SIGKILLed build
never leaves a stale lock behind; the pid written into the file is only for the message.
Each torchrun rank locks its own file (`.lock-r{rank}`), so the ranks of one build do not
refuse each other while two builds of the same rank still do.

`build_in_progress` tells a reader (`cache verify`) that a build holds the cache, by trying
a shared lock on each lock file for an instant. A build starting in that instant would
see the lock taken, so `acquire` tries again for a moment before it refuses.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from alignkd.errors import AlignKDError
from alignkd.storage_schemas import LOCK_FILE

ACQUIRE_TRIES = 10  # x 20 ms: outlasts a reader's probe, never a running build


class CacheLockedError(AlignKDError):
    """Another process is building into the same cache."""


class CacheLock:
    def __init__(self, cache: Path, rank: int = 0) -> None:
        self.cache = Path(cache)
        self.path = self.cache / (LOCK_FILE if rank == 0 else f"{LOCK_FILE}-r{rank}")
        self.fd: int | None = None

    def acquire(self) -> "CacheLock":
        try:  # O_NOFOLLOW: a lock file that is a link would have us truncate whatever it leads to
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            if not self.path.is_symlink():
                raise
            raise CacheLockedError(f"{self.path} is a symbolic link, not a lock file, so the cache is refused: "
                                   "alignkd writes nothing outside a cache.") from exc
        for attempt in range(ACQUIRE_TRIES):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt + 1 < ACQUIRE_TRIES:
                    time.sleep(0.02)
        else:
            pid = _pid_in(fd)
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


def _pid_in(fd: int) -> str:
    return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"


def build_in_progress(cache: Path) -> str | None:
    """The pid(s) of the build holding the local cache directory `cache`, or None when no
    build holds it (a build killed by any signal holds nothing: the kernel dropped its lock)."""
    holders = []
    try:
        names = sorted(n for n in os.listdir(cache) if n == LOCK_FILE or n.startswith(f"{LOCK_FILE}-r"))
    except OSError:
        return None
    for name in names:
        try:
            fd = os.open(Path(cache) / name, os.O_RDONLY | os.O_NOFOLLOW)  # never creates a lock file
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            holders.append(_pid_in(fd))
        finally:
            os.close(fd)
    return ", ".join(holders) or None
