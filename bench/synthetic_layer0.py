"""A synthetic 7B-wide teacher's layer 0, for bench/cache_storage.py's `--attn-store layer0` tiers.

What is real and what is synthetic:
- real: the modules. A transformers `LlavaForConditionalGeneration` built from a config at
  LLaVA-1.5-7B / MobileVLM-V2-7B width (Llama text model, hidden 4096, 32 heads, head dim
  128, rotary theta 10000, vocabulary 32064 with the image token at 32000, as llava-1.5-hf)
  cut to ONE decoder layer, with a 1-layer 32-wide CLIP tower and an MLP width of 16 (neither
  is in the kit, and neither changes layer 0's attention). The kit is cut out of it with
  `extract_kit` and read back with `Layer0Kit`, exactly as `cache build --attn-store layer0`
  and the reader do.
- synthetic: the weights (transformers' own init, normal(0, 0.02), the norm at 1), so the
  attention scores have std ~1.6 before the softmax and no BOS sink; the text token ids
  (uniform over the 32000 text rows); the vision tokens (bench/cache_storage.py's `synth`:
  per-channel scales and 8 outlier channels). The teacher computes in float32, so the
  reference rows (what every tier is judged against) are float32 and the kit is float32
  (2x the bytes of the bf16 kit a bf16 teacher's cache holds; docs/scale.md has those).

The records' attention is the kit's own float32 rows on the float32 vision tokens, so a maps
tier stores exactly what a live capture of this teacher would, and a layer0 tier recomputes
them from its stored (maybe quantised) vision tokens.
"""

from __future__ import annotations

import numpy as np
import torch

VOCAB, IMAGE_TOKEN, HIDDEN, HEADS = 32064, 32000, 4096, 32


def teacher_config():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                       num_hidden_layers=1, intermediate_size=16, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, rope_theta=10000.0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=32)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                         vision_feature_layer=-1, tie_word_embeddings=True)
    config.architectures = ["LlavaForConditionalGeneration"]
    return config


def build_kit(seed: int = 0):
    """KitBytes of a randomly initialised 1-layer teacher at 7B width (float32)."""
    from transformers import LlavaForConditionalGeneration

    from alignkd.models.layer0_kit import extract_kit

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(teacher_config()).eval()
    kit = extract_kit(model)
    del model
    return kit


def bf16_kit(kit):
    """The same kit with its weights in bfloat16 (a bf16 teacher's kit); buffers (rotary
    frequencies) keep their float32."""
    from safetensors.torch import load, save

    from alignkd.models.layer0_kit import KitBytes

    tensors = load(kit.weights)
    weights = {n: t.to(torch.bfloat16) if n.endswith("weight") else t for n, t in tensors.items()}
    return KitBytes(config=kit.config, weights=save(weights, metadata={"format": "alignkd-layer0-kit/1",
                                                                       "family": "llava"}))


def with_kit_attention(recs, kit) -> None:
    """Give each record image tokens at its vision positions and the kit's float32 rows as its
    attention (and the focus derived from them), as a live capture of this teacher would."""
    from alignkd.cache.layer0_store import rows_of_record

    for r in recs:
        ids = np.asarray(r.input_ids) % IMAGE_TOKEN  # text ids stay below the image token
        ids[r.vision_positions] = IMAGE_TOKEN
        r.input_ids = ids.astype(np.int32)
        r.attn = rows_of_record(kit, r)
        r.focus = r.attn.mean(1).sum(0)


def row_entropy_share(recs) -> float:
    """Mean entropy of the rows renormalised over the vision keys, as a share of log(Nv)."""
    out = []
    for r in recs:
        p = r.attn / r.attn.sum(-1, keepdims=True)
        out.append(float((-(p * np.log(np.clip(p, 1e-30, None))).sum(-1)).mean() / np.log(p.shape[-1])))
    return float(np.mean(out))


def _gb_resident() -> float:
    import os

    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def kit_memory(batch: int, n_vision: int, n_text: int) -> None:
    """The kit's resident memory and one batched recompute's transient peak, on this CPU (Linux):
    resident set sizes, the peak sampled every 5 ms while the forward runs."""
    import threading
    import time

    from alignkd.models.layer0_kit import Layer0Kit

    kit = build_kit()
    layer0 = Layer0Kit(kit)
    del kit  # the bytes went with it: what stays is the kit's tensors
    resident = _gb_resident()
    L = 35 + n_vision + n_text
    ids = torch.randint(0, IMAGE_TOKEN, (batch, L))
    ids[:, 35:35 + n_vision] = IMAGE_TOKEN
    peak, done = [resident], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak.append(_gb_resident())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    layer0.text_vision_rows({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                            torch.randn(batch, n_vision, HIDDEN), torch.arange(L - n_text, L).repeat(batch, 1))
    secs = time.perf_counter() - start
    done.set()
    sampler.join()
    print(f"float32 kit at d {HIDDEN}: {kit_tensor_gb(layer0):.2f} GB of tensors held; batch {batch}, "
          f"L {L}, {n_text} text rows: forward {secs:.1f} s on {torch.get_num_threads()} thread(s), transient peak "
          f"+{max(peak) - resident:.2f} GB")


def kit_tensor_gb(layer0) -> float:
    """GB of the kit's tensors as loaded."""
    names = {id(t): t for t in [*layer0.model.parameters(), *layer0.model.buffers()] if not t.is_meta}
    return sum(t.numel() * t.element_size() for t in names.values()) / 1e9


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="the synthetic kit's memory and one recompute's peak")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vision", type=int, default=576)
    ap.add_argument("--text", type=int, default=343)
    args = ap.parse_args()
    torch.set_num_threads(1)
    kit_memory(args.batch, args.vision, args.text)
