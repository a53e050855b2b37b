"""Offline probe (issue 24, int4 tier): would a finer int4 scale or a rotation before quantising
keep the layer0 KL attention term at MobileVLM-V2-7B shapes? Not a cache format: each scheme
quantises and dequantises the vision tokens in memory, the synthetic 7B-wide kit recomputes the
rows from them (as a layer0 cache's reader does), and the student stand-in's gradient judges
every term against the fp32 targets, as bench/cache_storage.py's (a3) table does.

Schemes (4-bit codes, q in [-7, 7], symmetric max-|x| scales stored as fp16 unless named):
- `int4-channel`: the format's encoding (one float32 scale per channel over the sample's tokens);
- `token gN`: one scale per token and group of N channels;
- `chan+token gN`: divide by the per-channel scale first (stored once per sample), then token gN;
- `hadamard gN`: a fixed random-sign Walsh-Hadamard rotation of the channels (orthogonal,
  spreads the outlier channels), then token gN, rotated back after dequantising;
- `intB-channel` (B = 5, 6; `--schemes`): the format's per-channel scheme with B bits, to show
  what bit depth the KL term needs (bytes counted as if packed at B bits).

    .venv/bin/python -m bench.int4_vision_probe [--grad-samples 4]
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch

OTHER_MB = 0.044  # per-sample bytes besides vision in (a3)'s layer0 int4 row (logits, focus, ids): 0.353 - 0.309


def int4(x: np.ndarray, group: int) -> tuple[np.ndarray, int]:
    """Per-token groups of `group` channels, fp16 max-|x| scales: (dequantised, bytes)."""
    n, d = x.shape
    g = x.reshape(n, d // group, group)
    s = (np.abs(g).max(-1, keepdims=True) / 7).astype(np.float16).astype(np.float32)
    s[s == 0] = 1
    q = np.clip(np.rint(g / s), -7, 7)
    return (q * s).reshape(n, d), n * d // 2 + s.size * 2


def hadamard(x: np.ndarray) -> np.ndarray:
    """Orthonormal Walsh-Hadamard transform over the last axis (a power of two)."""
    y, h = x.astype(np.float64).copy(), 1
    d = y.shape[-1]
    while h < d:
        y = y.reshape(-1, d // (2 * h), 2, h)
        y = np.stack([y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]], axis=2).reshape(-1, d)
        h *= 2
    return (y / np.sqrt(d)).astype(np.float32)


def schemes(d: int) -> dict:
    from alignkd.cache.encodings import CODECS

    signs = np.random.default_rng(1).choice([-1.0, 1.0], d).astype(np.float32)

    def format_int4(x):
        codec = CODECS["int4-channel"]
        stored, scale = codec.encode(x)
        return codec.decode(stored, scale, x.shape).reshape(x.shape), stored.nbytes + scale.nbytes

    def chan_token(group):
        def run(x):
            c = (np.abs(x).max(0) / 7).astype(np.float16).astype(np.float32)
            c[c == 0] = 1
            y, b = int4(x / c, group)
            return y * c, b + c.size * 2
        return run

    def rotated(group):
        def run(x):
            y, b = int4(hadamard(x * signs), group)
            return hadamard(y) * signs, b  # the Hadamard matrix is its own inverse
        return run

    def bf16(x):
        return torch.from_numpy(x).bfloat16().float().numpy(), x.size * 2

    out = {"bfloat16": bf16, "int4-channel": format_int4}
    for g in (128, 64, 32):
        out[f"token g{g}"] = lambda x, g=g: int4(x, g)
    for g in (128, 32):
        out[f"chan+token g{g}"] = chan_token(g)
    for g in (128, 64, 32):
        out[f"hadamard g{g}"] = rotated(g)
    for bits in (5, 6):
        out[f"int{bits}-channel"] = lambda x, bits=bits: channel(x, 2 ** (bits - 1) - 1, bits)
    return out


def channel(x: np.ndarray, top: int, bits: int) -> tuple[np.ndarray, int]:
    """Per-channel max-|x| scales (float32) over the sample's tokens, q in [-top, top]."""
    s = np.abs(x).max(0) / top
    s[s == 0] = 1
    return np.clip(np.rint(x / s), -top, top) * s, x.size * bits // 8 + s.size * 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grad-samples", type=int, default=4)
    ap.add_argument("--schemes", nargs="*", help="only these schemes (names as in the table)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from bench import cache_storage, synthetic_layer0
    from bench import standin_student as standin

    from alignkd.cache.layer0_store import rows_of_record
    from alignkd.models.layer0_kit import Layer0Kit

    start = time.perf_counter()
    rng = np.random.default_rng(0)  # cache_storage's seed: its first samples
    recs = [cache_storage.synth(i, rng) for i in range(args.grad_samples)]
    kit = Layer0Kit(synthetic_layer0.build_kit())
    synthetic_layer0.with_kit_attention(recs, kit)
    objective = standin.build_objective(recs, cache_storage.VOCAB, cache_storage.H, cache_storage.D)
    reference = standin.summed_gradients(objective, recs)
    print(f"{args.grad_samples} samples, mean T_text {np.mean([r.attn.shape[0] for r in recs]):.0f}, "
          f"{cache_storage.NV} vision tokens x {cache_storage.D}; setup {time.perf_counter() - start:.0f} s\n")
    print("| vision scheme | vision MB | MB/sample (est.) | 1-cos attn (kl) | 1-cos attn (mse) | 1-cos vis | "
          "1-cos full | vision rel. RMS error |")
    print("|---|---|---|---|---|---|---|---|")
    for name, quant in schemes(cache_storage.D).items():
        if args.schemes and name not in args.schemes:
            continue
        stored, nbytes = [], 0
        for r in recs:
            s = copy.copy(r)
            s.vision, b = quant(r.vision)
            s.vision = s.vision.astype(np.float32)
            s.attn = rows_of_record(kit, s)
            nbytes += b
            stored.append(s)
        err = np.sqrt(sum(((s.vision - r.vision) ** 2).sum() for s, r in zip(stored, recs))
                      / sum((r.vision ** 2).sum() for r in recs))
        c = standin.cosines(standin.summed_gradients(objective, stored), reference)
        mb = nbytes / len(recs) / 1e6
        print(f"| {name} | {mb:.3f} | {mb + OTHER_MB:.3f} | {1 - c['attn_kl']:.1e} | {1 - c['attn']:.1e} | "
              f"{1 - c['vis']:.1e} | {1 - c['full']:.1e} | {err:.3f} |", flush=True)


if __name__ == "__main__":
    main()
