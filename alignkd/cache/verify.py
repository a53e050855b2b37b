"""`verify_cache`: every way a cache can be damaged, as a list of named problems.

Checks, in order: no file or directory of the cache leads outside it (a symbolic link:
nothing else is read when one does); cache.json's format and schema version (nothing else
is read when it is wrong); a layer0 cache's kit files against their sha256 in cache.json;
per shard, shard.json itself, each listed file's size and sha256, files not listed, the
rows against the arrays (offsets and shapes within each array's length) and every sample's
per-tensor crc32; incomplete shard directories; and that catalog.duckdb
lists exactly the shards on disk with their counts. The sha256 says *which file* is
damaged, the crc32 says *which samples*. Every check reads through the storage seam, so a
cache on object storage is checked as a local one is, but for catalog.duckdb, which exists
only on local disk (see rebuild_catalog).

Verify may run while a build writes the cache (`build_in_progress`: the build's lock). It
checks the shards committed when it listed them; the build's hidden temporary shard is not
one of them, and a catalog that lags the shards, or that the build holds open for a moment,
is not damage then.
"""

from __future__ import annotations

import hashlib
import json
import time
import zlib
from dataclasses import dataclass

from alignkd.cache.layer0_store import kit_problems
from alignkd.cache.lock import build_in_progress
from alignkd.cache.shard_format import (CacheFormatError, committed_shards, load_cache_json, open_array,
                                        read_array_info, read_index, read_parquet, read_raw)
from alignkd.cache.storage import CacheStore, OutsideCacheError, open_store
from alignkd.storage_schemas import (ARRAY_KINDS, CACHE_JSON, CATALOG_FILE, FORMAT_NAME, REJECTS_FILE, SAMPLES_FILE,
                                     SCHEMA_VERSION, SHARD_JSON, SHARDS_DIR, TOKENIZER_DIR,
                                     element_counts)

CATALOG_TRIES = 40  # x 50 ms: a build holds catalog.duckdb read-write only for a commit's row


@dataclass(frozen=True)
class Problem:
    shard: str     # shard directory name, "" for the cache itself
    file: str      # path inside the shard (or the cache), "" for the whole shard
    message: str

    def __str__(self) -> str:
        where = "/".join(p for p in (self.shard, self.file) if p) or "cache"
        return f"{where}: {self.message}"


def verify_cache(path) -> list[Problem]:
    store = open_store(path)
    escapes = [Problem("", rel, f"leads outside the cache (to {target}); a cache must hold its own files")
               for rel, target in store.links_outside()]
    if escapes:  # nothing is read through them
        return escapes
    building = build_in_progress_at(store)
    try:
        meta = load_cache_json(store)
    except CacheFormatError as exc:
        if building and not store.is_file(CACHE_JSON):  # the build has not created it yet
            return []
        return [Problem("", CACHE_JSON, str(exc))]
    try:
        shards = committed_shards(store)
    except OutsideCacheError as exc:  # a link made since the walk above
        return [Problem("", SHARDS_DIR, str(exc))]
    # --attn-store layer0: the kit every sample's attention is recomputed from
    problems: list[Problem] = [Problem("", rel, why) for rel, why in kit_problems(store, meta.get("storage", {}))]
    for shard in shards:
        problems += verify_shard(shard)
    problems += verify_vision_holders(shards)
    problems += verify_incomplete(store, {shard.name for shard in shards})
    if store.local_path(CATALOG_FILE) is not None:  # object storage has no catalog.duckdb (see rebuild_catalog)
        problems += verify_catalog(store, shards, building or bool(build_in_progress_at(store)))
    return problems + verify_tokenizer(store)


def build_in_progress_at(store: CacheStore) -> str | None:
    """The pid(s) of a build holding the cache, when it is on local disk (the lock is local)."""
    root = store.local_path()
    return build_in_progress(root) if root is not None else None


def verify_incomplete(store: CacheStore, committed: set[str]) -> list[Problem]:
    """Shard directories without shard.json. A shard committed since `committed` was listed
    has one now (locally a shard appears whole by a rename, so a build in flight is never
    one of these: its shard is a hidden .tmp- directory)."""
    return [Problem(name, SHARD_JSON, "missing, so the shard is incomplete") for name in store.list(SHARDS_DIR)
            if name.startswith("shard-") and name not in committed
            and not store.is_file(f"{SHARDS_DIR}/{name}/{SHARD_JSON}")]


