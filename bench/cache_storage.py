"""Cache storage at MobileVLM-V2-7B shapes: bytes per sample and gradient fidelity per storage
choice, then writer and reader throughput side by side with per-sample safetensors.

Synthetic but realistic tensors: 32 heads x T_text ~ U[50, 600] x 144 vision tokens of
layer-0 softmax probabilities (a BOS sink plus ~35 prefix and the causal text keys share
the row, so vision probabilities are ~1e-3), vision tokens 144 x 4096 with per-channel
scales and a few outlier channels, top-64 logits at T/2 response positions.

Fidelity is judged by the training signal: the cosine between the student's gradient from
the stored targets and from the fp32 targets, over every trainable parameter of a
1.4B-shaped student stand-in (bench/standin_student.py), for the `full` preset on the normalized
scale and for each term alone.

Throughput is measured side by side in one run against per-sample safetensors files
holding the same tensors at the same widths (fp16 attention/vision). "Cold" means each
file's pages were dropped from the OS page cache first (fsync, then
posix_fadvise(DONTNEED), which needs no root), a fresh reader, each sample read once in
random order; the DataLoader rows start cold too, as a cache far larger than RAM would.
Reads return stored widths (what the distill DataLoader ships).

    .venv/bin/python -m bench.cache_storage [--samples 64] [--grad-samples 4] [--workdir /tmp/alignkd-bench]
    .venv/bin/python -m bench.cache_storage --skip-fidelity --s3      # + moto S3 against local disk
    .venv/bin/python -m bench.cache_storage --layer0 [--shapes llava-1.5-7b]   # maps vs --attn-store layer0
    .venv/bin/python -m bench.synthetic_layer0 [--batch 8]   # the kit's memory, one recompute's peak

`--layer0`: the records' attention is computed by a synthetic 7B-wide teacher's layer 0
(bench/synthetic_layer0.py says exactly what is synthetic), and the table sets a few maps
tiers beside the `--attn-store layer0` tiers (no rows stored, the kit once, rows recomputed
from the stored vision tokens by the reader, as `alignkd distill` recomputes them); the
throughput part then compares the two stores side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from alignkd.cache.reader import open_cache
from alignkd.cache.writer import CacheWriter, SampleRecord
from alignkd.distill.dataset import CachedDistillDataset, collate_distill
from alignkd.models.layer0_kit import Layer0Kit

H, D, K, VOCAB = 32, 4096, 64, 32000
SHAPES = {"mobilevlm-v2-7b": 144, "llava-1.5-7b": 576}  # vision tokens per image; both are Vicuna-7B wide
NV = SHAPES["mobilevlm-v2-7b"]  # set by --shapes


def synth(i: int, rng: np.random.Generator) -> SampleRecord:
    T = int(rng.integers(50, 601))
    z = rng.normal(0, 1.0, (T, H, NV)).astype(np.float32)
    other = np.exp(4.0) + (35 + NV + np.arange(1, T + 1))[:, None, None] * np.exp(0.5)  # sink + rest
    ez = np.exp(z)
    attn = (ez / (ez.sum(-1, keepdims=True) + other - NV * np.exp(0.5))).astype(np.float32)
    scale = np.exp(rng.normal(-1.0, 0.5, D)).astype(np.float32)
    scale[rng.choice(D, 8, replace=False)] *= 20  # outlier channels, as in LLaMA embeddings
    vision = (rng.standard_normal((NV, D), dtype=np.float32) * scale).astype(np.float32)
    P = T // 2
    logp = np.sort(-np.log(rng.zipf(1.3, (P, K)).astype(np.float32) * 50), axis=1)[:, ::-1]
    ids = np.stack([rng.choice(VOCAB, K, replace=False) for _ in range(P)]).astype(np.int64)
    L = 35 + NV + T
    return SampleRecord(
        sample_id=f"s{i}", manifest_row=i, input_ids=rng.integers(0, VOCAB, L).astype(np.int32),
        label_mask=np.arange(L) >= L - P, vision_positions=np.arange(35, 35 + NV, dtype=np.int32),
        text_positions=np.arange(L - T, L, dtype=np.int32), attn=attn, vision=vision,
        focus=attn.mean(1).sum(0), logit_positions=np.arange(L - P - 1, L - 1, dtype=np.int32),
        logit_ids=ids, logit_values=logp.astype(np.float32),
        logit_tail=(1 - np.exp(logp).sum(1)).clip(0).astype(np.float32),
        teacher_ce=1.0, teacher_entropy=2.0, teacher_tail_mass=0.1)


# (attention dtype, vision dtype, --attn-topk): 0 keeps every column
CHOICES = [("bfloat16", "bfloat16", 0), ("float16", "float16", 0), ("uint8-sqrt", "bfloat16", 0),
           ("uint8-log", "bfloat16", 0), ("uint8-sqrt", "int8-channel", 0), ("uint8-log", "int8-channel", 0),
           ("uint4-log", "int8-channel", 0), ("uint4-log", "int4-channel", 0),
           ("uint8-log", "int8-channel", 128), ("uint8-log", "int8-channel", 64), ("uint8-log", "int8-channel", 32),
           ("uint8-log", "int4-channel", 64)]
# --layer0: (attention store or maps dtype, vision dtype, kit dtype); maps tiers keep every column
LAYER0_CHOICES = [("bfloat16", "bfloat16", None), ("uint8-log", "bfloat16", None),
                  ("uint8-log", "int8-channel", None), ("uint4-log", "int4-channel", None),
                  ("layer0", "bfloat16", "float32"), ("layer0", "int8-channel", "float32"),
                  ("layer0", "int4-channel", "float32"), ("layer0", "bfloat16", "bfloat16")]


def raw_tensors(rec: SampleRecord) -> dict:
    """The safetensors reference: the same tensors, attention/vision/log-probs in fp16."""
    return {"attn": rec.attn.astype(np.float16), "vision": rec.vision.astype(np.float16),
            "focus": rec.focus, "logit_ids": rec.logit_ids.astype(np.int32),
            "logit_values": rec.logit_values.astype(np.float16), "logit_tail": rec.logit_tail,
            "input_ids": rec.input_ids, "label_mask": rec.label_mask.astype(np.uint8),
            "text_positions": rec.text_positions, "logit_positions": rec.logit_positions}


def raw_bytes(rec: SampleRecord) -> int:
    return sum(a.nbytes for a in raw_tensors(rec).values())


def write_cache(path: Path, recs, kit=None, **kw) -> float:
    """Seconds from the first add to a closed cache (creation and imports excluded). With
    `kit` (KitBytes) an --attn-store layer0 cache: the kit written once, as `cache build` does."""
    from alignkd.cache.layer0_store import kit_record, save_kit

    if "://" not in str(path):
        shutil.rmtree(path, ignore_errors=True)
    meta = {"bench": True, "teacher_shapes": {"vocab_size": VOCAB}}
    if kit is not None:
        kw.update(attn_store="layer0", layer0_kit=kit_record(kit))
    with CacheWriter(path, meta, shard_size=16, store_images=False, **kw) as w:
        start = time.perf_counter()
        if kit is not None:
            save_kit(w.store, kit)
        for r in recs:
            w.add(r)
    return time.perf_counter() - start


def bytes_by_kind(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for shard_json in (path / "shards").glob("shard-*/shard.json"):
        for f in json.loads(shard_json.read_text())["files"]:
            kind = f["path"].split("/")[0] if "/" in f["path"] else "rows+meta"
            kind = kind.replace("_scale", "")  # scales count with their tensor
            out[kind] = out.get(kind, 0) + f["bytes"]
    return out


def write_safetensors(path: Path, recs) -> float:
    from safetensors.numpy import save_file

    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    start = time.perf_counter()
    for r in recs:
        f = path / f"{r.sample_id}.safetensors"
        save_file(raw_tensors(r), str(f))
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    return time.perf_counter() - start


class SafetensorsDataset:
    """Per-sample safetensors -> the distill item (same keys and widths as CachedDistillDataset's)."""

    def __init__(self, path: Path, n: int) -> None:
        self.path, self.n = path, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        import torch
        from safetensors.numpy import load_file

        t = {k: torch.from_numpy(v) for k, v in load_file(str(self.path / f"s{i}.safetensors")).items()}
        ids = t["input_ids"].long()
        return {"input_ids": ids, "labels": ids.masked_fill(t["label_mask"] == 0, -100),
                "t_text_positions": t["text_positions"].long(), "t_logit_positions": t["logit_positions"].long(),
                "t_logit_ids": t["logit_ids"].long(), "t_focus": t["focus"], "t_logit_tail": t["logit_tail"],
                "t_attn": t["attn"], "t_vision": t["vision"], "t_logit_values": t["logit_values"]}


class StoredReads:
    """In-process reads as the distill dataset does them: stored widths (crc32 off, as after verify)."""

    def __init__(self, path: Path) -> None:
        self.reader = open_cache(path)

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int):
        return self.reader.get(i, widen=False)


