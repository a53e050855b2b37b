"""GPU figures at real shapes with random-initialised models (no weights needed): one script, < 8 min on one GPU.

Teacher: Vicuna-7B-shaped Llama (d 4096, 32 layers, 32 heads, MLP 11008, vocabulary 32000)
under a CLIP-L/14 tower (d 1024, 24 layers) at 336 px (576 vision tokens) or at 168 px
(144 tokens, the count MobileVLM's projector pools 576 down to), bf16. Student:
MobileLLaMA-1.4B-shaped (d 2048, 24 layers, 16 heads, MLP 5632) under the same tower.

It reports, as absolute GPU numbers:
  1. capture overhead: `capture_forward` against a plain sdpa forward of the teacher;
  2. cache build samples/s (capture + per-sample records + CacheWriter.add, i.e. the build
     loop minus image decoding) against a plain forward;
  3. the distill step from the cache against CE only and against online KD (teacher
     forward + targets + the same objective), forward + backward + AdamW;
  4. peak memory of online KD (teacher and student resident) against offline (student only);
  5. a teacher on `--device-map auto` (issue 18): the same teacher saved to disk and loaded by
     `load_vlm` with a device map over every visible GPU, and with `--max-memory` holding
     GPU 0 to a third of the teacher so the rest is offloaded to CPU (run on GPU 0 through
     accelerate's hooks); its capture against the teacher whole on GPU 0 (largest
     differences of layer-0 attention, vision tokens, logits) and the time of each;
  6. one FSDP distill step (issue 18): `torchrun --nproc-per-node <GPUs>` running the
     Trainer with `--fsdp "full_shard auto_wrap"`'s settings (alignkd.distill.sharding) on the
     student, bf16, from cached records, then the full state dict gathered on rank 0, the
     export, and `from_pretrained` of the export compared with the gathered weights.

Run it first on a lent device, before anything else (the suite never needs it):

    python -m bench.gpu_check [--vision-tokens 576] [--batch 4] [--text 300] [--repeats 5] [--json out.json]
    python -m bench.gpu_check --sections device-map,fsdp      # only the issue-18 checks
    python -m bench.gpu_check --tiny --device cpu     # the same code path at tiny shapes, to check it runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

VOCAB = 32000
PREFIX = 35  # system prompt and "USER:" before the image


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vision-tokens", type=int, choices=(144, 576), default=576)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--text", type=int, default=300, help="text tokens after the image per sample")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per measure (medians reported)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test of this script)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--sections", default="base,device-map,fsdp",
                    help="comma list of: base (1-4), device-map (5), fsdp (6)")
    ap.add_argument("--map-layers", type=int, default=8, help="teacher layers in the device-map check (saved to disk)")
    ap.add_argument("--fsdp-worker", default=None, help=argparse.SUPPRESS)  # set by section 6 for its torchrun
    return ap.parse_args(argv)


def specs(args):
    from alignkd.demo.tiny_models import TinyLlavaSpec

    if args.tiny:
        t = TinyLlavaSpec(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, image_size=32, patch_size=8)
        return t, replace(t, hidden_size=32, num_heads=2, intermediate_size=64)
    image = 336 if args.vision_tokens == 576 else 168
    clip = dict(image_size=image, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16)
    teacher = TinyLlavaSpec(hidden_size=4096, num_layers=32, num_heads=32, intermediate_size=11008, **clip)
    student = TinyLlavaSpec(hidden_size=2048, num_layers=24, num_heads=16, intermediate_size=5632, **clip)
    return teacher, student


def build_model(spec, device, dtype, tiny: bool):
    import torch
    from transformers import LlavaForConditionalGeneration

    from alignkd.demo.tiny_models import build_llava_config, build_word_tokenizer

    tok = build_word_tokenizer()
    config = build_llava_config(tok, spec)
    config.vision_config.intermediate_size = 4 * spec.vision_hidden
    if not tiny:
        config.text_config.vocab_size = VOCAB
        config.text_config.max_position_embeddings = 4096
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval(), tok


def make_batch(args, spec, tok, device, dtype, seed=0):
    """Right-padded batch: prefix, the image tokens, then text; the last half of the text is the answer."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n_img = spec.num_image_tokens
    n_words = len(tok)
    image_id = tok.convert_tokens_to_ids("<image>")
    ids = torch.randint(5, n_words, (args.batch, PREFIX + n_img + args.text), generator=g)
    ids[:, PREFIX:PREFIX + n_img] = image_id
    labels = ids.clone()
    labels[:, : PREFIX + n_img + args.text // 2] = -100
    pixels = torch.randn(args.batch, 3, spec.image_size, spec.image_size, generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device, dtype), "labels": labels.to(device)}


