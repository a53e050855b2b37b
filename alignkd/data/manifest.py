"""Manifests as JSON: a JSON list of records, or JSONL with one record a line.

A record is LLaVA's `{"id", "image", "conversations": [{"from", "value"}]}` or the Hugging
Face chat format `{"id", "image", "messages": [{"role", "content"}]}`; `image` (or
`images`) is one relative path, a list of them (several images, one `<image>` placeholder
or `{"type": "image"}` item each, in order), or absent for a text-only record.

A file that cannot be parsed stops the build with the line number (`ManifestError`):
nothing useful can be salvaged from a half-read JSON list. A record whose own fields
are malformed (no id, an "image" that is not a string or list of strings) is kept with
`problem` set, so that `render_sample` rejects just that row and the build carries on.
We never invent an id for such a row: a made-up id would silently enter the cache.
Parquet datasets are read by `alignkd.data.parquet_source` into the same records.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from alignkd.data.errors import ManifestError, SampleError

CHUNK = 1 << 16  # bytes handed to the parser at a time (never across a line: errors name it)


@dataclass(frozen=True)
class ImageRef:
    """One image of a record: a path under the images root, or encoded bytes (Parquet)."""

    path: str | None = None
    data: bytes | None = None
    # a dataset row's {bytes: null, path} struct: with no --images root it is that row's
    # reject, where a manifest of paths without a root is a mistake in the command
    row_may_lack_root: bool = False

    @property
    def name(self) -> str:
        return self.path if self.path is not None else f"<{len(self.data or b'')} bytes>"


@dataclass(frozen=True)
class ManifestRecord:
    """One manifest entry. `row` is its 0-based position among the records.

    `turns` is the record's `conversations` (LLaVA: {"from", "value"}) or `messages` (chat:
    {"role", "content"}) list as written; `alignkd.data.conversation` validates both.
    """

    row: int
    sample_id: str
    images: tuple[ImageRef, ...]
    turns: list
    chat_format: str = "conversations"  # or "messages"
    problem: str | None = None  # a SampleError reason found while reading, if any
    problem_detail: str | None = None  # its sentence, where the reason alone does not say which field
    # set by a mixture (alignkd.data.mixture): the id as written when sample_id became a
    # unique key, the source's name, and the source's own image root (None: --images)
    record_id: str | None = None
    source: str = ""
    images_root: str | None = None


def read_manifest(path: str | Path) -> list[ManifestRecord]:
    """Every record of a JSON list or JSONL manifest, in a list (small manifests, tests)."""
    return list(iter_manifest(path))


def iter_manifest(path: str | Path) -> Iterator[ManifestRecord]:
    """Stream the records of a JSON list or JSONL manifest; see the module docstring.

    Memory does not grow with the file: JSONL is read a line at a time and a JSON list is
    fed to ijson (a C streaming parser) in pieces that never cross a line, so a parse error
    still names its exact line. LLaVA-665K's 1 GB list costs a few MB here, not ~5 GB per
    torchrun rank as a whole-file parse did.
    """
    path = Path(path)
    first = _first_byte(path)
    jsonl = path.suffix.lower() == ".jsonl" or (first == b"{" and _first_line_is_object(path))
    if first == b"{" and not jsonl:
        raise ManifestError(f"{path} holds a JSON object, not a list of records.")
    if first not in (b"[", b"{"):
        raise ManifestError(f"{path} holds a JSON {_json_type(_first_value(path))}, not a list of records.")
    raw = _stream_jsonl(path) if jsonl else _stream_json_list(path)
    rows = 0
    for row, (where, item) in enumerate(raw):
        if row == 0 and jsonl and _is_wrapper_object(item) and _only_one_line(path):
            raise ManifestError(f"{path} holds a JSON object, not a list of records.")
        yield _to_record(path, row, where, item)
        rows += 1
    if not rows:
        raise ManifestError(f"manifest {path} holds no records.")


def _first_byte(path: Path) -> bytes:
    """The first non-whitespace byte, after the checks every manifest gets."""
    if not path.exists():
        raise ManifestError(f"manifest {path} does not exist.")
    if not path.is_file():
        raise ManifestError(f"manifest {path} is not a file.")
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            stripped = chunk.lstrip()
            if stripped:
                return stripped[:1]
    raise ManifestError(f"manifest {path} is empty.")


def _first_line_is_object(path: Path) -> bool:
    """JSONL under a .json name: its first non-empty line is a whole JSON object."""
    with path.open("rb") as f:
        for line in _lines(f):
            if line.strip():
                try:
                    return isinstance(json.loads(line), dict)
                except ValueError:
                    return False
    return False


def _only_one_line(path: Path) -> bool:
    with path.open("rb") as f:
        return sum(1 for line in _lines(f) if line.strip()) == 1


def _lines(f) -> Iterator[bytes]:
    """Whole lines, except that a line longer than CHUNK comes in CHUNK-sized pieces."""
    while piece := f.readline(CHUNK):
        yield piece


def _stream_jsonl(path: Path) -> Iterator[tuple[str, object]]:
    with path.open("rb") as f:
        lineno, line = 1, b""
        for piece in _lines(f):
            line += piece
            if not piece.endswith(b"\n") and len(piece) == CHUNK:
                continue  # a long record: gather the rest of its line
            if line.strip():
                yield f"line {lineno}", _parse_line(path, lineno, line)
            lineno, line = lineno + 1, b""
        if line.strip():  # a last line of exactly CHUNK bytes with no newline
            yield f"line {lineno}", _parse_line(path, lineno, line)


def _parse_line(path: Path, lineno: int, line: bytes) -> object:
    try:
        return json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ManifestError(f"manifest {path} line {lineno} is not UTF-8 text (byte {err.start}).") from None
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path} line {lineno} is not valid JSON: {err.msg} (column {err.colno}).") from None


def _stream_json_list(path: Path) -> Iterator[tuple[str, object]]:
    import ijson

    found = ijson.sendable_list()
    parser = ijson.items_coro(found, "item", use_float=True)
    count, lineno = 0, 1
    with path.open("rb") as f:
        for piece in _lines(f):
            _feed(parser, path, lineno, piece)
            for item in found:
                yield f"record {count}", item
                count += 1
            del found[:]
            lineno += piece.endswith(b"\n")
    _feed(parser, path, lineno, None)
    for item in found:
        yield f"record {count}", item
        count += 1


def _feed(parser, path: Path, lineno: int, piece: bytes | None) -> None:
    """One piece into ijson (None: the end of the file); a parse error names the line."""
    import ijson

    try:
        parser.send(piece) if piece is not None else parser.close()
    except ijson.JSONError as err:
        reason = str(err).splitlines()[0].replace("parse error: ", "")
        where = "ends before the list is closed" if piece is None else f"line {lineno} is not valid JSON"
        raise ManifestError(f"{path} {where}: {reason}.") from None


def _is_wrapper_object(value: object) -> bool:
    """True for a whole-file JSON object that is not itself a record, e.g. {"data": [...]}.

    Such a file is refused as "not a list" rather than read as a one-line JSONL whose
    only record lacks every field.
    """
    return isinstance(value, dict) and "conversations" not in value and "messages" not in value


def _first_value(path: Path) -> object:
    """The JSON value on the first non-empty line (a file that is no JSON at all fails here, naming it)."""
    with path.open("rb") as f:
        for lineno, line in enumerate(_lines(f), start=1):
            if line.strip():
                return _parse_line(path, lineno, line)


def _to_record(path: Path, row: int, where: str, item: object) -> ManifestRecord:
    if not isinstance(item, dict):
        raise ManifestError(f"{path} {where} is a JSON {_json_type(item)}, not an object.")
    return record_from_fields(row, item.get("id"), image_refs(item), item)


def image_refs(item: dict) -> tuple[ImageRef, ...] | None:
    """The record's images from `image` or `images`: a path, a list of paths, or none
    (None: malformed, e.g. both keys, a number, an empty string)."""
    if "image" in item and "images" in item and item["image"] is not None and item["images"] is not None:
        return None
    value = item.get("image", item.get("images"))
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not values and isinstance(value, list):
        return ()
    if not all(isinstance(v, str) and v for v in values):
        return None
    return tuple(ImageRef(path=v) for v in values)


# Media alignkd cannot feed a teacher. A record holding one is refused as a whole: reading
# it as text would train on a prompt that talks about a clip nobody sees (LLaVA-Video and
# OneVision manifests mix such records in with "video": "clips/v1.mp4").
VIDEO_KEYS = ("video", "videos")
OTHER_MEDIA_KEYS = ("audio", "audios", "speech")


def media_problem(item: dict) -> tuple[str, str] | None:
    """(reason, detail) when the record carries media alignkd does not read, else None."""
    for key in VIDEO_KEYS + OTHER_MEDIA_KEYS:
        if item.get(key) not in (None, "", []):
            reason = "video_unsupported" if key in VIDEO_KEYS else "media_unsupported"
            return reason, f"has a {key!r} field; alignkd distils images and text only, so the record is not kept"
    return None


def record_from_fields(row: int, raw_id, images: tuple[ImageRef, ...] | None, item: dict) -> ManifestRecord:
    """A ManifestRecord from a record's id, its images (None: malformed) and its turn list."""
    problem, detail = None, None
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or str(raw_id) == "":
        problem, sample_id = "missing_id", f"row{row}"
    else:
        sample_id = str(raw_id)  # some LLaVA dumps use integer ids
    has_conv, has_msgs = item.get("conversations") is not None, item.get("messages") is not None
    chat_format = "messages" if has_msgs and not has_conv else "conversations"
    turns = item.get(chat_format)
    if images is None or has_conv == has_msgs or not isinstance(turns, list):
        problem = problem or "bad_record"
    media = media_problem(item)
    if problem is None and media is not None:
        problem, detail = media
    return ManifestRecord(row=row, sample_id=sample_id, images=images or (),
                          turns=turns if isinstance(turns, list) else [], chat_format=chat_format, problem=problem,
                          problem_detail=detail)


def _json_type(value: object) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return names.get(type(value), "null")
