"""`alignkd cache stats`: what is in a cache, what it costs on disk, and how the teacher did.

"Raw" bytes are the tensors at fp16 (attention, vision tokens, focus, log-probs) and
int32 (token ids, counts, offsets), the way a naive per-sample dump would store them;
the compression ratio is raw over the bytes the shards actually take. "Per sample" is the
shards' bytes (tensors and per-sample rows) over the samples; what a cache holds once,
whatever its size (the tokenizer, cache.json, catalog.duckdb), is `fixed_bytes`, which
`cache build`'s closing line prints beside it (`build_footprint`). A cache built with
--attn-store layer0 stores no attention (its raw and disk bytes are 0, the rows are
recomputed) and holds the layer-0 kit once, which stats prints beside the per-sample bytes.
"""

from __future__ import annotations

from collections import defaultdict

from alignkd.cache.catalog import run_sql
from alignkd.cache.shard_format import committed_shards, load_cache_json, read_shard_json
from alignkd.cache.sql_limits import SQLLimits
from alignkd.cache.storage import CacheStore, open_store
from alignkd.storage_schemas import ARRAY_KINDS, LAYER0_KIT_DIR, OWN_ENTRIES, SHARDS_DIR
from alignkd.storage_schemas.kinds import TARGET_KINDS, kinds_of

DISTRIBUTION_COLUMNS = ("teacher_ce", "teacher_entropy", "teacher_tail_mass", "attn_top16_share")

# Raw bytes per sample, from the row's shape columns (see the module docstring): the table's own.
RAW_BYTES_SQL = {kind.name: kind.raw_bytes for kind in TARGET_KINDS if kind.raw_bytes}


DISTINCT_IMAGES_SQL = "SELECT count(DISTINCT h) AS n FROM (SELECT unnest(image_sha256) AS h FROM samples)"


def _disk_bytes_by_kind(store: CacheStore) -> dict[str, int]:
    """Bytes per tensor kind (zarr arrays) and per Parquet file, summed over committed shards."""
    sizes: dict[str, int] = defaultdict(int)
    for shard in committed_shards(store):
        for entry in read_shard_json(shard)["files"]:
            top = entry["path"].split("/")[0]
            sizes[top if top in ARRAY_KINDS else entry["path"]] += entry["bytes"]
    return dict(sizes)


def _summary_sql(store: CacheStore, sql: str):
    """Our own summary queries: bounded in memory like any, but with no deadline, so a large
    cache (or one on object storage) is summarised however long it takes; Ctrl-C still stops it."""
    return run_sql(store, sql, SQLLimits(timeout_s=None))


def _one_row(store: CacheStore, sql: str) -> dict:
    """The single result row, with DuckDB's DECIMAL sums turned into plain numbers."""
    rows = _summary_sql(store, sql).to_pylist()
    row = rows[0] if rows else {}
    return {k: (int(v) if type(v).__name__ == "Decimal" else v) for k, v in row.items()}


def bytes_per_sample(disk: dict[str, int], samples: int) -> float:
    """The shards' bytes over the samples: the number `cache stats` and `cache build` print."""
    return sum(disk.values()) / max(samples, 1)


def fixed_parts(store: CacheStore) -> dict[str, int]:
    """Bytes of what a cache holds once, whatever its size: alignkd's entries beside shards/
    (the tokenizer, cache.json, catalog.duckdb, a layer-0 kit), never a user's file there."""
    return {name: store.tree_bytes(name) for name in store.list() if name in OWN_ENTRIES and name != SHARDS_DIR}


def build_footprint(cache) -> dict:
    """What `cache build` closes with, counted as `cache_stats` counts it: samples, bytes per
    sample, the fixed part, and images against distinct images."""
    store = open_store(cache)
    counts = _one_row(store, "SELECT count(*) AS samples, coalesce(sum(n_images), 0) AS images FROM samples")
    return {"samples": counts["samples"], "bytes_per_sample": bytes_per_sample(_disk_bytes_by_kind(store),
                                                                               counts["samples"]),
            "fixed": fixed_parts(store), "images": counts["images"],
            "distinct_images": _one_row(store, DISTINCT_IMAGES_SQL).get("n", 0)}