def timed(fn, repeats: int, device) -> float:
    import torch

    fn()  # warm-up (kernels, allocator)
    times = []
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def records_for(batch, cap):
    from alignkd.cache.teacher.teacher_pass import batch_samples, records_from_capture

    return records_from_capture(batch_samples(batch, cap), batch, cap, logit_mode="topk", logit_k=16,
                                logit_samples=64, positions_policy="response", seed=0, store_images=False)


def student_batch(records, pixels, device):
    from alignkd.distill.dataset import collate_distill, item_from_record

    items = [item_from_record(r, {"pixel_values": pixels[b:b + 1].cpu()}) for b, r in enumerate(records)]
    batch = collate_distill(items, pad_token_id=0)
    return {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.fsdp_worker:
        return fsdp_worker(args)
    sections = set(args.sections.split(","))
    out: dict = {}
    if "base" in sections:
        out.update(base_checks(args))
    if "device-map" in sections:
        out["device_map"] = check_device_map(args)
    if "fsdp" in sections:
        out["fsdp_step"] = check_fsdp_step(args)
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return out


def base_checks(args) -> dict:
    import torch

    from alignkd.cache.reader import open_cache
    from alignkd.cache.writer import CacheWriter
    from alignkd.distill.objective import AlignKDObjective, LossWeights
    from alignkd.models import capture_forward

    dev, dtype = args.device, torch.float32 if args.tiny else torch.bfloat16
    t_spec, s_spec = specs(args)
    teacher, tok = build_model(t_spec, dev, dtype, args.tiny)
    batch = make_batch(args, t_spec, tok, dev, dtype)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out: dict = {"shapes": {"vision_tokens": t_spec.num_image_tokens, "batch": args.batch,
                            "seq": batch["input_ids"].shape[1], "device": dev, "dtype": str(dtype)}}

    with torch.no_grad():
        plain = timed(lambda: teacher(**inputs), args.repeats, dev)
    capture = timed(lambda: capture_forward(teacher, inputs), args.repeats, dev)
    out["capture"] = {"plain_s": plain, "capture_s": capture, "ratio": capture / plain}

    cache = tempfile.mkdtemp(prefix="gpu-check-cache-")
    meta = {"teacher_shapes": {"vocab_size": teacher.config.text_config.vocab_size}}
    with CacheWriter(cache + "/c", meta) as writer:
        def build_step():
            for r in records_for(batch, capture_forward(teacher, inputs)):
                r.sample_id = f"{r.sample_id}-{time.perf_counter_ns()}"
                writer.add(r)
        build = timed(build_step, args.repeats, dev)
    out["build"] = {"plain_samples_s": args.batch / plain, "build_samples_s": args.batch / build,
                    "ratio": build / plain}

    student, _ = build_model(s_spec, dev, dtype, args.tiny)
    student.train()
    objective = AlignKDObjective(student, teacher_heads=t_spec.num_heads, teacher_dim=t_spec.hidden_size,
                                 weights=LossWeights(), logit_mode="topk", logit_samples=64,
                                 loss_scale="normalized").to(dev)
    opt = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-5)
    reader = open_cache(cache + "/c", images=False)

    def step(b):
        opt.zero_grad(set_to_none=True)
        objective(**b)["loss"].backward()
        opt.step()

    def from_cache():
        step(student_batch([reader.get(i, widen=False) for i in range(args.batch)], batch["pixel_values"], dev))

    def online():
        with torch.no_grad():
            cap = capture_forward(teacher, inputs)
        step(student_batch(records_for(batch, cap), batch["pixel_values"], dev))

    peaks = {}
    online_s = timed(online, args.repeats, dev)
    peaks["online_gb"] = torch.cuda.max_memory_allocated() / 2**30 if dev != "cpu" else float("nan")
    del teacher
    if dev != "cpu":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cached_s = timed(from_cache, args.repeats, dev)
    peaks["offline_gb"] = torch.cuda.max_memory_allocated() / 2**30 if dev != "cpu" else float("nan")
    objective.weights = LossWeights(ce=1.0, logit=0.0, vis=0.0, attn=0.0)
    ce_batch = student_batch([reader.get(i, widen=False) for i in range(args.batch)], batch["pixel_values"], dev)
    ce_s = timed(lambda: step(ce_batch), args.repeats, dev)
    out["distill_step"] = {"ce_only_s": ce_s, "from_cache_s": cached_s, "online_kd_s": online_s,
                           "cache_vs_ce": cached_s / ce_s, "online_vs_cache": online_s / cached_s}
    out["peak_memory"] = peaks
    return out