def drop_page_cache(root: Path) -> None:
    """Evict every file under `root` from the page cache, so the next read goes to the disk."""
    for f in root.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def read_random(ds, order) -> float:
    start = time.perf_counter()
    for i in order:
        ds[int(i)]
    return len(order) / (time.perf_counter() - start)


def read_loader(ds, sampler, batch_size: int = 8) -> float:
    """Samples/s through DataLoader(num_workers=2) with the distill collate, as `alignkd distill` runs it."""
    from functools import partial

    from torch.utils.data import DataLoader

    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=2, prefetch_factor=4,
                        collate_fn=partial(collate_distill, pad_token_id=0))
    start = time.perf_counter()
    n = sum(len(b["input_ids"]) for b in loader)
    return n / (time.perf_counter() - start)


def fidelity(work: Path, recs, grad_n: int) -> None:
    from bench import standin_student as standin

    sub = recs[:grad_n]
    objective = standin.build_objective(sub, VOCAB, teacher_heads=H, teacher_dim=D)
    reference = standin.summed_gradients(objective, sub)
    print("## (a) bytes per sample and gradient fidelity against fp32 targets\n")
    print(f"Gradient cosines over {grad_n} samples (summed gradients), student stand-in at 1.4B shapes; "
          "`full` is the `full` preset on the normalized scale (CE + logit + vision + attention KL, all weight 1).\n")
    print("Columns `1-cos`: one minus the gradient cosine (0.999 is 1e-3).\n")
    print("Cosines are of the student's gradient (its parameters only); the last column is the adapters' "
          "gradient under the full objective (bench/standin_student.py says why it is kept apart).\n")
    print("| attn | vision | top-k | MB/sample | attn MB | vision MB | logits MB | 1-cos full | 1-cos attn (mse) | "
          "1-cos attn (kl) | 1-cos vis | 1-cos logit | 1-cos adapters | write MB/s raw |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for attn_dtype, vision_dtype, top_k in CHOICES:
        path = work / f"cache-{attn_dtype}-{vision_dtype}-{top_k}"
        secs = write_cache(path, recs, attn_dtype=attn_dtype, vision_dtype=vision_dtype, attn_topk=top_k)
        kinds = bytes_by_kind(path)
        n = len(recs)
        logits = sum(v for k, v in kinds.items() if k.startswith("logit")) / n
        reader = open_cache(path)
        stored = standin.summed_gradients(objective, [reader.get(i, widen=False) for i in range(grad_n)])
        c = standin.cosines(stored, reference)
        raw = sum(raw_bytes(r) for r in recs)
        attn_bytes = sum(v for k, v in kinds.items() if k.startswith("attn"))
        print(f"| {attn_dtype} | {vision_dtype} | {top_k or 'all'} | {sum(kinds.values()) / n / 1e6:.2f} | "
              f"{attn_bytes / n / 1e6:.2f} | "
              f"{kinds['vision'] / n / 1e6:.2f} | {logits / 1e6:.3f} | {1 - c['full']:.1e} | {1 - c['attn']:.1e} | "
              f"{1 - c['attn_kl']:.1e} | {1 - c['vis']:.1e} | {1 - c['logit']:.1e} | {1 - c['full@adapters']:.1e} | "
              f"{raw / secs / 1e6:.0f} |")


def fidelity_layer0(work: Path, recs, grad_n: int, kit) -> None:
    """Maps tiers beside --attn-store layer0 tiers, on rows the synthetic teacher's layer 0 made."""
    from bench import standin_student as standin
    from bench import synthetic_layer0

    sub = recs[:grad_n]
    objective = standin.build_objective(sub, VOCAB, teacher_heads=H, teacher_dim=D)
    reference = standin.summed_gradients(objective, sub)
    kits = {"float32": kit, "bfloat16": synthetic_layer0.bf16_kit(kit)}
    print(f"## (a3) maps vs --attn-store layer0, {NV} vision tokens; rows made by the synthetic teacher's layer 0 "
          f"(row entropy over the vision keys {synthetic_layer0.row_entropy_share(recs):.0%} of uniform)\n")
    print("Judge and columns as in (a); `kit MB` is what a layer0 cache holds once (the synthetic teacher's "
          "float32 kit, or its bf16 cast), not per sample. layer0 rows are the reader's: recomputed on the CPU "
          "from the stored vision tokens.\n")
    print("| attn | vision | kit | MB/sample | attn MB | vision MB | logits MB | kit MB (once) | 1-cos full | "
          "1-cos attn (mse) | 1-cos attn (kl) | 1-cos vis | 1-cos logit | 1-cos adapters |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for attn_dtype, vision_dtype, kit_dtype in LAYER0_CHOICES:
        path = work / f"cache-{attn_dtype}-{vision_dtype}-{kit_dtype}"
        this_kit = kits.get(kit_dtype)
        write_cache(path, recs, kit=this_kit, vision_dtype=vision_dtype,
                    **({} if this_kit else {"attn_dtype": attn_dtype}))
        kinds = bytes_by_kind(path)
        n = len(recs)
        reader = open_cache(path)
        # layer0: the widened read recomputes the rows (the same function the training step runs, batched)
        stored = standin.summed_gradients(objective, [reader.get(i, widen=this_kit is not None)
                                                      for i in range(grad_n)])
        c = standin.cosines(stored, reference)
        logits = sum(v for k, v in kinds.items() if k.startswith("logit")) / n
        attn_bytes = sum(v for k, v in kinds.items() if k.startswith("attn"))
        kit_mb = f"{len(this_kit.weights) / 1e6:.0f}" if this_kit else "–"
        print(f"| {attn_dtype} | {vision_dtype} | {kit_dtype or '–'} | {sum(kinds.values()) / n / 1e6:.3f} | "
              f"{attn_bytes / n / 1e6:.3f} | {kinds['vision'] / n / 1e6:.3f} | {logits / 1e6:.3f} | {kit_mb} | "
              f"{1 - c['full']:.1e} | {1 - c['attn']:.1e} | {1 - c['attn_kl']:.1e} | {1 - c['vis']:.1e} | "
              f"{1 - c['logit']:.1e} | {1 - c['full@adapters']:.1e} |")


def read_widened(path: Path, n: int) -> float:
    """Samples/s of `reader[i]` (float32, a layer0 cache's rows recomputed on this CPU): what
    `cache show` and third-party code get; the kit's load is paid before the clock starts."""
    reader = open_cache(path)
    if reader.attn_store == "layer0":
        reader.layer0_kit()
    return read_random(reader, range(n))


def throughput_stores(work: Path, recs, kit, attn_dtype: str, vision_dtype: str) -> None:
    """The maps store against layer0 (same vision dtype), side by side, each pass cold."""
    paths = {"maps": work / "tp-maps", "layer0": work / "tp-layer0"}
    write_cache(paths["maps"], recs, attn_dtype=attn_dtype, vision_dtype=vision_dtype)
    write_cache(paths["layer0"], recs, kit=kit, vision_dtype=vision_dtype)
    order = np.random.default_rng(1).permutation(len(recs))
    print(f"\n## (b3) maps ({attn_dtype} attention) vs layer0, {vision_dtype} vision, {len(recs)} samples, "
          f"{NV} vision tokens; cold = page cache dropped before each pass\n")
    rows = {}
    for _ in range(2):  # alternate, twice; the faster pass of each counts
        for store, path in paths.items():
            ds = CachedDistillDataset(str(path), processor=None)
            drop_page_cache(path)
            got = [read_random(StoredReads(path), order)]
            drop_page_cache(path)
            got.append(read_loader(ds, order_sampler(ds, ORDERS[0])))
            got.append(read_widened(path, min(16, len(recs))))
            rows[store] = [max(a, b) for a, b in zip(rows.get(store, [0.0] * 3), got)]
    names = ["reader, cold random, samples/s (stored widths: what a DataLoader worker reads)",
             "distill DataLoader(num_workers=2, batch 8), cold, samples/s",
             "reader[i], float32 rows (layer0: recomputed on 1 CPU thread), samples/s"]
    print("| measure | maps | layer0 | layer0 / maps |")
    print("|---|---|---|---|")
    for k, name in enumerate(names):
        print(f"| {name} | {rows['maps'][k]:.1f} | {rows['layer0'][k]:.1f} | {rows['layer0'][k] / rows['maps'][k]:.2f} |")


def order_sampler(ds, order: str):
    from alignkd.distill.sampling import make_sampler, parse_order

    return make_sampler(parse_order(order), ds.reader.shard_of, seed=0)


ORDERS = ("uniform", "window:4")  # distill's default order, and the shard window it replaced


def throughput(work: Path, recs, attn_dtype: str, vision_dtype: str) -> None:
    print(f"\n## (b) throughput over {len(recs)} samples, side by side ({attn_dtype} attention, {vision_dtype} "
          "vision vs fp16 safetensors per sample)\n")
    path, st_path = work / "cache-throughput", work / "safetensors"
    raw = sum(raw_bytes(r) for r in recs)
    # writes alternate, twice each, and the faster of each side counts: one fsync stall on a
    # shared disk otherwise decides the ratio
    st_secs = ours_secs = float("inf")
    for _ in range(2):
        st_secs = min(st_secs, write_safetensors(st_path, recs))
        ours_secs = min(ours_secs, write_cache(path, recs, attn_dtype=attn_dtype, vision_dtype=vision_dtype))
    order = np.random.default_rng(1).permutation(len(recs))
    ours_ds = CachedDistillDataset(str(path), processor=None)
    sampler = order_sampler(ours_ds, ORDERS[0])
    st_ds = SafetensorsDataset(st_path, len(recs))
    rows = [("writer, MB/s raw (fsync incl.; best of 2)", raw / ours_secs / 1e6, raw / st_secs / 1e6, "≥ 300")]
    reads = {"ours": [lambda: read_random(StoredReads(path), order), lambda: read_loader(ours_ds, sampler)],
             "ref": [lambda: read_random(st_ds, order), lambda: read_loader(st_ds, [int(i) for i in order])]}
    names = [("reader, cold random, samples/s (stored widths)", "≥ 250"),
             ("distill DataLoader(num_workers=2, batch 8), cold, samples/s", "≥ 150")]
    for k, (name, target) in enumerate(names):  # each side starts with its files out of the page cache
        drop_page_cache(path)
        ours = reads["ours"][k]()
        drop_page_cache(st_path)
        rows.append((name, ours, reads["ref"][k](), target))
    # a second epoch: what the cold pass left in the page cache (all of it, if RAM allows)
    rows.append(("distill DataLoader(num_workers=2, batch 8), warm, samples/s", reads["ours"][1](),
                 reads["ref"][1](), "≥ 150"))
    print("| measure | alignkd cache | safetensors per sample | ratio | target |")
    print("|---|---|---|---|---|")
    for name, ours, ref, target in rows:
        print(f"| {name} | {ours:.0f} | {ref:.0f} | {ours / ref:.2f} | {target} |")
    print_order_costs("local disk", str(path), local=True)


def print_order_costs(where: str, path: str, local: bool) -> None:
    """The read cost of the training order: the same DataLoader pass under each order, cold,
    alternating twice (the faster of each counts). Each order's reader is set up as distill
    sets it up: whole-shard read-ahead for the window order only."""
    best = dict.fromkeys(ORDERS, 0.0)
    for _ in range(2):
        for order in ORDERS:
            if local:
                drop_page_cache(Path(path))
            ds = CachedDistillDataset(path, processor=None, prefetch_shards=order.startswith("window"))
            best[order] = max(best[order], read_loader(ds, order_sampler(ds, order)))
    print(f"\n{where}, DataLoader(num_workers=2, batch 8), cold, samples/s by training order "
          f"({len(ds)} samples in {len(set(ds.shard_of.tolist()))} shards):\n")
    print("| " + " | ".join(ORDERS) + f" | {ORDERS[0]} / {ORDERS[1]} |")
    print("|---" * (len(ORDERS) + 1) + "|")
    print("| " + " | ".join(f"{best[o]:.0f}" for o in ORDERS) + f" | {best[ORDERS[0]] / best[ORDERS[1]]:.2f} |")


def start_moto() -> object:
    """A moto S3 server with the bucket `alignkd-bench`, the AWS environment pointing at it."""
    import logging

    from tests.support.s3 import start_moto as start_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    return start_server("alignkd-bench", key="bench")[0]


def object_storage(work: Path, recs, attn_dtype: str, vision_dtype: str) -> None:
    """Samples/s from a moto S3 server against local disk, same cache, same reads."""
    server = start_moto()
    try:
        url, local = "s3://alignkd-bench/cache", work / "cache-local"
        raw = sum(raw_bytes(r) for r in recs)
        s3_secs = write_cache(url, recs, attn_dtype=attn_dtype, vision_dtype=vision_dtype)
        local_secs = write_cache(local, recs, attn_dtype=attn_dtype, vision_dtype=vision_dtype)
        order = np.random.default_rng(2).permutation(len(recs))
        print(f"\n## (c) object storage: moto S3 on 127.0.0.1 against local disk ({attn_dtype} / {vision_dtype})\n")
        print("| measure | moto S3 | local disk | ratio |")
        print("|---|---|---|---|")
        remote_reads = read_random(StoredReads(url), order)
        drop_page_cache(local)  # local reads start cold, as in (b)
        rows = [("writer, MB/s raw", raw / s3_secs / 1e6, raw / local_secs / 1e6),
                ("reader, cold random, samples/s", remote_reads, read_random(StoredReads(local), order))]
        loaders = [CachedDistillDataset(p, processor=None) for p in (url, str(local))]
        rows.append(("distill DataLoader(num_workers=2, batch 8), samples/s",
                     *[read_loader(ds, order_sampler(ds, ORDERS[0])) for ds in loaders]))
        for name, a, b in rows:
            print(f"| {name} | {a:.0f} | {b:.0f} | {a / b:.2f} |")
        print_order_costs("moto S3", url, local=False)
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=64, help="samples in the fidelity and object-storage parts")
    ap.add_argument("--throughput-samples", type=int, default=256,
                    help="samples in the throughput part (the DataLoader's worker start-up is amortised over them)")
    ap.add_argument("--grad-samples", type=int, default=4, help="samples in the gradient-fidelity sums")
    ap.add_argument("--workdir", default="/tmp/alignkd-bench")
    ap.add_argument("--attn-dtype", default="uint8-log", help="storage of the throughput cache (default: the default)")
    ap.add_argument("--vision-dtype", default="bfloat16", help="storage of the throughput cache (default: the default)")
    ap.add_argument("--skip-fidelity", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--s3", action="store_true", help="also read through a local moto S3 server (moto[server])")
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="mobilevlm-v2-7b",
                    help="vision tokens per sample: 144 (MobileVLM-V2-7B) or 576 (LLaVA-1.5-7B)")
    ap.add_argument("--layer0", action="store_true",
                    help="rows from a synthetic 7B-wide layer 0; maps tiers beside --attn-store layer0 tiers")
    args = ap.parse_args()
    global NV
    NV = SHAPES[args.shapes]
    work = Path(args.workdir)
    import duckdb, zarr  # noqa: F401,E401  one-time import cost, paid before the first shard
    import torch

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    recs = [synth(i, rng) for i in range(max(args.samples, 0 if args.skip_throughput else args.throughput_samples))]
    raw = np.mean([raw_bytes(r) for r in recs[:args.samples]])
    print(f"# {args.samples} samples, mean T_text {np.mean([r.attn.shape[0] for r in recs[:args.samples]]):.0f}; "
          f"raw (fp16 attn/vision/log-probs) {raw / 1e6:.2f} MB/sample\n")
    kit = None
    if args.layer0:
        from bench import synthetic_layer0

        kit = synthetic_layer0.build_kit()
        synthetic_layer0.with_kit_attention(recs, Layer0Kit(kit))
    if not args.skip_fidelity:
        if kit is not None:
            fidelity_layer0(work, recs[:args.samples], args.grad_samples, kit)
        else:
            fidelity(work, recs[:args.samples], args.grad_samples)
    if not args.skip_throughput:
        if kit is not None:
            throughput_stores(work, recs[:args.throughput_samples], kit, args.attn_dtype, args.vision_dtype)
        else:
            throughput(work, recs[:args.throughput_samples], args.attn_dtype, args.vision_dtype)
    if args.s3:
        object_storage(work, recs[:args.samples], args.attn_dtype, args.vision_dtype)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
