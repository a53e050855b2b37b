"""Cache storage at MobileVLM-V2-7B shapes: bytes per sample, writer and reader throughput.

Synthetic but realistic tensors: 32 heads x T_text ~ U[50, 600] x 144 vision tokens of
layer-0 softmax probabilities (a BOS sink plus ~35 prefix and the causal text keys share
the row, so vision probabilities are ~1e-3), vision tokens 144 x 4096 with per-channel
scales and a few outlier channels, top-64 logits at T/2 response positions.

Everything is measured side by side in one run against per-sample safetensors files
(fp16 attention/vision, the "raw" reference). The OS page cache cannot be dropped on a
shared box, so "cold" means a fresh reader, each sample read once in random order.

    .venv/bin/python bench/cache_storage.py [--samples 48] [--workdir /tmp/alignkd-bench]
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

H, NV, D, K, VOCAB = 32, 144, 4096, 64, 32000


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
        teacher_ce=1.0, teacher_entropy=2.0, teacher_tail_mass=0.1, image_path=None, image_sha256=None,
        image_bytes=None)


def raw_tensors(rec: SampleRecord) -> dict:
    """The safetensors reference: fp16 attention/vision, compact logits."""
    return {"attn": rec.attn.astype(np.float16), "vision": rec.vision.astype(np.float16),
            "focus": rec.focus, "logit_ids": rec.logit_ids.astype(np.int32),
            "logit_values": rec.logit_values, "logit_tail": rec.logit_tail}


def raw_bytes(rec: SampleRecord) -> int:
    return sum(a.nbytes for a in raw_tensors(rec).values())


def row_kl(p: np.ndarray, q: np.ndarray) -> float:
    """Mean KL over (text row, head) of the attention renormalised over the vision keys."""
    p = p / p.sum(-1, keepdims=True)
    q = np.maximum(q, 1e-12)
    q = q / q.sum(-1, keepdims=True)
    return float(np.mean(np.sum(p * np.log(np.maximum(p, 1e-30) / q), -1)))


def write_cache(path: Path, recs, **kw) -> float:
    """Seconds from the first add to a closed cache (creation and imports excluded)."""
    shutil.rmtree(path, ignore_errors=True)
    with CacheWriter(path, {"bench": True}, shard_size=64, store_images=False, **kw) as w:
        start = time.perf_counter()
        for r in recs:
            w.add(r)
    return time.perf_counter() - start


def bytes_by_kind(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for shard_json in (path / "shards").glob("shard-*/shard.json"):
        for f in json.loads(shard_json.read_text())["files"]:
            kind = f["path"].split("/")[0] if "/" in f["path"] else "rows+meta"
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
    def __init__(self, path: Path, n: int) -> None:
        self.path, self.n = path, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        from safetensors.numpy import load_file

        t = load_file(str(self.path / f"s{i}.safetensors"))
        return {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in t.items()}


class ReaderDataset:
    """What the distill dataset does: the CachedSample's tensors as a dict."""

    def __init__(self, path: Path) -> None:
        self.reader = open_cache(path)

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> dict:
        s = self.reader[i]
        return {"attn": s.attn, "vision": s.vision, "focus": s.focus, "logit_ids": s.logit_ids,
                "logit_values": s.logit_values, "logit_tail": s.logit_tail}


def read_random(ds, order) -> float:
    start = time.perf_counter()
    for i in order:
        ds[int(i)]
    return len(order) / (time.perf_counter() - start)


def read_loader(ds, order) -> float:
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(ds, batch_size=None, sampler=[int(i) for i in order], num_workers=2,
                        collate_fn=lambda d: {k: torch.from_numpy(v) for k, v in d.items()})
    start = time.perf_counter()
    n = sum(1 for _ in loader)
    return n / (time.perf_counter() - start)


