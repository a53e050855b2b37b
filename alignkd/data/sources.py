"""Where records come from: a JSON/JSONL manifest, or a Parquet dataset read row group by row group.

    source = open_source("train.json")            # or a .parquet file, or a directory of them
    ids = source.ids()                             # every row's id (Arrow strings) and problem: cheap
    for record in source.records(rows={0, 5}):    # ManifestRecords, in row order, streamed
        ...

Both kinds number rows 0.. in file order (a Parquet directory: its *.parquet files sorted
by name, then their rows), so resume, `--limit`, torchrun's row split, duplicate ids and
reject rows mean the same thing for every source.

**Parquet** in the layout Hugging Face datasets publish (LLaVA-OneVision, ShareGPT4V-style
exports): an `id` column; a `conversations` (LLaVA turns) or `messages` (chat) column; an
image column `image` or `images` holding one `{bytes, path}` struct, a list of them, or
null (text only). Images come from the bytes (a struct with no bytes falls back to its path
under `--images`). A dataset without an `id` column gets `FILE#ROW` ids (the file's name
and the row within it): stable across runs, never random. Only one row group is held in
memory at a time, and row groups holding no wanted row are not read at all: millions of
rows with their images stream through.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from alignkd.data.errors import ManifestError
from alignkd.data.manifest import ImageRef, ManifestRecord, iter_manifest, record_from_fields
from alignkd.data.row_ids import IdColumn, RowId, row_mask, wanted

ID_COLUMN = "id"
TURN_COLUMNS = ("conversations", "messages")
IMAGE_COLUMNS = ("image", "images")


class JsonSource:
    """A JSON list or JSONL manifest, streamed: each pass reads the file again (see
    `iter_manifest`), so a 1 GB manifest never sits in memory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._rows = None

    def __len__(self) -> int:
        if self._rows is None:
            self._rows = sum(1 for _ in iter_manifest(self.path))
        return self._rows

    def ids(self) -> IdColumn:
        col = IdColumn.gather((r.sample_id, r.problem) for r in iter_manifest(self.path))
        self._rows = len(col)
        return col

    def index(self) -> list[RowId]:
        return self.ids().rows()

    def records(self, rows=None) -> Iterator[ManifestRecord]:
        """The records at `rows` (a set or an array of rows; None: all), stopping after the last."""
        mask = row_mask(rows)
        for r in iter_manifest(self.path):
            if mask is not None and r.row >= len(mask):
                return  # --limit's slice read, not the rest of a 1 GB file
            if wanted(mask, r.row):
                yield r


