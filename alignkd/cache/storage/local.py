"""The cache on local disk: file descriptors, preadv into the caller's arrays, rename to publish."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from alignkd.cache.storage.base import CacheStore
from alignkd.storage_schemas import TEMP_PREFIX


def write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalFile:
    """An OS file descriptor: `pread` per range, `pread_into` with `os.preadv` into the caller's memory."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def pread(self, n: int, offset: int) -> bytes:
        return os.pread(self.fd, n, offset)

    def pread_into(self, buffer: memoryview, offset: int) -> int:
        return os.preadv(self.fd, [buffer], offset)

    def will_need(self) -> None:
        """Ask the OS to read the whole file ahead (a shard read in order)."""
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        os.close(self.fd)


class LocalStore(CacheStore):
    place = "directory"
    batched_reads = False  # a pread is a syscall, not a round trip

    def __init__(self, root: Path, jail: str | None = None) -> None:
        self.root = Path(root)
        self.name = self.root.name
        # the cache's real root, inherited by `sub` stores: nothing read or written through
        # this store may resolve outside it (resolved on first use: a new cache is made later)
        self.jail = jail

    def __str__(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def sub(self, rel: str) -> "LocalStore":
        return LocalStore(self.root / rel, self._jail())

    # ------------------------------------------------------------ staying inside the cache
    def _jail(self) -> str:
        if self.jail is None:
            self.jail = os.path.realpath(self.root)
        return self.jail

    def escapes(self, rel: str = "") -> str | None:
        real = os.path.realpath(self.root / rel)
        return None if self._inside(real) else real

    def _inside(self, real: str) -> bool:
        jail = self._jail()
        return real == jail or real.startswith(jail.rstrip(os.sep) + os.sep)

    def check_entries_inside(self, rel: str, names: list[str], files: tuple[str, ...]) -> None:
        # An entry that is no link, in a directory inside the cache, is inside: one lstat each
        # rather than a full resolution (a cache's ~2,600 shards x 4 entries at every open).
        self.check_inside(rel)
        for name in names:
            entry = f"{rel}/{name}"
            if os.path.islink(self.root / entry):
                self.check_inside(entry)
            for rel_file in (f"{entry}/{f}" for f in files):
                if os.path.islink(self.root / rel_file):
                    self.check_inside(rel_file)

    def _open_fd(self, rel: str) -> int:
        """A read-only descriptor on `rel`, refused when the file opened lies outside the cache.
        The kernel names the file a descriptor holds (/proc/self/fd): one call, where resolving
        the path costs one per component; a shard's ~22 files took 3.3 ms that way and 0.45 ms
        this way (BENCHMARKS.md), and a uniform order reopens shards often."""
        path = self.root / rel
        fd = os.open(path, os.O_RDONLY)
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # no /proc (not Linux)
            real = os.path.realpath(path)
        if not self._inside(real):
            os.close(fd)
            raise self.outside_error(rel, real)
        return fd

    def _path(self, rel: str) -> Path:
        """`rel` as a path to open, refused when it leads outside the cache."""
        self.check_inside(rel)
        return self.root / rel

    def links_outside(self) -> list[tuple[str, str]]:
        found = []
        for parent, dirs, files in os.walk(self.root):  # links are listed, never followed
            for name in dirs + files:
                path = Path(parent) / name
                target = self.escapes(path.relative_to(self.root)) if path.is_symlink() else None
                if target is not None:
                    found.append((path.relative_to(self.root).as_posix(), target))
        return sorted(found)

    def absolute(self, rel: str = "") -> str:
        return str(self.root.resolve() / rel)

    def local_path(self, rel: str = "") -> Path:
        return self.root / rel

    def is_file(self, rel: str) -> bool:
        return (self.root / rel).is_file()

    def is_dir(self, rel: str = "") -> bool:
        return (self.root / rel).is_dir()

    def list(self, rel: str = "") -> list[str]:
        try:
            return sorted(p.name for p in self._path(rel).iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def file_sizes(self, rel: str = "") -> dict[str, int]:
        base = self._path(rel)
        files = sorted((p for p in base.rglob("*") if p.is_file()), key=lambda p: p.relative_to(base).parts)
        return {p.relative_to(base).as_posix(): self._path(p.relative_to(self.root)).stat().st_size for p in files}

    def tree_bytes(self, rel: str = "") -> int:
        path = self._path(rel)
        if path.is_file():
            return path.stat().st_size
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

    def read_bytes(self, rel: str) -> bytes:
        with os.fdopen(self._open_fd(rel), "rb") as f:
            return f.read()

    def open(self, rel: str):
        return os.fdopen(self._open_fd(rel), "rb")

    def read_parquet(self, rel: str, columns=None):
        import pyarrow.parquet as pq

        return pq.read_table(self._path(rel), columns=columns)

    def parquet_file(self, rel: str):
        import pyarrow.parquet as pq

        return pq.ParquetFile(self._path(rel))

    def open_ranged(self, rel: str) -> LocalFile:
        return LocalFile(self._open_fd(rel))

    def read_spans(self, handles: list, spans: list[tuple[int, int]]) -> list[bytes]:
        return [h.pread(end - start, start) for h, (start, end) in zip(handles, spans)]

    def write_bytes(self, rel: str, data: bytes) -> None:
        target = self._path(rel)
        tmp = target.with_name(f"{TEMP_PREFIX}{target.name}")
        tmp.unlink(missing_ok=True)  # a link there is removed, never written through
        write_durable(tmp, data)
        os.rename(tmp, target)
        fsync_dir(target.parent)

    def remove(self, rel: str) -> None:
        self.check_inside(Path(rel).parent.as_posix())  # a link itself is removed, never what it leads to
        path = self.root / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    def new_staging(self) -> Path:
        # inside the cache, so that publishing is a rename on one filesystem
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root

    def publish_dir(self, staged: Path, rel: str, last: str | None = None) -> None:
        self.check_inside(Path(rel).parent.as_posix())
        final = self.root / rel
        os.rename(staged, final)  # atomic: `last` needs no order of its own
        fsync_dir(final.parent)

    @contextmanager
    def local_copy(self, rel: str) -> Iterator[Path | None]:
        path = self._path(rel)
        yield path if path.is_dir() else None
