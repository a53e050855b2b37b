"""Where a cache lives: a local directory, or a URL on object storage (s3://bucket/prefix) via fsspec.

Remote caches are reached through `universal_pathlib` paths, so the code that walks a
cache (`committed_shards`, `load_cache_json`, verify, stats) uses one pathlib-style API
for both. S3 endpoint and credentials come from the standard AWS environment
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`), read by botocore.

Byte reads of tensor files go through `open_for_read`: an OS file descriptor locally (one
`pread` per sample and array), a `RemoteFile` on object storage (one ranged GET per
sample and array). With `ALIGNKD_READ_CACHE=DIR` set, remote files are first copied into
DIR by fsspec's `filecache` and read locally from then on: repeated epochs read the
object store once.
"""

from __future__ import annotations

import os
from pathlib import Path

READ_CACHE_ENV = "ALIGNKD_READ_CACHE"


def is_remote(path) -> bool:
    """True for fsspec URLs (s3://, memory://, ...); plain paths and file:// are local."""
    s = str(path)
    return "://" in s and not s.startswith("file://") or getattr(path, "protocol", "") not in ("", "file", "local")


def cache_path(path):
    """A pathlib-style path for a cache location: `Path` locally, a `UPath` for a URL."""
    if isinstance(path, Path) and not is_remote(path):
        return path
    if not is_remote(path):
        return Path(str(path).removeprefix("file://"))
    if not isinstance(path, str):
        return path
    from upath import UPath

    # listings must not be cached: a writer and a reader in one process see each other's shards
    return UPath(path, use_listings_cache=False)


def display(path) -> str:
    """How a location is named in messages and stats: absolute for local paths, the URL otherwise."""
    return str(path) if is_remote(path) else str(Path(path).resolve())


def filesystem(path):
    """The fsspec filesystem of a remote location (None for local ones)."""
    return cache_path(path).fs if is_remote(path) else None


def _read_fs(path):
    """The filesystem to read bytes from: the remote one, or a local filecache over it."""
    fs = filesystem(path)
    cache_dir = os.environ.get(READ_CACHE_ENV)
    if cache_dir and fs is not None:
        import fsspec

        return fsspec.filesystem("filecache", target_protocol=fs.protocol[0] if isinstance(fs.protocol, tuple)
                                 else fs.protocol, target_options=fs.storage_options, cache_storage=cache_dir)
    return fs


def _fs_path(path) -> str:
    return cache_path(path).path


class RemoteFile:
    """`pread` over an object: one ranged GET per call (or a local read through filecache)."""

    def __init__(self, path) -> None:
        self.fs, self.path = _read_fs(path), _fs_path(path)
        try:
            self.size = self.fs.size(self.path)
        except FileNotFoundError:
            raise FileNotFoundError(str(path)) from None

    def pread(self, n: int, offset: int) -> bytes:
        return self.fs.cat_file(self.path, start=offset, end=offset + n)


def fetch_spans(handles: list, spans: list[tuple[int, int]]) -> list[bytes]:
    """Byte ranges of several remote files in one concurrent request batch (s3fs `cat_ranges`)."""
    if not handles:
        return []
    fs = handles[0].fs
    return fs.cat_ranges([h.path for h in handles], [a for a, _ in spans], [b for _, b in spans])


def open_for_read(path):
    """An int file descriptor for a local file, a `RemoteFile` for an object."""
    return RemoteFile(path) if is_remote(path) else os.open(path, os.O_RDONLY)


def close_handle(handle) -> None:
    if isinstance(handle, int):
        os.close(handle)


def pread(handle, n: int, offset: int) -> bytes:
    return os.pread(handle, n, offset) if isinstance(handle, int) else handle.pread(n, offset)


def handle_size(handle) -> int:
    return os.fstat(handle).st_size if isinstance(handle, int) else handle.size


def read_parquet(path, columns=None):
    import pyarrow.parquet as pq

    if not is_remote(path):
        return pq.read_table(path, columns=columns)
    return pq.read_table(_fs_path(path), columns=columns, filesystem=_read_fs(path))


def parquet_file(path):
    import pyarrow.parquet as pq

    if not is_remote(path):
        return pq.ParquetFile(path)
    return pq.ParquetFile(_read_fs(path).open(_fs_path(path), "rb"))


def upload_dir(local: Path, remote, last: str | None = None) -> None:
    """Put every file under `local` to `remote`, the file named `last` (relative) after all others."""
    fs = filesystem(remote)
    root = _fs_path(remote)
    files = sorted(p for p in Path(local).rglob("*") if p.is_file())
    rels = [p.relative_to(local).as_posix() for p in files]
    order = [r for r in rels if r != last] + ([last] if last in rels else [])
    for rel in order:
        fs.put_file(str(Path(local) / rel), f"{root}/{rel}")


def remove_tree(path) -> None:
    """Delete a remote prefix (objects left by an upload that never reached its shard.json)."""
    fs = filesystem(path)
    p = _fs_path(path)
    if fs.exists(p):
        fs.rm(p, recursive=True)


def tree_bytes(path) -> int:
    if is_remote(path):
        return int(filesystem(path).du(_fs_path(path)))
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
