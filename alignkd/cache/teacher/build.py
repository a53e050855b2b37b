"""`alignkd cache build`: run the teacher once over a manifest and feed the cache writer.

Over 300 lines on purpose: the build's plan, guards and loop, which need each other in view;
the teacher forward, the writer and the guards' checks live elsewhere.

The teacher forward runs in this thread; the writer compresses and writes shards on a
background thread, so I/O overlaps the next batch. Rows already committed (samples or
rejects) are skipped, which is all that resume needs: the writer's shard commits are
atomic, so at most the shard that was in flight when a build died is redone.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from alignkd.errors import (ConfigError, check_at_least_one, check_choices, check_dir, check_file,
                            check_out_dir)
from alignkd.hub import check_model_arg
from alignkd.storage_schemas import ATTN_DTYPES, PROCESSOR_FILES, TOKENIZER_DIR, VISION_DTYPES

LOGIT_MODES = ("topk", "sampled")
POSITION_POLICIES = ("response", "text")
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
# Positions and counts are stored as int32, and a batch or shard beyond it could never be
# filled; a bigger number is a typo (--batch-size 100000000000000000000000), not a request.
MAX_COUNT = 2**31 - 1
COUNTS = ("batch_size", "max_length", "shard_size", "logit_k", "logit_samples")

# How long a rank > 0 waits for rank 0's cache.json to show at its --out (a shared
# filesystem's attribute cache may lag a few seconds behind the node that wrote it).
SAME_OUT_WAIT_S = float(os.environ.get("ALIGNKD_SAME_OUT_WAIT_S", 20))

# Options that change what is stored. Resuming with any of them different would mix two
# kinds of sample in one cache, so a resume compares exactly these against cache.json.
STORED_OPTIONS = (
    "max_length", "logit_mode", "logit_k", "logit_samples", "logit_positions",
    "attn_dtype", "vision_dtype", "store_images", "seed", "dtype", "attn_topk", "share_vision", "attn_store",
    "skip",
)


@dataclass(frozen=True)
class BuildConfig:
    teacher: str
    # a JSON/JSONL manifest, a .parquet file or a directory of them, a dataset id, a YAML
    # mixture, or several of these (alignkd.data.mixture)
    data: str | tuple[str, ...]
    images: str | tuple[str, ...] | None  # root(s) of the records' image paths (Parquet images come from their bytes)
    out: str
    batch_size: int = 8
    max_length: int = 2048
    shard_size: int = 256
    limit: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    overwrite: bool = False
    logit_mode: str = "topk"
    logit_k: int = 16
    logit_samples: int = 64
    logit_positions: str = "text"  # docs/efficacy.md: ahead of "response" on every development world
    attn_dtype: str = "uint8-log"  # the default storage: BENCHMARKS.md, "Cache storage"
    vision_dtype: str = "bfloat16"
    attn_topk: int = 0                # > 0: keep each attention row's k largest vision columns (and the rest's mass)
    attn_store: str = "maps"          # "layer0": no attention rows, the teacher's layer-0 kit once (recomputed)
    share_vision: bool = True         # store the vision tokens of each distinct image set once
    skip: tuple[str, ...] = ()        # targets not to store ("attn", "vision"): their loss terms are then off
    store_images: bool = True
    trust_remote_code: bool = False
    progress: bool = True
    # A teacher bigger than one device: accelerate's big-model loading (docs/scale.md)
    device_map: str | None = None      # auto | balanced | balanced_low_0 | sequential | map.json
    max_memory: str | None = None      # "0=70GiB,1=70GiB,cpu=200GiB"
    offload_folder: str | None = None  # for modules placed on "disk" (default: a temporary directory)
    # Under torchrun: the most minutes a rank that finished waits for the others (None: 72 hours)
    timeout: float | None = None

    def __post_init__(self) -> None:
        check_choices(self, {"logit_mode": LOGIT_MODES, "logit_positions": POSITION_POLICIES,
                             "attn_dtype": ATTN_DTYPES, "vision_dtype": VISION_DTYPES, "dtype": COMPUTE_DTYPES})
        for name in COUNTS + ("attn_topk", "limit"):
            value, flag = getattr(self, name), f"--{name.replace('_', '-')}"
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ConfigError(f"{flag} must be a whole number, not {value!r}.")
            if (value or 0) > MAX_COUNT:
                raise ConfigError(f"{flag} {value} is more than {MAX_COUNT:,}.")
        check_at_least_one(self, COUNTS)
        if self.timeout is not None and not 0 < self.timeout < float("inf"):
            raise ConfigError(f"--timeout must be a positive number of minutes, not {self.timeout}.")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("--limit must be at least 1.")
        from alignkd.cache.writer import check_attn_store, check_attn_topk, check_skip

        check_attn_topk(self.attn_topk, self.attn_dtype)
        check_attn_store(self.attn_store, self.attn_topk)
        object.__setattr__(self, "skip", tuple(sorted(set(_as_tuple(self.skip)))))  # "vision" alone, too
        check_skip(self.skip, self.attn_store, self.attn_topk)
        check_model_arg(self.teacher, "--teacher", "model directory")
        from alignkd.hub import parse_dataset_arg

        for value in _as_tuple(self.data):
            # a directory is a Parquet dataset, an org/name that is no path a dataset id (data.sources)
            if not Path(value).is_dir() and (Path(value).exists() or parse_dataset_arg(value) is None):
                check_file(value, "manifest")
        for root in _as_tuple(self.images):
            check_dir(root, "images directory")
            if not os.access(root, os.X_OK):  # else every row would be an unreadable_image reject
                raise ConfigError(f"images directory {root} cannot be entered (permission denied).")
        check_out_dir(self.out)
        if self.device_map is None:
            from alignkd.models.placement import check_device

            check_device(self.device)
        self.placement()  # refuses a malformed --device-map / --max-memory before the teacher loads

    def placement(self):
        """The teacher's device map for from_pretrained, or None to load it whole on --device."""
        from alignkd.models.placement import Placement, parse_device_map, parse_max_memory

        if self.device_map is None:
            for name in ("max_memory", "offload_folder"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"--{name.replace('_', '-')} only applies with --device-map.")
            return None
        if self.device != "cpu":
            raise ConfigError(f"--device {self.device} and --device-map {self.device_map} both say where the teacher "
                              "goes; with a device map, leave --device out.")
        folder = Path(self.offload_folder) if self.offload_folder is not None else None
        if folder is not None and folder.exists() and not folder.is_dir():
            raise ConfigError(f"--offload-folder {folder} is an existing file, not a directory.")
        return Placement(parse_device_map(self.device_map),
                         parse_max_memory(self.max_memory) if self.max_memory is not None else None,
                         self.offload_folder)

    def stored_options(self) -> dict:
        # as cache.json holds them (a tuple comes back a list), so a resume compares like with like
        return {name: list(v) if isinstance(v := getattr(self, name), tuple) else v for name in STORED_OPTIONS}


