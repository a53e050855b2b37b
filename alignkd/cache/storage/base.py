"""The interface every cache store implements (see the package docstring for why there are two)."""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable

from alignkd.errors import AlignKDError
from alignkd.storage_schemas import TEMP_PREFIX


class OutsideCacheError(AlignKDError):
    """A path of a cache leads outside it (a symbolic link): a cache is refused rather than
    read through, since a hostile cache could otherwise name any file on the machine."""


class CacheStore(ABC):
    """Every file operation the cache needs, on paths relative to the store's root."""

    name: str              # the root's last component (a shard's name)
    place: str             # what such a location is called in messages: "directory" or "prefix"
    batched_reads: bool    # fetch a sample's ranges together (`read_spans`) rather than one read each

    # ------------------------------------------------------------ naming
    @abstractmethod
    def sub(self, rel: str) -> "CacheStore":
        """The store rooted at `rel` below this one."""

    @abstractmethod
    def absolute(self, rel: str = "") -> str:
        """`rel` as DuckDB and `cache stats` name it: an absolute path, or the URL."""

    def name_of(self, rel: str) -> str:
        """`rel` named for messages, under the location as the user gave it."""
        return f"{self}/{rel}" if rel else str(self)

    def local_path(self, rel: str = "") -> Path | None:
        """`rel` as a local file for tools that need one (DuckDB's database); None on object storage."""
        return None

    # ------------------------------------------------------------ staying inside the cache
    def escapes(self, rel: str = "") -> str | None:
        """Where `rel` really leads when that is outside the cache (a symbolic link), else None.
        Object storage has no links, so nothing escapes there."""
        return None

    def check_inside(self, *rels: str) -> None:
        """Refuse, in one sentence, the first of `rels` that leads outside the cache."""
        for rel in rels:
            target = self.escapes(rel)
            if target is not None:
                raise self.outside_error(rel, target)

    def check_entries_inside(self, rel: str, names: list[str], files: tuple[str, ...]) -> None:
        """`check_inside` for the directory `rel`, each `rel/name` and each `rel/name/file`."""
        self.check_inside(rel, *(f"{rel}/{n}" for n in names), *(f"{rel}/{n}/{f}" for n in names for f in files))

    def outside_error(self, rel: str, target: str) -> OutsideCacheError:
        return OutsideCacheError(f"{self.name_of(rel)} leads outside the cache (to {target}), so the cache "
                                 "is refused: alignkd reads and writes nothing outside a cache.")

    def links_outside(self) -> list[tuple[str, str]]:
        """Every (path relative to this store, target) under the store that leads outside the
        cache: what `cache verify` names. [] on object storage."""
        return []

    # ------------------------------------------------------------ listing and sizes
    @abstractmethod
    def is_file(self, rel: str) -> bool: ...

    @abstractmethod
    def is_dir(self, rel: str = "") -> bool: ...

    @abstractmethod
    def list(self, rel: str = "") -> list[str]:
        """Names of the entries directly under `rel`, sorted; [] when there is none."""

    @abstractmethod
    def file_sizes(self, rel: str = "") -> dict[str, int]:
        """Every file under `rel` (as a path relative to `rel`, in path order) -> its bytes: one
        listing, where a size per file would be one request per file on object storage."""

    @abstractmethod
    def tree_bytes(self, rel: str = "") -> int:
        """Bytes of the file `rel`, or of every file under it; 0 when absent."""

    # ------------------------------------------------------------ reads
    @abstractmethod
    def read_bytes(self, rel: str) -> bytes: ...

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    @abstractmethod
    def open(self, rel: str):
        """A binary stream over `rel`, for reading it whole in blocks (checksums)."""

    @abstractmethod
    def read_parquet(self, rel: str, columns=None): ...

    @abstractmethod
    def parquet_file(self, rel: str):
        """A `pyarrow.parquet.ParquetFile` for reading row groups on demand."""

    @abstractmethod
    def open_ranged(self, rel: str):
        """A handle for positional reads: `size()`, `pread(n, offset)`, `pread_into(buffer, offset)`,
        `will_need()`, `close()`. FileNotFoundError names the file."""

    @abstractmethod
    def read_spans(self, handles: list, spans: list[tuple[int, int]]) -> list[bytes]:
        """The [start, end) byte range of each handle, fetched together."""

    # ------------------------------------------------------------ writes
    @abstractmethod
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole file atomically: readers see the old file or the new one."""

    @abstractmethod
    def remove(self, rel: str) -> None:
        """Delete the file or the tree at `rel`, if there is one."""

    @abstractmethod
    def new_staging(self) -> Path:
        """The local directory in which new directories for this store are filled."""

    def drop_staging(self, staging: Path) -> None:
        """Forget a staging directory from `new_staging` (whatever is still in it is not the cache's)."""

    @abstractmethod
    def publish_dir(self, staged: Path, rel: str, last: str | None = None) -> None:
        """Move the finished local directory `staged` (under `new_staging()`) to `rel`, so that
        readers see all of it or none: `last` (relative to `staged`) lands after every other file."""

    def write_dir(self, rel: str, fill: Callable[[Path], None]) -> None:
        """Create the directory `rel` whole, unless it exists: `fill(local_dir)` writes its files,
        then they are published."""
        if self.is_dir(rel):
            return
        staging = self.new_staging()
        staged = staging / f"{TEMP_PREFIX}{rel}"
        try:
            if staged.is_symlink():  # never filled through a link
                staged.unlink()
            shutil.rmtree(staged, ignore_errors=True)  # left by a build killed while filling it
            staged.mkdir(parents=True)
            fill(staged)
            self.publish_dir(staged, rel)
        finally:
            self.drop_staging(staging)

    @abstractmethod
    def local_copy(self, rel: str):
        """Context manager: a local directory holding the files under `rel` (None when there is
        no such directory), for libraries that only read local directories (tokenizers)."""

    def register_with(self, con) -> None:
        """Let the DuckDB connection `con` read this store's files by `absolute` name."""
