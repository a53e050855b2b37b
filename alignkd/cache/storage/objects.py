"""The cache on object storage (s3://, any fsspec URL): ranged GETs, batched per sample, and
uploads with the committing file last. The only module that imports fsspec."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from alignkd.cache.storage.base import CacheStore

READ_CACHE_ENV = "ALIGNKD_READ_CACHE"


class ObjectFile:
    """An object read by ranged GETs (or, through filecache, from a local copy)."""

    def __init__(self, fs, path: str, name: str) -> None:
        self.fs, self.path = fs, path
        try:
            self._size = self.fs.size(self.path)
        except FileNotFoundError:
            raise FileNotFoundError(name) from None

    def size(self) -> int:
        return self._size

    def pread(self, n: int, offset: int) -> bytes:
        return self.fs.cat_file(self.path, start=offset, end=offset + n)

    def pread_into(self, buffer: memoryview, offset: int) -> int:
        data = self.pread(len(buffer), offset)
        buffer[:len(data)] = data
        return len(data)

    def will_need(self) -> None:
        """Nothing to ask: an object has no read-ahead."""

    def close(self) -> None:
        """Nothing held open between GETs."""


class ObjectStore(CacheStore):
    """A prefix on an fsspec filesystem. The filesystem is made per process (fsspec clients are
    not fork-safe) and never pickled, so a reader may be handed to DataLoader workers."""

    place = "prefix"
    batched_reads = True  # ~ms per GET: a sample's ranges go in one concurrent batch

    def __init__(self, url: str) -> None:
        import fsspec

        self.url = url.rstrip("/")
        # listings must not be cached: a writer and a reader in one process see each other's shards
        fs, path = fsspec.core.url_to_fs(self.url, use_listings_cache=False)
        self.protocol = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
        self.options = dict(fs.storage_options)
        self.path = path.rstrip("/")
        self.name = self.path.rsplit("/", 1)[-1]
        self._fs, self._pid = fs, os.getpid()

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"ObjectStore({self.url!r})"

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fs": None, "_pid": None}

    @property
    def fs(self):
        if self._fs is None or self._pid != os.getpid():
            import fsspec

            self._fs, self._pid = fsspec.filesystem(self.protocol, **self.options), os.getpid()
        return self._fs

    def _read_fs(self):
        """The filesystem that tensor and Parquet bytes are read from: a local filecache over the
        store when ALIGNKD_READ_CACHE names a directory."""
        cache_dir = os.environ.get(READ_CACHE_ENV)
        if not cache_dir:
            return self.fs
        import fsspec

        return fsspec.filesystem("filecache", target_protocol=self.protocol, target_options=self.options,
                                 cache_storage=cache_dir)

    def _key(self, rel: str) -> str:
        return f"{self.path}/{rel}".rstrip("/") if rel else self.path

    def sub(self, rel: str) -> "ObjectStore":
        child = object.__new__(ObjectStore)
        child.__dict__.update(self.__dict__)
        child.url, child.path = f"{self.url}/{rel}".rstrip("/"), self._key(rel)
        child.name = child.path.rsplit("/", 1)[-1]
        return child

    def absolute(self, rel: str = "") -> str:
        return f"{self.url}/{rel}" if rel else self.url

    def is_file(self, rel: str) -> bool:
        return self.fs.isfile(self._key(rel))

    def is_dir(self, rel: str = "") -> bool:
        return self.fs.isdir(self._key(rel))

    def list(self, rel: str = "") -> list[str]:
        key = self._key(rel)
        try:
            entries = self.fs.ls(key, detail=False)
        except FileNotFoundError:
            return []
        return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != key})

    def file_sizes(self, rel: str = "") -> dict[str, int]:
        base = self._key(rel)
        found = {k[len(base) + 1:]: int(v["size"]) for k, v in self.fs.find(base, detail=True).items()
                 if k.startswith(f"{base}/") and not k.endswith("/")}
        return {r: found[r] for r in sorted(found, key=lambda r: r.split("/"))}

    def tree_bytes(self, rel: str = "") -> int:
        try:
            return int(self.fs.du(self._key(rel)))
        except FileNotFoundError:
            return 0

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self._key(rel))

    def open(self, rel: str):
        return self.fs.open(self._key(rel), "rb")

    def read_parquet(self, rel: str, columns=None):
        import pyarrow.parquet as pq

        return pq.read_table(self._key(rel), columns=columns, filesystem=self._read_fs())

    def parquet_file(self, rel: str):
        import pyarrow.parquet as pq

        return pq.ParquetFile(self._read_fs().open(self._key(rel), "rb"))

    def open_ranged(self, rel: str) -> ObjectFile:
        return ObjectFile(self._read_fs(), self._key(rel), self.name_of(rel))

    def read_spans(self, handles: list, spans: list[tuple[int, int]]) -> list[bytes]:
        if not handles:
            return []
        return handles[0].fs.cat_ranges([h.path for h in handles], [a for a, _ in spans], [b for _, b in spans])

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.fs.pipe_file(self._key(rel), data)  # one PUT: atomic

    def remove(self, rel: str) -> None:
        key = self._key(rel)
        if self.fs.exists(key):
            self.fs.rm(key, recursive=True)

    def new_staging(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="alignkd-stage-"))

    def drop_staging(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def publish_dir(self, staged: Path, rel: str, last: str | None = None) -> None:
        self.remove(rel)  # objects of an upload killed before its `last` file: not part of the cache
        files = sorted(p.relative_to(staged).as_posix() for p in Path(staged).rglob("*") if p.is_file())
        for name in [f for f in files if f != last] + ([last] if last in files else []):
            self.fs.put_file(str(Path(staged) / name), f"{self._key(rel)}/{name}")
        shutil.rmtree(staged, ignore_errors=True)

    @contextmanager
    def local_copy(self, rel: str) -> Iterator[Path | None]:
        if not self.is_dir(rel):
            yield None
            return
        with tempfile.TemporaryDirectory() as tmp:
            self.fs.get(self._key(rel) + "/", tmp, recursive=True)
            yield Path(tmp)

    def register_with(self, con) -> None:
        con.register_filesystem(self.fs)  # the Parquet is read through fsspec, not the httpfs extension