def _as_tuple(value) -> tuple:
    return () if value is None else (value,) if isinstance(value, (str, Path)) else tuple(value)


@dataclass
class BuildSummary:
    out: str
    samples: int
    rejects: Counter = field(default_factory=Counter)
    skipped_done: int = 0
    cached_total: int = 0  # samples in the whole cache, earlier runs of a resume included
    bytes_per_sample: float = 0.0  # the shards' bytes per sample, as `cache stats` counts them
    fixed: dict = field(default_factory=dict)  # what the cache holds once (tokenizer, cache.json, ...): bytes
    images: int = 0
    distinct_images: int = 0
    seconds: float = 0.0
    placement: dict = field(default_factory=dict)  # device -> modules of the teacher there (with --device-map)
    notes: list = field(default_factory=list)  # things the user should hear once (columns left unread, ...)


def check_images_kept(source, cfg: BuildConfig) -> None:
    """--no-store-images leaves distill to find images under one --images root: refuse it
    where that cannot work (images that exist only as bytes in a dataset, several roots)."""
    if cfg.store_images:
        return
    roots = {spec.images for spec in source.specs}
    if len(roots) > 1:
        raise ConfigError("--no-store-images with sources whose images live under different roots: distill "
                          "takes one --images root, so the cache must keep the images; drop --no-store-images.")
    bytes_only = [spec.name for spec in source.specs if spec.images is None and source.has_image_column(spec)]
    if bytes_only:
        raise ConfigError(f"--no-store-images with {bytes_only[0]}, whose images exist only as bytes inside the "
                          "dataset: distill could never see them; drop --no-store-images.")