class ParquetSource:
    """A Parquet file or a directory of them; see the module docstring for the layout."""

    def __init__(self, path: Path, files: list[Path] | None = None) -> None:
        import pyarrow.parquet as pq

        self.path = path
        files = files if files is not None else find_parquet_files(path)
        self._files = []
        for f in files:
            try:
                pf = pq.ParquetFile(f)
            except PermissionError:
                raise ManifestError(f"Parquet file {f} cannot be read (permission denied).") from None
            except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
                raise ManifestError(f"{f} is not a readable Parquet file ({err}).") from None
            self._files.append((f, pf))
        self._columns = self._check_columns()
        self.image_column = self._columns["image"]

    def _check_columns(self) -> dict[str, str | None]:
        names = set(self._files[0][1].schema_arrow.names)
        turns = [c for c in TURN_COLUMNS if c in names]
        if len(turns) != 1:
            raise ManifestError(f"{self._files[0][0]} needs exactly one of the columns {', '.join(TURN_COLUMNS)} "
                                f"(it has {', '.join(sorted(names))}).")
        images = [c for c in IMAGE_COLUMNS if c in names]
        if len(images) > 1:
            raise ManifestError(f"{self._files[0][0]} has both an 'image' and an 'images' column; keep one.")
        used = {turns[0], *images, *([ID_COLUMN] if ID_COLUMN in names else [])}
        for f, pf in self._files[1:]:
            if used - set(pf.schema_arrow.names) or {c for c in TURN_COLUMNS + IMAGE_COLUMNS + (ID_COLUMN,)
                                                     if c in pf.schema_arrow.names} - used:
                raise ManifestError(f"{f} does not have the columns {', '.join(sorted(used))} that "
                                    f"{self._files[0][0]} has; every file of a dataset must share them.")
        # columns alignkd does not read (LLaVA-OneVision's data_source, ...) are left unread;
        # the build says which, once
        self.ignored_columns = sorted({c for _, pf in self._files for c in pf.schema_arrow.names} - used)
        return {"turns": turns[0], "image": images[0] if images else None,
                "id": ID_COLUMN if ID_COLUMN in names else None}

    def __len__(self) -> int:
        return sum(pf.metadata.num_rows for _, pf in self._files)

    def ids(self) -> IdColumn:
        return IdColumn.gather(self._id_pairs())

    def _id_pairs(self) -> Iterator[tuple[str, str | None]]:
        row = 0
        for f, pf in self._files:
            if self._columns["id"] is None:
                yield from ((f"{f.name}#{i}", None) for i in range(pf.metadata.num_rows))
                row += pf.metadata.num_rows
                continue
            for g in range(pf.num_row_groups):  # a row group at a time: memory bounded by the group
                ids = _read_or_name(f, f"row group {g}", lambda: pf.read_row_group(g, columns=[ID_COLUMN]))
                yield from (_row_id(row + i, raw) for i, raw in enumerate(ids.column(0).to_pylist()))
                row += ids.num_rows

    def index(self) -> list[RowId]:
        return self.ids().rows()

    def records(self, rows=None) -> Iterator[ManifestRecord]:
        """Every wanted row's record (a set or an array of rows; None: all), a row group at a time."""
        mask, first = row_mask(rows), 0
        for f, pf in self._files:
            for g in range(pf.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                chosen = (range(first, first + n) if mask is None
                          else (np.flatnonzero(mask[first:first + n]) + first).tolist())
                if chosen:
                    yield from self._group_records(f, pf, g, first, chosen)
                first += n

    def _group_records(self, f: Path, pf, group: int, first: int, wanted) -> Iterator[ManifestRecord]:
        cols = [c for c in self._columns.values() if c is not None]
        # one thread: with pyarrow's column threads the peak memory varied 0.8-1.6 MB from run
        # to run on the same 4 x 256 kB file (a second group's buffers alive at once), which
        # is the bound tests/test_records.py holds the reader to
        table = _read_or_name(f, f"row group {group}",
                              lambda: pf.read_row_group(group, columns=cols, use_threads=False))
        data = {c: table.column(c) for c in cols}
        del table
        base = first - sum(pf.metadata.row_group(g).num_rows for g in range(group))  # row 0 of this file
        for row in wanted:
            i = row - first
            item = {self._columns["turns"]: data[self._columns["turns"]][i].as_py()}
            raw_id = data[ID_COLUMN][i].as_py() if self._columns["id"] else f"{f.name}#{row - base}"
            images = _image_refs(data[self._columns["image"]][i].as_py()) if self._columns["image"] else ()
            yield record_from_fields(row, raw_id, images, item)


def _read_or_name(f: Path, part: str, read):
    """`read()`, with a damaged page named by file and part instead of pyarrow's bare words."""
    try:
        return read()
    except (OSError, ValueError) as err:  # ArrowInvalid is a ValueError; IOError for a bad page
        raise ManifestError(f"{f} {part} cannot be read ({str(err).splitlines()[0]}); the file is damaged.") from None


def find_parquet_files(path: Path, config: str | None = None, split: str | None = None) -> list[Path]:
    """The .parquet files of a file, a directory, or a Hugging Face dataset repository.

    A repository keeps them in subfolders (`data/train-00000-of-00004.parquet`, or one folder
    per config); they are searched for, and a split keeps only its own files
    (`train-*.parquet`, or a `train/` folder). Several configs must be chosen between.
    """
    if not path.is_dir():
        return [path]
    root = path / config if config else path
    if config and not root.is_dir():
        raise ManifestError(f"dataset {path} has no config folder {config!r}.")
    files = sorted(p for p in root.rglob("*.parquet") if not any(part.startswith(".") for part in p.parts))
    if split:
        files = [f for f in files if f.name.split("-")[0].split(".")[0] == split or split in f.relative_to(root).parts[:-1]]
    if not files:
        what = f" for split {split!r}" if split else ""
        raise ManifestError(f"directory {root} holds no .parquet files{what}, in it or its subfolders.")
    folders = {f.relative_to(root).parts[0] for f in files if len(f.relative_to(root).parts) > 1}
    if not config and len(folders) > 1 and "data" not in folders and not any(f.parent == root for f in files):
        raise ManifestError(f"dataset {path} holds several configs ({', '.join(sorted(folders))}); "
                            "name one, e.g. --data DATASET:CONFIG.")
    return files


def _row_id(row: int, raw) -> tuple[str, str | None]:
    """(id, problem) of a row whose id column holds `raw` (the same rule as a manifest's)."""
    if isinstance(raw, bool) or not isinstance(raw, (str, int)) or str(raw) == "":
        return f"row{row}", "missing_id"
    return str(raw), None


def _image_refs(value) -> tuple[ImageRef, ...] | None:
    """`{bytes, path}` struct, a list of them, or null -> ImageRefs (None: malformed)."""
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    refs = []
    for item in items:
        if not isinstance(item, dict):
            return None
        data, path = item.get("bytes"), item.get("path")
        if data:
            refs.append(ImageRef(path=path or None, data=bytes(data)))
        elif isinstance(path, str) and path:
            refs.append(ImageRef(path=path, row_may_lack_root=True))
        else:
            return None
    return tuple(refs)


def open_source(value) -> JsonSource | ParquetSource:
    """The record source `value` names: a .parquet file or a directory of them (a Hugging
    Face dataset repository too), JSON/JSONL, or a dataset id `org/name[@rev][:config[/split]]`
    found in the local Hugging Face cache."""
    path = Path(value)
    if not path.exists():
        from alignkd.hub import parse_dataset_arg, resolve_dataset

        parsed = parse_dataset_arg(value)
        if parsed is None:
            raise ManifestError(f"manifest {path} does not exist.")
        repo_id, revision, config, split = parsed
        snapshot = resolve_dataset(value, repo_id, revision)
        return ParquetSource(snapshot, find_parquet_files(snapshot, config, split))
    if path.is_dir() or path.suffix.lower() == ".parquet":
        return ParquetSource(path)
    return JsonSource(path)
