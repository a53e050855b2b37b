"""Several record sources as one dataset, and the unique key of every record.

LLaVA-OneVision and LLaVA-NeXT train on a YAML list of sources, each sampled its own way:

    datasets:
      - json_path: coco/llava_v1_5_mix665k.json
        sampling_strategy: all            # or first:30%, end:10%, random:50%, first:1000, ...
        images: /data/coco                # alignkd's key: this source's image root (default --images)
      - json_path: ocr/ocr_vqa.parquet

`alignkd cache build --data mix.yaml` reads that file (paths relative to it); `--data a.json
--images A --data b.parquet --images B` says the same on the command line. Rows are numbered
0.. over the sampled records, source after source, so resume, `--limit` and torchrun's split
mean what they mean for one file. Sampling is deterministic: `random:` draws with
`--seed` and the source's name, and the plan lands in the cache's build options.

Keys. LLaVA-665K's ids are image ids: one COCO image asked about in several conversations
repeats its id, and a mixture repeats ids across sources. Every record is kept: the first
occurrence of an id keeps it as its `sample_id`, the k-th gets `ID#k` (made longer if that
string is itself some record's id), and the original id stays in the `record_id` column.
Every rank reads every id (a key depends on the rows before it) as Arrow strings and keeps
only its share (`share`, `alignkd.data.row_ids`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from alignkd.data.errors import ManifestError
from alignkd.data.manifest import ManifestRecord
from alignkd.data.row_ids import IdColumn, RankRows, RowId, assign_keys, row_mask, unique_keys
from alignkd.data.sources import open_source

__all__ = ["MixedSource", "SourceSpec", "assign_keys", "source_specs"]

YAML_SUFFIXES = (".yaml", ".yml")
STRATEGIES = ("all", "first", "end", "random")


@dataclass(frozen=True)
class SourceSpec:
    """One source of a mixture: its name (the `source` column), where it is, its image root."""

    name: str
    path: str
    images: str | None = None
    strategy: str = "all"

    def describe(self) -> dict:
        return {"name": self.name, "path": str(self.path), "images": self.images, "sampling": self.strategy}


def source_specs(data, images) -> list[SourceSpec]:
    """The sources `--data` (one value or several; a YAML mixture) and `--images` name.

    `--images` given once applies to every source; given as often as `--data`, pairs up in order.
    """
    data = [data] if isinstance(data, (str, Path)) else list(data)
    images = [] if images is None else [images] if isinstance(images, (str, Path)) else list(images)
    if len(images) > 1 and len(images) != len(data):
        raise ManifestError(f"--images is given {len(images)} times for {len(data)} --data sources; give it once "
                            "(one root for all) or once per --data, in the same order.")
    roots = images if len(images) == len(data) else images * len(data) if images else [None] * len(data)
    specs = []
    for value, root in zip(data, roots):
        if Path(value).suffix.lower() in YAML_SUFFIXES:
            specs += read_mixture_yaml(Path(value), root)
        else:
            specs.append(SourceSpec(str(value), str(value), None if root is None else str(root)))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ManifestError(f"--data names the source {next(n for n in names if names.count(n) > 1)} twice.")
    return specs


def read_mixture_yaml(path: Path, default_images: str | None) -> list[SourceSpec]:
    import yaml

    if not path.is_file():
        raise ManifestError(f"mixture {path} does not exist.")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ManifestError(f"mixture {path} is not valid YAML ({str(err).splitlines()[0]}).") from None
    entries = doc.get("datasets") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ManifestError(f"mixture {path} needs a non-empty 'datasets:' list of {{json_path, sampling_strategy}}.")
    specs = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("json_path"), str):
            raise ManifestError(f"mixture {path} entry {i} has no 'json_path'.")
        strategy = str(entry.get("sampling_strategy", "all"))
        parse_strategy(strategy, f"mixture {path} entry {i}")
        images = entry.get("images", entry.get("image_folder"))
        images = str(path.parent / images) if images is not None else default_images
        specs.append(SourceSpec(entry["json_path"], str(path.parent / entry["json_path"]), images, strategy))
    return specs


def parse_strategy(strategy: str, where: str) -> tuple[str, float | None, int | None]:
    """("first"|"end"|"random"|"all", fraction, count): `first:30%` or `first:1000`."""
    kind, _, amount = strategy.partition(":")
    if kind not in STRATEGIES or (kind == "all") != (amount == ""):
        raise ManifestError(f"{where} has sampling_strategy {strategy!r}; expected all, first:N, end:N or "
                            "random:N (N a count or a percentage like 30%).")
    if kind == "all":
        return kind, None, None
    try:
        if amount.endswith("%"):
            fraction = float(amount[:-1]) / 100
            if not 0 < fraction <= 1:
                raise ValueError
            return kind, fraction, None
        count = int(amount)
        if count < 1:
            raise ValueError
        return kind, None, count
    except ValueError:
        raise ManifestError(f"{where} has sampling_strategy {strategy!r}: N must be a positive count or a "
                            "percentage in (0%, 100%].") from None


def sample_rows(spec: SourceSpec, n: int, seed: int) -> np.ndarray:
    """The local rows of a source of `n` records its strategy keeps, in file order."""
    kind, fraction, count = parse_strategy(spec.strategy, f"source {spec.name}")
    if kind == "all":
        return np.arange(n)
    take = min(n, count if count is not None else math.ceil(fraction * n))  # LLaVA-NeXT rounds up
    if kind == "first":
        return np.arange(take)
    if kind == "end":
        return np.arange(n - take, n)
    return np.sort(np.array(random.Random(f"{seed}:{spec.name}").sample(range(n), take), dtype=np.int64))


class MixedSource:
    """Sources read one after another as one numbered list of records; see the module docstring."""

    def __init__(self, specs: list[SourceSpec], seed: int = 0) -> None:
        self.specs = specs
        self.seed = seed
        self._parts = [open_source(spec.path) for spec in specs]
        self._kept: list[np.ndarray] | None = None  # per source: the local rows kept, in order
        self.counts: list[tuple[int, int]] = []    # per source: (records, kept)

    @property
    def ignored_columns(self) -> list[str]:
        return sorted({c for part in self._parts for c in getattr(part, "ignored_columns", [])})

    def ids(self) -> IdColumn:
        """The id of every kept record, global row by global row (sources sampled)."""
        columns, self._kept, self.counts = [], [], []
        for spec, part in zip(self.specs, self._parts):
            local = part.ids()
            kept = sample_rows(spec, len(local), self.seed)
            columns.append(local if spec.strategy == "all" else local.take(kept))
            self._kept.append(kept)
            self.counts.append((len(local), len(kept)))
        return IdColumn.concat(columns)

    def index(self) -> list[RowId]:
        """Every kept record's global row, unique key and original id (small mixtures, tests)."""
        col = self.ids()
        return col.rows(unique_keys(col))

    def share(self, rank: int = 0, world_size: int = 1, limit: int | None = None) -> RankRows:
        """The rows a rank builds (`row % world_size == rank`, within `limit`), with their keys."""
        col = self.ids()
        keys = unique_keys(col)
        rows = np.arange(rank, min(len(col), limit or len(col)), world_size, dtype=np.int64)
        return RankRows(rows, col.ids.take(pa.array(rows)).combine_chunks(), keys.take(pa.array(rows)))

    def records(self, rows=None, key=None) -> Iterator[ManifestRecord]:
        """The records at these global rows (a set or an ascending array; None: all), in order,
        with `key(row)` as `sample_id` (None: the id), their source and their images root."""
        if self._kept is None:
            self.ids()
        mask, offset = row_mask(rows), 0
        for spec, part, kept in zip(self.specs, self._parts, self._kept):
            local = kept if mask is None else kept[np.flatnonzero(mask[offset:offset + len(kept)])]
            if len(local):
                for rec in part.records(local):
                    g = offset + int(np.searchsorted(kept, rec.row))  # kept is ascending
                    yield replace(rec, row=g, sample_id=key(g) if key else rec.sample_id, record_id=rec.sample_id,
                                  source=spec.name, images_root=spec.images)
            offset += len(kept)

    def source_name(self, row: int) -> str:
        """The name of the source global row `row` came from."""
        ends = np.cumsum([kept for _, kept in self.counts])
        return self.specs[int(np.searchsorted(ends, row, side="right"))].name

    def has_image_column(self, spec: SourceSpec) -> bool:
        """Whether a source keeps images inside the data (a Parquet image column)."""
        return bool(getattr(self._parts[self.specs.index(spec)], "image_column", None))

    def plan(self) -> list[dict]:
        """What each source contributed, for the cache's build options."""
        return [{**spec.describe(), "records": n, "kept": k} for spec, (n, k) in zip(self.specs, self.counts)]

