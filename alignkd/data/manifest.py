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

from alignkd.data.errors import ManifestError, SampleError


@dataclass(frozen=True)
class ImageRef:
    """One image of a record: a path under the images root, or encoded bytes (Parquet)."""

    path: str | None = None
    data: bytes | None = None

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


def read_manifest(path: str | Path) -> list[ManifestRecord]:
    """Read a JSON list or JSONL manifest; see the module docstring for error policy."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"manifest {path} does not exist.")
    if not path.is_file():
        raise ManifestError(f"manifest {path} is not a file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ManifestError(f"manifest {path} is not UTF-8 text (byte {err.start}).") from None
    if not text.strip():
        raise ManifestError(f"manifest {path} is empty.")
    if path.suffix.lower() == ".jsonl" or (text.lstrip().startswith("{") and not _is_wrapper_object(text)):
        raw = _parse_jsonl(path, text)
    else:
        raw = _parse_json_list(path, text)
    if not raw:
        raise ManifestError(f"manifest {path} holds no records.")
    return [_to_record(path, row, where, item) for row, (where, item) in enumerate(raw)]


def split_duplicates(records: list[ManifestRecord]) -> tuple[list[ManifestRecord], list[SampleError]]:
    """Keep the first record of each id; later ones become `duplicate_id` errors."""
    first_row: dict[str, int] = {}
    kept, errors = [], []
    for rec in records:
        if rec.problem is not None:  # its id is not real; render_sample rejects it
            kept.append(rec)
        elif rec.sample_id in first_row:
            errors.append(SampleError(rec.sample_id, rec.row, "duplicate_id",
                                      f"repeats the id of manifest row {first_row[rec.sample_id]}"))
        else:
            first_row[rec.sample_id] = rec.row
            kept.append(rec)
    return kept, errors


def _is_wrapper_object(text: str) -> bool:
    """True for a whole-file JSON object that is not itself a record, e.g. {"data": [...]}.

    Such a file is refused as "not a list" rather than read as a one-line JSONL whose
    only record lacks every field.
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(value, dict) and "conversations" not in value and "messages" not in value


def _parse_json_list(path: Path, text: str) -> list[tuple[str, object]]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path} line {err.lineno} is not valid JSON: {err.msg} (column {err.colno}).") from None
    if not isinstance(value, list):
        raise ManifestError(f"{path} holds a JSON {_json_type(value)}, not a list of records.")
    return [(f"record {i}", item) for i, item in enumerate(value)]


def _parse_jsonl(path: Path, text: str) -> list[tuple[str, object]]:
    items = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append((f"line {lineno}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise ManifestError(f"{path} line {lineno} is not valid JSON: {err.msg} (column {err.colno}).") from None
    return items


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