# ------------------------------------------------------------------ 5. a teacher on a device map
def check_device_map(args) -> dict:
    """The teacher dispatched by accelerate (over all GPUs; then GPU 0 + CPU offload; on CPU:
    cpu + disk) against the teacher whole: capture differences and forward times."""
    import torch

    from alignkd.models import capture_forward, load_vlm
    from alignkd.models.placement import Placement, input_device, placement_counts

    dev = args.device
    dtype = torch.float32 if args.tiny else torch.bfloat16
    t_spec, _ = specs(args)
    if not args.tiny:
        t_spec = replace(t_spec, num_layers=args.map_layers)  # saved to disk and read back: keep it to ~4 GB
    teacher, tok = build_model(t_spec, dev, dtype, args.tiny)  # random init is fast on the GPU
    root = tempfile.mkdtemp(prefix="gpu-check-map-")
    save_teacher(teacher, tok, t_spec, root + "/teacher")
    del teacher
    batch = make_batch(args, t_spec, tok, "cpu", dtype)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    dt = str(dtype).split(".")[1]
    whole = load_vlm(root + "/teacher", dtype=dt, device=dev)
    ref = capture_forward(whole.model, {k: v.to(dev) for k, v in inputs.items()})
    ref_s = timed(lambda: capture_forward(whole.model, {k: v.to(dev) for k, v in inputs.items()}), args.repeats, dev)
    ref = {k: getattr(ref, k).float().cpu() for k in ("attn_text_vision", "vision_tokens", "logits")}
    del whole
    if dev != "cpu":
        torch.cuda.empty_cache()
    n_gpus = torch.cuda.device_count() if dev != "cpu" else 0
    size = sum(p.numel() * p.element_size() for p in build_model(t_spec, "meta", dtype, args.tiny)[0].parameters())
    if dev == "cpu":  # the CPU smoke: half in memory, the rest on disk
        placements = {"cpu+disk": Placement("auto", {"cpu": int(size * 0.5)}, root + "/offload")}
    else:
        placements = {f"auto over {n_gpus} GPU(s)": Placement("auto"),
                      "GPU 0 + CPU offload": Placement("auto", {0: int(size / 3), "cpu": 4 * size}, root + "/offload")}
    results = {"teacher_gb": size / 2**30, "whole_capture_s": ref_s}
    for name, placement in placements.items():
        vlm = load_vlm(root + "/teacher", dtype=dt, placement=placement)
        here = input_device(vlm.model)
        on = {k: v.to(here) for k, v in inputs.items()}
        cap = capture_forward(vlm.model, on)
        got = {k: getattr(cap, k).float().cpu() for k in ref}
        results[name] = {"placed": placement_counts(vlm.model), "inputs_on": str(here),
                         "capture_s": timed(lambda: capture_forward(vlm.model, on), max(1, args.repeats // 2), dev),
                         **{f"max_abs_diff_{k}": float((got[k] - ref[k]).abs().max()) for k in ref}}
        del vlm
        if dev != "cpu":
            torch.cuda.empty_cache()
    return results


def save_teacher(model, tok, spec, path: str) -> None:
    """A model directory load_vlm accepts: weights, config, and the word-level processor."""
    from alignkd.demo.tiny_models import build_processor

    model.save_pretrained(path)
    build_processor(tok, spec).save_pretrained(path)


# ------------------------------------------------------------------ 6. one FSDP distill step
def check_fsdp_step(args) -> dict:
    """torchrun over every GPU (2 CPU processes for --tiny), one FSDP step, gather, export, reload."""
    import os
    import subprocess
    import sys

    import torch

    n = torch.cuda.device_count() if args.device != "cpu" else 2
    result = tempfile.mkdtemp(prefix="gpu-check-fsdp-") + "/result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(max(n, 1)), "--master-addr",
           "127.0.0.1", "--master-port", str(_free_port()), __file__, "--fsdp-worker", result,
           "--device", args.device, "--batch", str(args.batch), "--text", str(args.text),
           "--vision-tokens", str(args.vision_tokens), *(["--tiny"] if args.tiny else [])]
    start = time.perf_counter()
    # the repository root on the ranks' path: the CPU smoke test imports tests/fsdp_on_cpu.py
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr[-4000:]}
    with open(result) as fh:
        return {**json.load(fh), "processes": max(n, 1), "wall_s_incl_start": time.perf_counter() - start}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class CheckRun:
    """Stands for DistillConfig in the export's distill_run.json: the fields the run record reads."""

    run: str = "bench/gpu_check.py section 6: one FSDP step"
    student: str = "in-memory-student"  # built in code, no directory
    cache: str = "no-cache"             # the targets are captured in the step


