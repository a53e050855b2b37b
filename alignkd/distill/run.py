"""`alignkd distill`: train a student from the cache on the Hugging Face Trainer.

The Trainer is the engine so that torchrun/DDP, FSDP, DeepSpeed, gradient
accumulation, bf16, checkpoint resume and TensorBoard behave as its users expect.
We only supply the objective (student + adapters), the cached dataset, per-term
logging and the export of a plain `from_pretrained`-loadable student.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from alignkd.distill.terms import DEFAULT_PRESET, LOSS_TERMS, PRESETS, LossWeights, preset_weights, resolve_attn_loss
from alignkd.errors import AlignKDError, ConfigError, check_at_least_one, check_choices, check_finite, check_out_dir
from alignkd.settings import choices_of, setting
from alignkd.hub import check_model_arg, resolve_model


def _weight(name: str):
    """The w_NAME field of loss term `name` (None: the preset's weight)."""
    spec = LOSS_TERMS[name]
    return setting(None, type=float, help=f"Weight of the {name} term, {spec.help} [default: the preset's, "
                                          f"{spec.default_weight:g} in full].")


@dataclass(frozen=True)
class DistillConfig:
    """Every `alignkd distill` setting, declared once: the command's options are generated from
    these fields (alignkd.settings), and library callers build the same object."""

    student: str = setting(help="Student model (safetensors): a local directory, or a hub id "
                                "org/name[@revision] resolved through the local Hugging Face cache.")
    cache: str = setting(help="Teacher cache from `alignkd cache build`.")
    out: str = setting(help="Output directory for the student, adapters and metrics: new or empty "
                            "(see --resume, --overwrite).")
    images: str | None = setting(None, type=str, help="Image root, when the cache holds no image bytes.")
    epochs: float = setting(1.0)
    max_steps: int = setting(-1, help="Overrides --epochs when positive.")
    batch_size: int = setting(8)
    grad_accum: int = setting(1)
    lr: float = setting(1e-4)
    warmup_ratio: float = setting(0.0)
    weight_decay: float = setting(0.0)
    seed: int = setting(0)
    bf16: bool = setting(False, flag=True, help="bf16 mixed precision.")
    resume: bool = setting(False, flag=True, help="Continue from the last checkpoint of this run (same student "
                                                  "and cache) under OUT.")
    # replace a finished or stopped run in --out (alignkd.distill.outdir)
    overwrite: bool = setting(False, flag=True, help=(
        "Start again in an OUT that holds a run (its files are removed) or other files (kept); never an OUT "
        "that is, holds or lies inside an input (student, cache, images, the cache's teacher)."))
    # The objective: a preset of alignkd.distill.terms (PRESETS) gives every term's weight; a w_NAME
    # set here overrides it (None: the preset's). One field per row of terms.LOSS_TERMS.
    preset: str = setting(DEFAULT_PRESET, choices=lambda: tuple(PRESETS), help=(
        "Named objective: the weight of every loss term (ce: the CE-only baseline; logits: CE + logit KD; "
        "full: Align-KD). A --w-NAME flag overrides its term's weight."))
    w_ce: float | None = _weight("ce")
    w_logit: float | None = _weight("logit")
    w_vis: float | None = _weight("vis")
    w_attn: float | None = _weight("attn")
    temperature: float = setting(1.0)
    align_fade: float = setting(0.0, help="Fade the alignment terms (vision, attention) linearly to 0 over this "
                                          "share of the run, logits and CE throughout (0: constant weights).")
    vision_topk: int | None = setting(None, type=int, help="Vision tokens counted twice by text focus "
                                                           "[default: N_v/9, the paper's 16 of 144].")
    # paper: the best worst-world gain of three worlds (docs/efficacy.md)
    loss_scale: str = setting("paper", choices=("paper", "normalized"), help=(
        "paper: the paper's exact MSE forms; normalized: scale-free terms (docs/method.md). "
        "docs/efficacy.md compares them on three worlds."))
    attn_loss: str = setting("auto", choices=("auto", "mse", "kl"), help="auto: kl under --loss-scale normalized, "
                                                                         "mse under paper.")
    adapters: str = setting("trainable", choices=("trainable", "frozen"))
    freeze: tuple[str, ...] = setting(("vision_tower",), comma=True, help="Comma list of modules to freeze.")
    log: str = setting("jsonl", choices=("jsonl", "tensorboard"))
    verify: bool = setting(True, negatable=True, help="Check every shard's checksums before training (skip for "
                                                      "very large caches).")
    save_steps: int = setting(500)
    logging_steps: int = setting(5)
    grad_share_steps: int = setting(0, help="Every N steps, log each term's share of the student's gradient "
                                            "norm (0: off).")
    progress: bool = setting(True, cli=False)  # the command's --no-progress
    workers: int = setting(2, help="DataLoader worker processes reading the cache.")
    shuffle: str = setting("uniform", help=(
        "Training order: uniform (a new permutation each epoch) or window:N (shards shuffled N at a time, for "
        "caches far larger than memory on remote storage)."))  # alignkd.distill.sampling
    fsdp: str = setting("", show_default=False, help=(
        "Shard the student with the Trainer's FSDP (FSDP2), in its words: \"full_shard auto_wrap\", "
        "shard_grad_op, offload. Needs torchrun and GPUs; see docs/scale.md."))  # alignkd.distill.sharding
    fsdp_wrap_class: tuple[str, ...] = setting((), comma=True, show_default=False, help=(
        "With --fsdp: comma list of layer classes each FSDP unit holds, e.g. LlamaDecoderLayer "
        "[default: the student's own _no_split_modules]."))

    @property
    def given_weights(self) -> frozenset:
        """The w_NAME options set explicitly, not filled in from the preset."""
        return self._given_weights

    @property
    def resolved_attn_loss(self) -> str:
        return resolve_attn_loss(self.attn_loss, self.loss_scale)

    def loss_weights(self):
        """The objective's `LossWeights`: the preset's, with the w_NAME fields given."""
        return LossWeights(**{name: getattr(self, spec.option) for name, spec in LOSS_TERMS.items()})

    def __post_init__(self) -> None:
        check_choices(self, choices_of(DistillConfig))
        weight_options = [spec.option for spec in LOSS_TERMS.values()]
        # the weights given by name (not by the preset): a cache without a term's target refuses these
        object.__setattr__(self, "_given_weights",
                           frozenset(name for name in weight_options if getattr(self, name) is not None))
        for name, weight in preset_weights(self.preset).items():  # recorded as numbers, not as None
            if getattr(self, LOSS_TERMS[name].option) is None:
                object.__setattr__(self, LOSS_TERMS[name].option, weight)
        # nan passes every comparison below (nan < 0 is False), so finiteness comes first
        check_finite(self, ("epochs", "lr", "weight_decay", "warmup_ratio", *weight_options, "temperature",
                            "align_fade"))
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ConfigError(f"--epochs must be positive when --max-steps is not, not {self.epochs}: "
                              "the run would export an untrained student.")
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues the run in --out and --overwrite replaces it; pass one of them.")
        for name in (*weight_options, "lr", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must not be negative.")
        if not any(getattr(self, name) > 0 for name in weight_options):
            flags = "/".join(f"--{name.replace('_', '-')}" for name in weight_options)
            raise ConfigError(f"every loss weight is 0; enable at least one of {flags}.")
        if self.workers < 0:
            raise ConfigError(f"--workers must be 0 or more, not {self.workers}.")
        check_at_least_one(self, ("batch_size", "grad_accum", "logging_steps", "save_steps"))
        if self.vision_topk is not None and self.vision_topk < 1:
            raise ConfigError("--vision-topk must be at least 1.")
        if self.grad_share_steps < 0:
            raise ConfigError("--grad-share-steps must not be negative.")
        if not 0 <= self.align_fade <= 1:
            raise ConfigError(f"--align-fade must be in [0, 1] (a share of the run), not {self.align_fade}.")
        if self.temperature <= 0:
            raise ConfigError("--temperature must be positive.")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError("--warmup-ratio must be in [0, 1).")
        from alignkd.distill.sampling import parse_order

        parse_order(self.shuffle)
        from alignkd.distill.sharding import check_fsdp_launch, parse_fsdp

        if self.fsdp_wrap_class and not self.fsdp:
            raise ConfigError("--fsdp-wrap-class only applies with --fsdp.")
        check_fsdp_launch(parse_fsdp(self.fsdp), "LOCAL_RANK" in os.environ, self.grad_share_steps)
        check_model_arg(self.student, "--student", "student model directory")
        from alignkd.cache.storage import check_local_dir

        check_local_dir(self.cache, "cache")  # a URL: open_cache names a missing cache
        check_out_dir(self.out)
        from alignkd.distributed import dist_info

        if dist_info().is_main:  # rank 0 records the run before step 1; a later rank must not see it as foreign
            from alignkd.distill.outdir import check_out

            check_out(self)


@dataclass
class DistillSummary:
    out: str
    steps: int
    final_losses: dict = field(default_factory=dict)
    seconds: float = 0.0
    notes: list = field(default_factory=list)  # loss terms a cache built with --skip turned off


def _freeze(student, parts: tuple[str, ...], family=None) -> None:
    """Freeze named submodules of the student (e.g. its vision tower, as MobileVLM does).

    "vision_tower" also names the family's own tower where it is called otherwise
    (Qwen-VL's `visual`, Idefics3's `vision_model`).
    """
    modules = dict(student.named_modules())
    for part in parts:
        matches = [m for name, m in modules.items() if name.split(".")[-1] == part]
        if not matches and part == "vision_tower" and family is not None:
            matches = [family.get_vision_tower(student)]
        if not matches:
            raise ConfigError(f"--freeze {part}: the student has no module named {part!r}.")
        for module in matches:
            for p in module.parameters():
                p.requires_grad_(False)


def distill(cfg: DistillConfig, callbacks: list | None = None, wrap_objective=None) -> DistillSummary:
    """Train `cfg.student` from the teacher cache at `cfg.cache`; never loads the teacher.

    `callbacks` are extra `transformers.TrainerCallback`s (notebook users, tests).
    `wrap_objective(objective) -> nn.Module` puts a module around the objective that the
    Trainer then trains (bench/online_teacher.py feeds it a live teacher's targets); the
    export still takes the student from the objective.
    """
    import torch
    from transformers import TrainingArguments

    from alignkd.cache.reader import open_cache
    from alignkd.cache.storage import open_store
    from alignkd.distill.checks import check_cache_integrity, check_student_fits_cache, weights_for_cache
    from alignkd.distill.dataset import CachedDistillDataset
    from alignkd.distill.trainer import AlignKDTrainer, build_callbacks
    from alignkd.distill.export import export_student
    from alignkd.distill.objective import AlignKDObjective
    from alignkd.distill.sampling import parse_order
    from alignkd.distill.sharding import check_fsdp_engaged, fsdp_arguments, gather_state_dict, parse_fsdp, wrap_classes
    from alignkd.models import load_vlm

    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    store = open_store(cfg.cache)  # once: the reader, verify and the dataset all read through it
    reader = open_cache(store)  # refuses another format or version by name
    if len(reader) == 0:
        raise AlignKDError(f"cache {cfg.cache} holds no samples (every row was rejected or none was "
                           "built yet); there is nothing to distil.")
    weights, notes = weights_for_cache(cfg, reader.skipped)  # before any work: refuses a term the cache lacks
    if cfg.verify:
        check_cache_integrity(store)
    vlm = load_vlm(resolve_model(cfg.student, "--student").path, dtype="float32")
    check_student_fits_cache(vlm, reader)
    meta = reader.meta
    if cfg.temperature != 1.0 and meta["build_options"]["logit_mode"] != "topk":
        raise ConfigError(f"--temperature {cfg.temperature} needs a cache built with --logit-mode topk: sampled "
                          "logit targets are draws from the teacher at temperature 1 and cannot be re-tempered.")
    student = vlm.model
    student.train()
    _freeze(student, cfg.freeze, vlm.family)
    fsdp_words = parse_fsdp(cfg.fsdp)
    sharding = fsdp_arguments(fsdp_words, wrap_classes(student, cfg.fsdp_wrap_class) if fsdp_words else [])
    vision_stats = None
    if cfg.loss_scale == "normalized" and weights.vis > 0:
        from alignkd.distill.vision_stats import teacher_vision_stats

        vision_stats = teacher_vision_stats(reader)
    objective = AlignKDObjective(
        student, teacher_heads=meta["teacher_shapes"]["num_heads"],
        teacher_dim=meta["teacher_shapes"]["hidden_size"], weights=weights,
        logit_mode=meta["build_options"]["logit_mode"], logit_samples=meta["build_options"]["logit_samples"],
        temperature=cfg.temperature, vision_topk=cfg.vision_topk, attn_loss=cfg.resolved_attn_loss,
        adapters=cfg.adapters, loss_scale=cfg.loss_scale, vision_stats=vision_stats)
    if reader.attn_store == "layer0":  # rows recomputed each step on the training device
        objective.layer0_kit = reader.layer0_kit
    order = parse_order(cfg.shuffle)
    dataset = CachedDistillDataset(store, vlm.processor, images_root=cfg.images,
                                   image_token_id=vlm.family.get_image_token_id(student.config),
                                   vocab_size=int(student.config.get_text_config().vocab_size),
                                   check_crc=not cfg.verify, prefetch_shards=order.kind == "window")
    if len(dataset):
        dataset[0]  # refuses a student whose processor gives other image tokens, before the Trainer starts
    out = Path(cfg.out)
    from alignkd.distributed import dist_info

    if dist_info().is_main:
        from alignkd.distill.outdir import prepare_out

        prepare_out(cfg, meta)
    # transformers 5 reads the TensorBoard directory from the environment only.
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(out / "tensorboard"))
    args = TrainingArguments(
        output_dir=str(out / "checkpoints"), num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr, warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio in 5.x
        weight_decay=cfg.weight_decay,
        seed=cfg.seed, data_seed=cfg.seed, bf16=cfg.bf16, logging_steps=cfg.logging_steps, logging_first_step=True,
        save_steps=cfg.save_steps, save_strategy="steps", report_to=["tensorboard"] if cfg.log == "tensorboard" else [],
        remove_unused_columns=False, disable_tqdm=not cfg.progress,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=cfg.workers,
        dataloader_pin_memory=torch.cuda.is_available(), dataloader_persistent_workers=cfg.workers > 0,
        # Under torchrun on CPU (the tests' two gloo processes) DDP needs gloo; NCCL otherwise.
        # Parameters only go unused when a loss term is off (e.g. the adapters of w_attn=0, or faded).
        ddp_find_unused_parameters=len(weights.enabled()) < len(LOSS_TERMS) or cfg.align_fade > 0,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() else None,
        **sharding,
    )
    if objective.layer0_kit is not None:  # a damaged kit is refused before step one (--no-verify too)
        objective.layer0_kit(args.device)
    trainer = AlignKDTrainer(
        model=objective if wrap_objective is None else wrap_objective(objective), args=args, train_dataset=dataset,
        data_collator=dataset.collate, callbacks=build_callbacks(out) + list(callbacks or []),
        grad_share_steps=cfg.grad_share_steps, train_order=order, align_fade=cfg.align_fade)
    check_fsdp_engaged(fsdp_words, trainer)
    result = trainer.train(resume_from_checkpoint=_last_checkpoint(out) if cfg.resume else None)
    state_dict = gather_state_dict(trainer)  # under FSDP every rank takes part; rank 0 gets it whole
    if trainer.is_world_process_zero():
        export_student(objective, vlm.processor, out, cfg, meta, state_dict=state_dict)
    return DistillSummary(out=str(out), steps=int(result.global_step),
                          final_losses=trainer.last_terms(), seconds=time.perf_counter() - start, notes=notes)


def _last_checkpoint(out: Path) -> str:
    """The newest complete checkpoint. Checkpoints are renamed into place whole
    (trainer.AlignKDTrainer._save_checkpoint); one without trainer_state.json (written last
    by the Trainer) comes from an older alignkd cut off by a kill: it is removed, not resumed from."""
    import shutil

    ckpt_dir = out / "checkpoints"
    found = sorted((int(m.group(1)), p) for p in (ckpt_dir.iterdir() if ckpt_dir.is_dir() else [])
                   if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and p.is_dir())
    complete = [p for _, p in found if (p / "trainer_state.json").is_file()]
    if not complete:
        raise ConfigError(f"--resume: no complete checkpoint found under {ckpt_dir}; start the run again "
                          "with --overwrite.")
    for step, p in found:
        if step > int(complete[-1].name.split("-")[1]) and p not in complete:
            shutil.rmtree(p)
    return str(complete[-1])