def verify_vision_holders(shards: list[CacheStore]) -> list[Problem]:
    """A sample that shares another's vision tokens (`vision_from`) needs that sample committed."""
    ids, pointers = set(), []
    for shard in shards:
        try:
            rows = read_parquet(shard, SAMPLES_FILE, columns=["sample_id", "vision_from"]).to_pylist()
        except (CacheFormatError, OSError):
            continue  # verify_shard names the unreadable file
        ids.update(r["sample_id"] for r in rows)
        pointers += [(shard.name, r["sample_id"], r["vision_from"]) for r in rows if r["vision_from"]]
    return [Problem(name, SAMPLES_FILE, f"sample {sid} shares the vision tokens of sample {holder}, "
                                        "which is in no committed shard")
            for name, sid, holder in pointers if holder not in ids]


def verify_tokenizer(store: CacheStore) -> list[Problem]:
    """The teacher's tokenizer kept in the cache (distill checks students against it) must load."""
    from tokenizers import Tokenizer

    problems = []
    for name in [n for n in store.list(TOKENIZER_DIR) if n.endswith(".json")]:
        rel = f"{TOKENIZER_DIR}/{name}"
        try:
            text = store.read_text(rel)
            json.loads(text)
            if name == "tokenizer.json":
                Tokenizer.from_str(text)
        except Exception as exc:  # noqa: BLE001 - json and the Rust tokenizer raise unrelated types
            problems.append(Problem("", rel, f"cannot be loaded ({str(exc).splitlines()[0]})"))
    return problems


def verify_shard(d: CacheStore) -> list[Problem]:
    """Every check of one committed shard (a store rooted at the shard directory)."""
    name = d.name
    try:
        doc = json.loads(d.read_text(SHARD_JSON))
    except (OSError, ValueError) as exc:
        return [Problem(name, SHARD_JSON, f"cannot be read ({exc})")]
    if doc.get("format") != FORMAT_NAME or doc.get("schema_version") != SCHEMA_VERSION:
        return [Problem(name, SHARD_JSON, f"format {doc.get('format')!r} version {doc.get('schema_version')}, "
                                          f"expected {FORMAT_NAME!r} version {SCHEMA_VERSION}")]
    problems, unreadable = _check_files(d, doc)
    if SAMPLES_FILE in unreadable or REJECTS_FILE in unreadable:
        return problems
    try:
        rows = read_parquet(d, SAMPLES_FILE).drop_columns(["image_bytes"]).to_pylist()
        n_rejects = read_parquet(d, REJECTS_FILE, columns=["manifest_row"]).num_rows
    except CacheFormatError as exc:
        file = REJECTS_FILE if REJECTS_FILE in str(exc) else SAMPLES_FILE
        return problems + [Problem(name, file, f"unreadable: {str(exc).split(' (', 1)[-1].split(');')[0]}")]
    if len(rows) != doc["n_samples"] or n_rejects != doc["n_rejects"]:
        problems.append(Problem(name, SAMPLES_FILE, f"{len(rows)} samples and {n_rejects} rejects, shard.json "
                                                    f"says {doc['n_samples']} and {doc['n_rejects']}"))
    problems += [Problem(name, SAMPLES_FILE, msg) for msg in map(_image_columns_problem, rows) if msg]
    for kind in ARRAY_KINDS:
        if f"{kind}/c/0" not in unreadable and f"{kind}/zarr.json" not in unreadable:
            problems += _check_array(d, doc, kind, rows)
    return problems


def _image_columns_problem(row: dict) -> str | None:
    """The per-image columns must agree with n_images and split n_vision exactly."""
    lengths = {len(row[c]) for c in ("image_paths", "image_sha256", "image_n_vision")}
    if lengths != {row["n_images"]} or sum(row["image_n_vision"]) != row["n_vision"]:
        return (f"sample {row['sample_id']}: {row['n_images']} images with per-image vision counts "
                f"{row['image_n_vision']}, but {row['n_vision']} vision tokens")
    return None


def _check_files(d: CacheStore, doc: dict) -> tuple[list[Problem], set[str]]:
    """Size and sha256 of each listed file; returns problems and the files too short to read."""
    problems, unreadable = [], set()
    listed = {f["path"] for f in doc["files"]}
    present = d.file_sizes()
    for f in doc["files"]:
        size = present.get(f["path"])
        if size is None:
            problems.append(Problem(d.name, f["path"], "missing"))
            unreadable.add(f["path"])
            continue
        if size != f["bytes"]:
            problems.append(Problem(d.name, f["path"], f"size {size} bytes, shard.json says {f['bytes']} (truncated?)"))
            unreadable.add(f["path"])
        elif _sha256(d, f["path"]) != f["sha256"]:
            problems.append(Problem(d.name, f["path"], "sha256 does not match shard.json (corrupted)"))
    for rel in present:
        if rel != SHARD_JSON and rel not in listed:
            problems.append(Problem(d.name, rel, "not listed in shard.json"))
    return problems, unreadable