def check_resume_options(existing: dict, cfg: BuildConfig, identity: dict) -> None:
    """Refuse to resume a cache written with different stored options or another teacher."""
    old_opts = existing.get("build_options", {})
    for name, value in cfg.stored_options().items():
        if name in old_opts and old_opts[name] != value:
            raise ConfigError(
                f"cache {cfg.out} was built with --{name.replace('_', '-')}={old_opts[name]} "
                f"but this run asks for {value}; rerun with the same option or pass --overwrite."
            )
    old_teacher = existing.get("teacher", {})
    old_rev, new_rev = old_teacher.get("revision"), identity.get("revision")
    if old_rev and new_rev and old_rev != new_rev:  # a local directory records none: its fingerprints decide
        raise ConfigError(
            f"cache {cfg.out} was built by a different teacher (revision {old_rev}, and --teacher {cfg.teacher} "
            f"is revision {new_rev}); use the same teacher or pass --overwrite."
        )
    for key in ("config_sha256", "weights_fingerprint", "tokenizer_fingerprint"):
        if key in old_teacher and old_teacher[key] != identity[key]:
            raise ConfigError(
                f"cache {cfg.out} was built by a different teacher ({key} differs); "
                "use the same teacher or pass --overwrite."
            )


def save_tokenizer(tokenizer, store, teacher_dir: Path | None = None) -> None:
    """Keep the teacher's tokenizer in the cache (`store`), so distill can check a student against
    it after the teacher directory is gone, and beside it the teacher's processor files
    (`PROCESSOR_FILES`), whose settings `cache show` needs to lay out the vision tokens.
    Written whole under a temporary name, then published (renamed, or uploaded to object storage)."""
    def save(into: Path) -> None:
        tokenizer.save_pretrained(into)
        for name in PROCESSOR_FILES if teacher_dir is not None else ():
            if (Path(teacher_dir) / name).is_file():
                shutil.copyfile(Path(teacher_dir) / name, into / name)

    store.write_dir(TOKENIZER_DIR, save)


def cache_json_digest(store) -> str | None:
    """sha256 of the store's cache.json (its created_at makes it this cache's), None without one."""
    import hashlib

    from alignkd.storage_schemas import CACHE_JSON

    return hashlib.sha256(store.read_bytes(CACHE_JSON)).hexdigest() if store.is_file(CACHE_JSON) else None


def check_same_out(cfg: BuildConfig, store, digest: str) -> None:
    """A rank > 0 must see the cache rank 0 opened: a per-node --out would split the cache in two.
    A shared filesystem may show a new file late, so a missing one is waited for a little."""
    from alignkd.distributed import dist_info

    deadline = time.monotonic() + SAME_OUT_WAIT_S
    while (mine := cache_json_digest(store)) != digest and time.monotonic() < deadline:
        time.sleep(0.5)
    if mine != digest:
        seen = "without rank 0's cache.json" if mine is None else "with a cache.json that is not rank 0's"
        raise ConfigError(f"every node must see the same --out: rank {dist_info().rank} sees {cfg.out} {seen} "
                          "(give every node a shared directory, or a cache on object storage).")


def plan_rows(cfg: BuildConfig, dist):
    """What a rank knows before its teacher loads: the sources (sampled), and its own rows
    (`row % world_size == rank`, within --limit) with their keys and ids. Every rank reads
    every id, since a repeated id's key depends on the rows before it; see
    `alignkd.data.row_ids` for what that costs (bench/manifest_scale.py measures this function)."""
    from alignkd.data.mixture import MixedSource, source_specs

    source = MixedSource(source_specs(cfg.data, cfg.images), seed=cfg.seed)
    share = source.share(dist.rank, dist.world_size, cfg.limit)
    check_images_kept(source, cfg)
    return source, share