def read_zarr_python(path: Path, order) -> float:
    """zarr-python 3.1 slicing of the same arrays, for reference (no decoding to float32)."""
    import zarr

    start = time.perf_counter()
    groups: dict = {}
    reader = open_cache(path)
    for i in order:
        i = int(i)
        shard = reader._shard_dirs[int(reader._shard_of[i])]
        g = groups.setdefault(shard, zarr.open_group(shard, mode="r"))
        c = {k: int(v[i]) for k, v in reader._cols.items() if k.endswith("_offset")}
        size = {"attn": int(reader._cols["n_text"][i]) * H * NV, "vision": NV * D}
        for kind in ("attn", "vision"):
            g[kind][c[f"{kind}_offset"]:c[f"{kind}_offset"] + size[kind]]
    return len(order) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--workdir", default="/tmp/alignkd-bench")
    args = ap.parse_args()
    work = Path(args.workdir)
    import duckdb, zarr  # noqa: F401,E401  one-time import cost, paid before the first shard
    rng = np.random.default_rng(0)
    recs = [synth(i, rng) for i in range(args.samples)]
    raw = np.mean([raw_bytes(r) for r in recs])
    fp16_attn_vision = np.mean([(r.attn.size + r.vision.size) * 2 for r in recs])
    print(f"# {args.samples} samples, mean T_text {np.mean([r.attn.shape[0] for r in recs]):.0f}; "
          f"raw fp16 attn+vision {fp16_attn_vision / 1e6:.2f} MB, raw incl. logits {raw / 1e6:.2f} MB/sample\n")

    print("## (a) bytes per sample\n")
    print("| attn | vision | MB/sample | attn MB | vision MB | logits MB | vs raw | attn row-KL vs fp32 | write MB/s raw |")
    print("|---|---|---|---|---|---|---|---|---|")
    options = [("bfloat16", "bfloat16"), ("float16", "float16"), ("uint8-sqrt", "bfloat16"),
               ("uint8-sqrt", "float16")]
    sub = recs[:8]
    for attn_dtype, vision_dtype in options:
        path = work / f"cache-{attn_dtype}-{vision_dtype}"
        secs = write_cache(path, recs, attn_dtype=attn_dtype, vision_dtype=vision_dtype)
        kinds = bytes_by_kind(path)
        total = sum(kinds.values()) / len(recs)
        logits = sum(v for k, v in kinds.items() if k.startswith("logit")) / len(recs)
        reader = open_cache(path)
        kl = np.mean([row_kl(r.attn, reader[i].attn) for i, r in enumerate(sub)])
        print(f"| {attn_dtype} | {vision_dtype} | {total / 1e6:.2f} | {kinds['attn'] / len(recs) / 1e6:.2f} | "
              f"{kinds['vision'] / len(recs) / 1e6:.2f} | {logits / 1e6:.3f} | {raw / total:.2f}x | {kl:.1e} | "
              f"{raw * len(recs) / secs / 1e6:.0f} |")

    print("\n## (b) throughput, side by side (bf16 attention and vision vs fp16 safetensors)\n")
    main_path = work / "cache-bfloat16-bfloat16"
    st_path = work / "safetensors"
    st_secs = write_safetensors(st_path, recs)
    ours_secs = write_cache(main_path, recs)
    order = np.random.default_rng(1).permutation(len(recs))
    rows = [
        ("writer, MB/s raw (fsync incl.)", raw * len(recs) / ours_secs / 1e6, raw * len(recs) / st_secs / 1e6, "≥ 300"),
        ("reader, cold random, samples/s", read_random(ReaderDataset(main_path), order),
         read_random(SafetensorsDataset(st_path, len(recs)), order), "≥ 250"),
        ("reader, DataLoader(num_workers=2), samples/s", read_loader(ReaderDataset(main_path), order),
         read_loader(SafetensorsDataset(st_path, len(recs)), order), "≥ 150"),
        ("zarr-python slicing (attn+vision only), samples/s", read_zarr_python(main_path, order), float("nan"), "-"),
    ]
    print("| measure | alignkd cache | safetensors per sample | target |")
    print("|---|---|---|---|")
    for name, ours, ref, target in rows:
        print(f"| {name} | {ours:.0f} | {ref:.0f} | {target} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
