"""The ids of a source's rows as Arrow strings, the unique key of every row, a rank's share.

A build plans all of its rows before the teacher runs: every rank reads every id (a
repeated id's key depends on the rows before it, whichever rank they fall to), then keeps
only its own share. As Python objects (a RowId a row, a keyed copy of the list, sets and
dicts of ids) that peaked at ~450 bytes a row, +300 MB per torchrun rank for LLaVA-665K;
an Arrow string array costs the id's characters plus 4 bytes, keys are found with a
vectorised sort, and the peak is ~105 bytes a row (BENCHMARKS.md, "Planning LLaVA-665K").

Keys: an id's first record keeps it, its k-th becomes `ID#k`, made longer by "#" while
that string is some record's id or another key. A row with a `problem` (a made-up `rowN`
id, a malformed record) gets no key: it is that row's reject.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

CHUNK_ROWS = 4096  # ids gathered as Python strings before they become one Arrow chunk (fewer: less fragmentation)


@dataclass(frozen=True, slots=True)
class RowId:
    """One row as a list entry: its row, its key (or id), its problem and the id as written."""

    row: int
    sample_id: str
    problem: str | None = None
    record_id: str | None = None  # the id as written, once sample_id is a unique key


@dataclass
class IdColumn:
    """Row i's id is `ids[i]`; `problems` maps the few rows with a problem to it."""

    ids: pa.ChunkedArray
    problems: dict[int, str] = field(default_factory=dict)

    @classmethod
    def gather(cls, pairs: Iterable[tuple[str, str | None]]) -> "IdColumn":
        """From (id, problem) pairs in row order, a chunk of Python strings at a time."""
        chunks, pending, problems = [], [], {}
        for row, (sample_id, problem) in enumerate(pairs):
            pending.append(sample_id)
            if problem is not None:
                problems[row] = problem
            if len(pending) == CHUNK_ROWS:
                chunks.append(pa.array(pending, pa.string()))
                pending = []
        chunks.append(pa.array(pending, pa.string()))
        return cls(pa.chunked_array(chunks, pa.string()), problems)

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, rows: np.ndarray) -> "IdColumn":
        """The rows at `rows` (ascending), numbered 0.. again."""
        at = {p: int(np.searchsorted(rows, p)) for p in self.problems}
        problems = {i: self.problems[p] for p, i in at.items() if i < len(rows) and rows[i] == p}
        return IdColumn(self.ids.take(pa.array(rows, pa.int64())), problems)

    @staticmethod
    def concat(columns: list["IdColumn"]) -> "IdColumn":
        problems, offset = {}, 0
        for col in columns:
            problems.update({offset + r: p for r, p in col.problems.items()})
            offset += len(col)
        return IdColumn(pa.chunked_array([c for col in columns for c in col.ids.chunks], pa.string()), problems)

    def rows(self, keys: pa.Array | None = None) -> list[RowId]:
        """As RowIds (small sources, tests); with `keys`, the key first and the id as record_id."""
        ids = self.ids.to_pylist()
        if keys is None:
            return [RowId(r, s, self.problems.get(r)) for r, s in enumerate(ids)]
        return [RowId(r, s, p) if (p := self.problems.get(r)) else RowId(r, k, None, s)
                for r, (s, k) in enumerate(zip(ids, keys.to_pylist()))]


def unique_keys(col: IdColumn) -> pa.Array:
    """Every row's key (a problem row: its id); see the module docstring."""
    keyed = np.ones(len(col), bool)
    keyed[list(col.problems)] = False
    ids = col.ids.chunk(0) if col.ids.num_chunks == 1 else col.ids.combine_chunks()
    seen = occurrences(ids, keyed)
    repeat = seen >= 2
    if not repeat.any():
        return ids
    suffixed = pc.binary_join_element_wise(ids.filter(repeat), pa.array(seen[repeat]).cast(pa.string()), "#")
    del seen
    # "ID#k" can only be the name of a record whose id holds a "#": few or none
    named = ids.filter(pc.and_(pa.array(keyed), pc.match_substring(ids, "#")))
    clash = pc.is_in(suffixed, value_set=named).to_numpy(zero_copy_only=False)
    if clash.any():
        suffixed = _lengthen(suffixed, clash, named)
    return pc.replace_with_mask(ids, pa.array(repeat), suffixed)


def occurrences(ids: pa.Array, keyed: np.ndarray) -> np.ndarray:
    """Which occurrence of its id each keyed row is (1, 2, ...), in row order; 0 elsewhere.

    By sorting the ids (a stable sort keeps each id's rows in row order) rather than hashing
    them: Arrow's hash-based dictionary_encode of 665K ids peaked ~35 MB higher.
    """
    n = len(ids)
    order = pc.sort_indices(ids).to_numpy()
    ordered = ids.take(pa.array(order))
    starts = np.ones(n, bool)  # the first row of each id, in sorted order
    if n > 1:
        starts[1:] = pc.not_equal(ordered.slice(1), ordered.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    del ordered
    counted = keyed[order].astype(np.int32)
    running = np.cumsum(counted, dtype=np.int32)  # keyed rows so far, in sorted order
    before_group = (running - counted)[np.flatnonzero(starts)]  # ... before each id's first row
    sorted_seen = running - before_group[np.cumsum(starts, dtype=np.int32) - 1]
    sorted_seen[counted == 0] = 0
    seen = np.empty(n, np.int32)
    seen[order] = sorted_seen
    return seen


def _lengthen(suffixed: pa.Array, clash: np.ndarray, named: pa.Array) -> pa.Array:
    """Some record is really called "ID#k": rare, so Python sets of every name are fine here."""
    keys = suffixed.to_pylist()
    taken = set(named.to_pylist()) | set(keys)
    for i in np.flatnonzero(clash):
        key = keys[i]
        while key in taken:
            key += "#"
        taken.add(key)
        keys[i] = key
    return pa.array(keys, pa.string())


def assign_keys(rows: list[RowId]) -> list[RowId]:
    """`unique_keys` for a list of RowIds in row order."""
    col = IdColumn.gather((r.sample_id, r.problem) for r in rows)
    return [RowId(r.row, k.sample_id, k.problem, k.record_id) for r, k in zip(rows, col.rows(unique_keys(col)))]


@dataclass
class RankRows:
    """One rank's share of a build's rows (ascending), with their ids and unique keys."""

    rows: np.ndarray
    ids: pa.Array
    keys: pa.Array

    def _at(self, row: int) -> int:
        return int(np.searchsorted(self.rows, row))

    def key(self, row: int) -> str:
        return self.keys[self._at(row)].as_py()

    def record_id(self, row: int) -> str:
        return self.ids[self._at(row)].as_py()

    def nbytes(self) -> int:
        return self.rows.nbytes + self.ids.nbytes + self.keys.nbytes


def row_mask(rows) -> np.ndarray | None:
    """Rows (a set, a list, an array; None: all) as a boolean mask over 0..max(rows)."""
    if rows is None:
        return None
    rows = np.fromiter(rows, np.int64) if not isinstance(rows, np.ndarray) else rows
    mask = np.zeros(int(rows.max()) + 1 if len(rows) else 0, bool)
    mask[rows] = True
    return mask


def wanted(mask: np.ndarray | None, row: int) -> bool:
    return mask is None or (row < len(mask) and bool(mask[row]))