def build_cache(cfg: BuildConfig) -> BuildSummary:
    """Run the teacher over `cfg.data` once and write the cache at `cfg.out`.

    Under torchrun each rank takes the manifest rows with `row % world_size == rank` and
    writes its own shards; rank 0 creates the cache first and rebuilds the catalog last.
    `cfg.out` is opened once, here: the writer, the catalog, the tokenizer and the closing
    footprint all get this store (so all resolve the cache's root alike).
    """
    import numpy as np

    from alignkd.cache.catalog import rebuild_catalog
    from alignkd.cache.layer0_store import kit_record, save_kit
    from alignkd.cache.inspection.stats import build_footprint
    from alignkd.cache.storage import open_store
    from alignkd.cache.teacher.teacher_pass import TeacherPass
    from alignkd.cache.writer import CacheWriter
    from alignkd.data import REASONS
    from alignkd.data.render import ANSWER_END
    from alignkd.distributed import all_reduce_sum, init_process_group, meet

    start = time.perf_counter()
    dist = init_process_group()
    if cfg.device_map is not None and dist.local_world_size > 1:
        raise ConfigError(f"--device-map spreads the teacher over all of a node's GPUs, so run one process per node "
                          f"(torchrun --nproc-per-node 1), not {dist.local_world_size}; the nodes split the manifest.")
    source, share = plan_rows(cfg, dist)  # images stay on disk until their batch
    teacher = TeacherPass(cfg, dist)
    meta = {"teacher": teacher.identity, "teacher_shapes": teacher.shapes,
            "build_options": {**cfg.stored_options(), "answer_end": ANSWER_END, "sources": source.plan()},
            "manifest": [str(Path(s.path).resolve()) for s in source.specs] if len(source.specs) > 1
            else str(Path(source.specs[0].path).resolve())}
    summary = BuildSummary(out=cfg.out, samples=0, placement=teacher.placement)
    if source.ignored_columns:
        summary.notes.append(f"columns alignkd does not read were left out: {', '.join(source.ignored_columns)}")
    store = open_store(cfg.out)
    if not dist.is_main:  # rank 0 creates (or clears, with --overwrite) the cache first
        check_same_out(cfg, store, meet("opened", "create or open the cache", cfg.timeout)[0])
    kit = teacher.layer0_kit  # --attn-store layer0: written once, beside the tokenizer
    with CacheWriter(store, meta, shard_size=cfg.shard_size, attn_dtype=cfg.attn_dtype, attn_topk=cfg.attn_topk,
                     share_vision=cfg.share_vision, attn_store=cfg.attn_store, skip=cfg.skip,
                     layer0_kit=None if kit is None else kit_record(kit),
                     vision_dtype=cfg.vision_dtype, store_images=cfg.store_images,
                     overwrite=cfg.overwrite and dist.is_main, rank=dist.rank) as writer:
        if dist.is_main and dist.world_size > 1:
            meet("opened", "create or open the cache", cfg.timeout, cache_json_digest(store))
        if writer.existing_meta is not None:
            check_resume_options(writer.existing_meta, cfg, teacher.identity)
            if writer.rank == 0:
                # A build killed between a shard's rename and its catalog row leaves
                # catalog.duckdb a shard behind; the shard directories are the truth.
                rebuild_catalog(store)
        if dist.is_main:
            save_tokenizer(teacher.vlm.processor.tokenizer, store, teacher.vlm.path)
            if kit is not None:
                save_kit(writer.store, kit)
        # this rank's rows only: under torchrun the ranks' counts are summed below
        todo = share.rows[~np.isin(share.rows, np.fromiter(writer.done_rows, np.int64))]
        summary.skipped_done = len(share.rows) - len(todo)
        for outcome in teacher.run(source.records(todo, share.key), total=len(todo)):
            if outcome.reject is not None:
                err = outcome.reject
                writer.reject(err.sample_id, err.row, err.reason, str(err), record_id=share.record_id(err.row),
                              source=source.source_name(err.row))
                summary.rejects[err.reason] += 1
            else:
                rec = outcome.record
                rec.record_id, rec.source = share.record_id(rec.manifest_row), source.source_name(rec.manifest_row)
                writer.add(rec)
                summary.samples += 1
    if dist.world_size > 1:
        # a rank that hangs is named every REPORT_EVERY_S, and --timeout bounds the wait
        meet("finished", "finish their rows", cfg.timeout)
        if dist.is_main:
            rebuild_catalog(store)
        reasons = sorted(REASONS)
        totals = [int(v) for v in all_reduce_sum(
            [summary.samples, summary.skipped_done] + [summary.rejects[r] for r in reasons])]
        summary.samples, summary.skipped_done = totals[:2]
        summary.rejects = Counter({r: n for r, n in zip(reasons, totals[2:]) if n})
    footprint = build_footprint(store)
    summary.cached_total, summary.bytes_per_sample = footprint["samples"], footprint["bytes_per_sample"]
    summary.fixed, summary.images = footprint["fixed"], footprint["images"]
    summary.distinct_images = footprint["distinct_images"]
    summary.seconds = time.perf_counter() - start
    return summary