def cache_stats(cache) -> dict:
    store = open_store(cache)  # once: every query below gets this store
    meta = load_cache_json(store)
    raw_cols = ", ".join(f"coalesce(sum({expr}), 0) AS {kind}" for kind, expr in RAW_BYTES_SQL.items())
    raw = _one_row(store, f"SELECT {raw_cols} FROM samples")
    counts = _one_row(store, """
        SELECT count(*) AS samples, coalesce(sum(len(input_ids)), 0) AS tokens,
               coalesce(sum(list_sum(list_transform(label_mask, lambda x: x::INT))), 0) AS answer_tokens,
               coalesce(sum(n_text), 0) AS text_query_rows,
               coalesce(sum(n_logit_positions), 0) AS logit_positions,
               coalesce(sum(list_sum(list_transform(image_bytes, lambda b: octet_length(b)))), 0) AS image_bytes,
               coalesce(sum(n_images), 0) AS images,
               count(*) FILTER (WHERE n_images = 0) AS text_only,
               count(*) FILTER (WHERE n_images > 1) AS multi_image,
               count(*) FILTER (WHERE vision_from <> '') AS vision_shared
        FROM samples""")
    distinct = _one_row(store, DISTINCT_IMAGES_SQL)
    quantiles = {}
    for col in DISTRIBUTION_COLUMNS:
        quantiles[col] = _one_row(store, f"""
            SELECT min({col}) AS min, quantile_cont({col}, 0.1) AS p10, median({col}) AS p50,
                   quantile_cont({col}, 0.9) AS p90, max({col}) AS max, avg({col}) AS mean
            FROM samples WHERE NOT isnan({col})""")
    rejects = {r["reason"]: r["n"] for r in _summary_sql(
        store, "SELECT reason, count(*) AS n FROM rejects GROUP BY reason ORDER BY n DESC").to_pylist()}
    disk = _disk_bytes_by_kind(store)
    recomputed = meta.get("storage", {}).get("attn_store") == "layer0"
    if recomputed:  # no rows stored, none a per-sample dump would need: the kit recomputes them
        raw["attn"] = 0
    skipped = tuple(meta.get("storage", {}).get("skip", ()))
    for kind in (k for target in skipped for k in kinds_of(target)):  # --skip: not stored, not needed
        raw[kind] = 0
    n = max(counts.get("samples", 0), 1)
    tensors_disk = sum(disk.get(k, 0) for k in ARRAY_KINDS)
    tensors_raw = sum(raw.get(k, 0) for k in ARRAY_KINDS)
    return {
        "path": store.absolute(),
        "format": meta["format"], "schema_version": meta["schema_version"],
        "samples": counts.get("samples", 0), "shards": len(committed_shards(store)),
        "rejects": rejects, "tokens": {k: counts.get(k, 0) for k in
                                       ("tokens", "answer_tokens", "text_query_rows", "logit_positions")},
        "images": {"images": counts.get("images", 0), "distinct_images": distinct.get("n", 0),
                   "text_only_samples": counts.get("text_only", 0),
                   "multi_image_samples": counts.get("multi_image", 0),
                   "samples_sharing_vision": counts.get("vision_shared", 0)},
        "bytes_on_disk": disk, "bytes_raw": {k: raw.get(k, 0) for k in ARRAY_KINDS},
        "bytes_per_sample": bytes_per_sample(disk, n), "attn_recomputed": recomputed, "skipped": skipped,
        "layer0_kit_bytes": store.tree_bytes(LAYER0_KIT_DIR) if recomputed else 0,
        "tensor_compression_ratio": tensors_raw / tensors_disk if tensors_disk else None,
        "teacher": meta.get("teacher", {}), "teacher_shapes": meta.get("teacher_shapes", {}),
        "build_options": meta.get("build_options", {}), "storage": meta.get("storage", {}),
        "distributions": quantiles,
    }


def kilobytes(n: float) -> str:
    return f"{n / 1e3:,.1f} kB"


def render_stats(s: dict) -> str:
    lines = [f"cache {s['path']}  ({s['format']} v{s['schema_version']})",
             f"samples {s['samples']} in {s['shards']} shard(s); "
             f"rejects {sum(s['rejects'].values())}"
             + "".join(f"\n  reject {reason}: {n}" for reason, n in s["rejects"].items()),
             ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in s["tokens"].items()),
             ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in s["images"].items()),
             f"on disk {kilobytes(s['bytes_per_sample'])} per sample; tensors compress "
             + (f"{s['tensor_compression_ratio']:.2f}x vs raw fp16/int32" if s["tensor_compression_ratio"]
                else "n/a"),
             "  kind            disk        raw"]
    for kind, size in sorted(s["bytes_on_disk"].items()):
        raw = s["bytes_raw"].get(kind)
        lines.append(f"  {kind:<14} {kilobytes(size):>10} {(kilobytes(raw) if raw is not None else '-'):>10}"
                     + ("  recomputed from the layer-0 kit" if kind == "attn" and s["attn_recomputed"] else "")
                     + ("  not stored (--skip)" if kind in s.get("skipped", ()) else ""))
    if s["attn_recomputed"]:
        lines.append(f"once {LAYER0_KIT_DIR} {kilobytes(s['layer0_kit_bytes'])}: the teacher's layer-0 kit, from "
                     "which the attention rows are recomputed (none stored)")
    lines.append(f"{'teacher stats':<20}" + "".join(f"{k:>9}" for k in ("min", "p10", "p50", "p90", "max")))
    for col, q in s["distributions"].items():
        if q.get("p50") is None:
            continue
        lines.append(f"  {col:<18}" + "".join(f"{q[k]:9.4f}" for k in ("min", "p10", "p50", "p90", "max")))
    t = s["teacher"]
    name = f"{t['repo_id']}@{str(t.get('revision'))[:12]}" if t.get("repo_id") else t.get("path")
    lines.append(f"teacher {name} ({s['teacher_shapes'].get('model_type')}, "
                 f"config {str(t.get('config_sha256'))[:12]}, weights {str(t.get('weights_fingerprint'))[:12]})")
    # layer0 stores no attention; the sources get a line each below
    unused = ("sources",) + (("attn_dtype", "attn_topk") if s["attn_recomputed"] else ()) \
        + (() if s.get("skipped") else ("skip",))  # said only when a target was left out
    lines.append("build " + " ".join(f"{k}={v}" for k, v in s["build_options"].items() if k not in unused))
    for src in s["build_options"].get("sources", []):  # the mixture: what each source gave
        lines.append(f"source {src['name']}: {src['kept']:,} of {src['records']:,} records ({src['sampling']})"
                     + (f", images under {src['images']}" if src.get("images") else ""))
    return "\n".join(lines)