def fsdp_worker(args) -> dict:
    """One rank of section 6: the objective on the Trainer with alignkd's FSDP settings."""
    import os

    import torch
    from transformers import TrainingArguments

    from alignkd.distill.trainer import AlignKDTrainer
    from alignkd.distill.export import export_student
    from alignkd.distill.objective import AlignKDObjective, LossWeights
    from alignkd.distill.sharding import fsdp_arguments, gather_state_dict, wrap_classes
    from alignkd.models import capture_forward

    if args.device == "cpu":  # the smoke test: accelerate's FSDP on gloo (tests/fsdp_on_cpu.py)
        from tests.fsdp_on_cpu import allow_fsdp_on_cpu

        allow_fsdp_on_cpu()
    rank = int(os.environ["RANK"])
    dev = f"cuda:{os.environ['LOCAL_RANK']}" if args.device != "cpu" else "cpu"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    t_spec, s_spec = specs(args)
    teacher, tok = build_model(replace(t_spec, num_layers=2) if not args.tiny else t_spec, dev, dtype, args.tiny)
    batch = make_batch(args, t_spec, tok, dev, dtype, seed=rank)
    records = records_for(batch, capture_forward(teacher, {k: v for k, v in batch.items() if k != "labels"}))
    del teacher
    from alignkd.distill.dataset import collate_distill, item_from_record

    items = [item_from_record(r, {"pixel_values": batch["pixel_values"][b:b + 1].float().cpu()})
             for b, r in enumerate(records)]
    torch.manual_seed(0)
    student, _ = build_model(s_spec, dev, torch.float32, args.tiny)  # fp32 master weights, bf16 compute
    student.train()
    objective = AlignKDObjective(student, teacher_heads=t_spec.num_heads, teacher_dim=t_spec.hidden_size,
                                 weights=LossWeights(), logit_mode="topk", logit_samples=64,
                                 loss_scale="normalized")
    out = tempfile.mkdtemp(prefix=f"gpu-check-fsdp-r{rank}-")
    sharding = fsdp_arguments(("full_shard", "auto_wrap"), wrap_classes(student, ("LlamaDecoderLayer",)))
    targs = TrainingArguments(output_dir=out + "/ckpt", max_steps=1, per_device_train_batch_size=args.batch,
                              bf16=not args.tiny, report_to=[], save_strategy="no", remove_unused_columns=False,
                              use_cpu=args.device == "cpu", ddp_backend="gloo" if args.device == "cpu" else None,
                              disable_tqdm=True, logging_steps=1, **sharding)
    trainer = AlignKDTrainer(model=objective, args=targs, train_dataset=items,
                             data_collator=lambda its: collate_distill(its, 0))
    start = time.perf_counter()
    result = trainer.train()
    step_s = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev != "cpu" else float("nan")
    state = gather_state_dict(trainer)
    if not trainer.is_world_process_zero():
        return {}
    from transformers import AutoModelForImageTextToText

    export = Path(out) / "export"
    export_student(objective, tok, export, CheckRun(), {}, state_dict=state)  # what `distill` runs on rank 0
    reloaded = AutoModelForImageTextToText.from_pretrained(export, dtype=torch.float32)
    pairs = [(p.detach(), state[f"student.{n}"]) for n, p in reloaded.named_parameters() if f"student.{n}" in state]
    figures = {"fsdp_enabled": trainer.is_fsdp_enabled,
               "student_params_m": sum(p.numel() for p in reloaded.parameters()) / 1e6,
               "train_s_one_step": step_s, "loss": float(result.training_loss), "peak_gb_rank0": peak,
               "export_vs_gathered_max_abs": max(float((a - b.float()).abs().max()) for a, b in pairs),
               "compared_tensors": f"{len(pairs)} of {len(list(reloaded.parameters()))} student parameters",
               "gathered_tensors": len(state)}
    with open(args.fsdp_worker, "w") as fh:
        json.dump(figures, fh)
    return figures


if __name__ == "__main__":
    main()
