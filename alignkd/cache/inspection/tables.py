"""Render a pyarrow table as aligned text, CSV or JSON lines for the terminal.

A cache's ids, paths and messages come from the user's manifest, so they may hold control
characters: an id with `\\x1b]0;...\\x07` printed raw retitles the terminal, and worse
sequences exist. Table and CSV output show each control character escaped (`\\x1b`);
JSON escapes them itself. CSV has no type for lists, structs or maps, so those cells are
written as JSON text (bytes as `<N bytes>`, as in the table).
"""

from __future__ import annotations

import io
import json
import re
from decimal import Decimal

import pyarrow as pa

# C0 and C1 controls, DEL, and the line separators and bidirectional overrides that
# reorder or split what the terminal shows
CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def escape_controls(text: str) -> str:
    """`text` with every control character written as its Python escape (`\\x1b`, `\\u202e`)."""
    return CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                        else f"\\u{ord(m.group()):04x}", text)


def _cell(value) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    text = escape_controls(str(value))
    return text if len(text) <= 60 else text[:57] + "..."


def _json_default(value):
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, Decimal):  # DuckDB's literals (1.5) are DECIMAL: a number, not a string
        return float(value)
    return str(value)


def _json_text(value) -> str:
    """A nested value (list, struct, map) as one JSON cell."""
    return json.dumps(value, default=_json_default)


def _csv_column(column: pa.ChunkedArray) -> pa.ChunkedArray | pa.Array:
    """A column pyarrow's CSV writer takes, with control characters escaped."""
    if pa.types.is_dictionary(column.type):  # a DuckDB ENUM
        column = column.cast(column.type.value_type)
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return pa.array([None if v is None else escape_controls(v) for v in column.to_pylist()], pa.string())
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind):
        return pa.array([None if v is None else f"<{len(v)} bytes>" for v in column.to_pylist()], pa.string())
    if pa.types.is_interval(kind):  # pyarrow's MonthDayNano tuple would read as a bare list in JSON
        return pa.array([None if v is None else str(v) for v in column.to_pylist()], pa.string())
    if pa.types.is_nested(kind):
        return pa.array([None if v is None else _json_text(v) for v in column.to_pylist()], pa.string())
    return column


def _csv(table: pa.Table) -> str:
    import pyarrow.csv as pacsv

    columns = [_csv_column(table.column(i)) for i in range(table.num_columns)]
    names = [escape_controls(n) for n in table.column_names]
    buf = io.BytesIO()
    pacsv.write_csv(pa.table(columns, names=names), buf)
    return buf.getvalue().decode().rstrip("\n")


def format_table(table, fmt: str = "table") -> str:
    if fmt == "json":
        return "\n".join(json.dumps(row, default=_cell) for row in table.to_pylist())
    if fmt == "csv":
        return _csv(table)
    names = [escape_controls(n) for n in table.column_names]
    columns = [table.column(i).to_pylist() for i in range(table.num_columns)]  # names may repeat
    cells = [[_cell(column[r]) for column in columns] for r in range(table.num_rows)]
    widths = [max([len(n)] + [len(r[i]) for r in cells]) for i, n in enumerate(names)]
    lines = ["  ".join(n.ljust(w) for n, w in zip(names, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.append(f"({table.num_rows} row{'s' if table.num_rows != 1 else ''})")
    return "\n".join(lines)
