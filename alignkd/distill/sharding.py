"""A student bigger than one GPU: the Hugging Face Trainer's FSDP, set from two options.

`--fsdp "full_shard auto_wrap"` takes the Trainer's own words (full_shard, shard_grad_op,
offload, auto_wrap) and `--fsdp-wrap-class` names the layer class each FSDP unit holds
(default: the student's own `_no_split_modules` that it really contains, as accelerate
would pick for a bare model). They become `TrainingArguments(fsdp=True, fsdp_config=...)`
for FSDP2 (`fully_shard`); nothing else of the engine changes.

Why FSDP and not DeepSpeed ZeRO: FSDP2 ships with torch (no extra build, no CUDA
extension to compile), is what transformers now defaults to, and shards parameters,
gradients and optimizer state as ZeRO-3 does. The objective (student + adapters) is
wrapped whole: the adapters sit in the root unit and are sharded and reduced with it.

Checkpoints are SHARDED_STATE_DICT (every rank writes its own shard through
torch.distributed.checkpoint: no rank-0 gather, and a resume may use another world size);
the final export gathers the full, unsharded state dict on rank 0 (`gather_state_dict`).
"""

from __future__ import annotations

from alignkd.errors import ConfigError

FSDP_WORDS = ("full_shard", "shard_grad_op", "offload", "auto_wrap")
FSDP1_ONLY = ("hybrid_shard", "hybrid_shard_zero2", "no_shard")


def parse_fsdp(text: str) -> tuple[str, ...]:
    """The Trainer's --fsdp words, checked: one sentence for anything FSDP2 cannot do."""
    words = tuple(text.split())
    for word in words:
        if word in FSDP1_ONLY:
            raise ConfigError(f"--fsdp {word} is an FSDP1 strategy, which transformers deprecates; alignkd runs FSDP2: "
                              f"use full_shard or shard_grad_op.")
        if word not in FSDP_WORDS:
            raise ConfigError(f"--fsdp {text!r}: {word!r} is not one of {', '.join(FSDP_WORDS)}.")
    if "full_shard" in words and "shard_grad_op" in words:
        raise ConfigError("--fsdp takes one of full_shard and shard_grad_op, not both.")
    return words


def wrap_classes(student, names: tuple[str, ...]) -> list[str]:
    """The layer classes FSDP shards by: the given names, each present in the student, or the
    student's own `_no_split_modules` that it contains."""
    present = {type(m).__name__ for m in student.modules()}
    if names:
        missing = [n for n in names if n not in present]
        if missing:
            layers = sorted(n for n in present if n.endswith(("DecoderLayer", "EncoderLayer", "Layer", "Block")))
            raise ConfigError(f"--fsdp-wrap-class {missing[0]}: the student has no module of that class "
                              f"(its layer classes: {', '.join(layers) or 'none'}).")
        return list(names)
    found = sorted(n for n in (getattr(student, "_no_split_modules", None) or ()) if n in present)
    if not found:
        raise ConfigError(f"--fsdp needs --fsdp-wrap-class here: {type(student).__name__} declares no layer class to "
                          "shard by (name its decoder layer class, e.g. LlamaDecoderLayer).")
    return found


def fsdp_arguments(words: tuple[str, ...], classes: list[str]) -> dict:
    """TrainingArguments keywords for FSDP2 (no FSDP: none)."""
    if not words:
        return {}
    config = {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
              "transformer_layer_cls_to_wrap": classes,
              "reshard_after_forward": "shard_grad_op" not in words,
              "state_dict_type": "SHARDED_STATE_DICT"}
    if "offload" in words:
        config["cpu_offload"] = True
    return {"fsdp": True, "fsdp_config": config}


def check_fsdp_launch(words: tuple[str, ...], launched: bool, grad_share_steps: int) -> None:
    """`launched`: a launcher (torchrun) started this process; one process is fine (FSDP with
    `offload` keeps parameters and optimizer state on the CPU of a single GPU's host)."""
    if not words:
        return
    if not launched:
        raise ConfigError("--fsdp shards the student over the processes of a launcher: run distill under torchrun, "
                          "e.g. torchrun --nproc-per-node 8 --no-python alignkd distill ... (one process per GPU).")
    if grad_share_steps:
        # FSDP swaps the sharded parameters back in after each forward, so autograd.grad
        # on the student's parameters would see none of the graph.
        raise ConfigError("--grad-share-steps measures per-parameter gradients, which FSDP keeps sharded; "
                          "measure the shares in a run without --fsdp.")


def check_fsdp_engaged(words: tuple[str, ...], trainer) -> None:
    """accelerate turns FSDP on only on accelerators (GPUs, ...); on a CPU-only machine it would
    silently train with DDP, so say so instead."""
    if words and not trainer.is_fsdp_enabled:
        raise ConfigError("--fsdp was not taken up: accelerate runs FSDP on GPUs (or other accelerators) only, and "
                          "this run has none; drop --fsdp to train with DDP.")


def gather_state_dict(trainer) -> dict | None:
    """The objective's full, unsharded state dict on rank 0 (every rank must call this: under
    FSDP it is a collective; other ranks get an empty dict). None without FSDP: the export
    then reads the modules themselves."""
    if not trainer.is_fsdp_enabled:
        return None
    return trainer.accelerator.get_state_dict(trainer.model)