def _sha256(d: CacheStore, rel: str) -> str:
    h = hashlib.sha256()
    with d.open(rel) as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _check_array(d: CacheStore, doc: dict, kind: str, rows: list[dict]) -> list[Problem]:
    rel = f"{kind}/c/0"
    try:
        info = read_array_info(d, kind)
    except CacheFormatError as exc:
        return [Problem(d.name, f"{kind}/zarr.json", str(exc))]
    expected = doc["arrays"].get(kind, {}).get("length")
    if info.length != expected:
        return [Problem(d.name, f"{kind}/zarr.json", f"length {info.length}, shard.json says {expected}")]
    if not info.length:
        return []
    encodings = {k: v["encoding"] for k, v in doc["arrays"].items()}

    def counts(row):
        return element_counts(row, encodings)

    try:
        handle = open_array(d, info)
    except CacheFormatError as exc:
        return [Problem(d.name, rel, str(exc))]
    try:
        index = read_index(handle, info)
        bad = []
        for row in rows:
            off, n = row[f"{kind}_offset"], counts(row)[kind]
            if off < 0 or off + n > info.length:
                bad.append(f"{row['sample_id']} (offset {off}+{n} beyond length {info.length})")
                continue
            try:
                raw = read_raw(handle, info, index, off, n)
            except CacheFormatError:
                bad.append(f"{row['sample_id']} (undecodable chunk)")
                continue
            if (zlib.crc32(memoryview(raw).cast("B")) if n else 0) != row[f"{kind}_crc32"]:
                bad.append(f"{row['sample_id']} (crc32 mismatch)")
    except CacheFormatError as exc:
        return [Problem(d.name, rel, str(exc))]
    finally:
        handle.close()
    if not bad:
        return []
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    return [Problem(d.name, rel, f"{len(bad)} damaged sample(s): {', '.join(bad[:3])}{more}")]


def verify_catalog(store: CacheStore, shards: list[CacheStore], building: bool) -> list[Problem]:
    """catalog.duckdb lists exactly the committed shards with their counts. While a build
    runs, the catalog may lag the shards (a shard renamed into place gets its row a moment
    later) and the build may hold it open: neither is damage then."""
    import duckdb

    if not store.is_file(CATALOG_FILE):
        return [] if building else [Problem("", CATALOG_FILE, "missing; rebuild it with "
                                                              "alignkd.cache.rebuild_catalog")]
    try:
        listed = _catalog_rows(store, building)
    except duckdb.Error as exc:
        if building:  # still held by the build's writer: the shards were checked, the index waits
            return []
        return [Problem("", CATALOG_FILE, f"cannot be read ({str(exc).splitlines()[0]})")]
    on_disk = {}
    for d in shards:
        try:
            on_disk[d.name] = json.loads(d.read_text(SHARD_JSON))
        except (OSError, ValueError):
            continue
    now = {d.name for d in committed_shards(store)} | set(on_disk)  # shards committed since the listing
    problems = [Problem(name, "", "listed in catalog.duckdb but the shard directory is missing")
                for name in sorted(set(listed) - now)]
    if not building:
        problems += [Problem(name, "", "on disk but not listed in catalog.duckdb")
                     for name in sorted(set(on_disk) - set(listed))]
    for name in sorted(set(on_disk) & set(listed)):
        doc, row = on_disk[name], listed[name]
        if (row["n_samples"], row["n_rejects"]) != (doc["n_samples"], doc["n_rejects"]):
            problems.append(Problem(name, CATALOG_FILE, f"catalog counts {row['n_samples']}/{row['n_rejects']} "
                                                        f"differ from shard.json {doc['n_samples']}/{doc['n_rejects']}"))
    return problems


def _catalog_rows(store: CacheStore, building: bool) -> dict[str, dict]:
    """The catalog's shards by name; while a build runs, waits out its brief read-write holds."""
    import duckdb

    from alignkd.cache.catalog import catalog_shards

    tries = CATALOG_TRIES if building else 1
    for attempt in range(tries):
        try:
            return {r["name"]: r for r in catalog_shards(store).to_pylist()}
        except duckdb.IOException:  # "Could not set lock on file": the writer holds it
            if attempt + 1 == tries:
                raise
            time.sleep(0.05)
