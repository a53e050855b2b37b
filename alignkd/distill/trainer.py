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
from alignkd.hub import check_model_arg, resolve_model


@dataclass(frozen=True)
class DistillConfig:
    student: str
    cache: str
    out: str
    images: str | None = None
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0
    bf16: bool = False
    resume: bool = False
    overwrite: bool = False           # replace a finished or stopped run in --out (alignkd.distill.outdir)
    # The objective: a preset of alignkd.distill.terms (PRESETS) gives every term's weight; a w_NAME
    # set here overrides it (None: the preset's). One field per row of terms.LOSS_TERMS.
    preset: str = DEFAULT_PRESET
    w_ce: float | None = None
    w_logit: float | None = None
    w_attn: float | None = None
    w_vis: float | None = None
    temperature: float = 1.0
    vision_topk: int | None = None    # None: N_v / 9, the paper's 16 of 144
    attn_loss: str = "auto"           # auto: kl under the normalized scale, mse under paper
    loss_scale: str = "paper"         # the best worst-world gain of three worlds (docs/efficacy.md)
    adapters: str = "trainable"
    freeze: tuple[str, ...] = ("vision_tower",)
    log: str = "jsonl"
    verify: bool = True
    logging_steps: int = 5
    save_steps: int = 500
    grad_share_steps: int = 0         # every N steps, log each term's share of the student's gradient
    progress: bool = True
    workers: int = 2  # DataLoader workers reading the cache (0: in the training process)
    shuffle: str = "uniform"          # training order: uniform | window:N (alignkd.distill.sampling)
    fsdp: str = ""                    # the Trainer's words: "full_shard auto_wrap" ... (alignkd.distill.sharding)
    fsdp_wrap_class: tuple[str, ...] = ()  # layer classes FSDP shards by (default: the student's own)

    @property
    def given_weights(self) -> frozenset:
        """The w_NAME options set explicitly, not filled in from the preset."""
        return self.__dict__.get("_given_weights", frozenset())

    @property
    def resolved_attn_loss(self) -> str:
        return resolve_attn_loss(self.attn_loss, self.loss_scale)

    def loss_weights(self):
        """The objective's `LossWeights`: the preset's, with the w_NAME fields given."""
        return LossWeights(**{name: getattr(self, spec.option) for name, spec in LOSS_TERMS.items()})

    def __post_init__(self) -> None:
        check_choices(self, {"attn_loss": ("auto", "mse", "kl"), "adapters": ("trainable", "frozen"),
                             "log": ("jsonl", "tensorboard"), "loss_scale": ("normalized", "paper"),
                             "preset": tuple(PRESETS)})
        weight_options = [spec.option for spec in LOSS_TERMS.values()]
        # the weights given by name (not by the preset): a cache without a term's target refuses these
        object.__setattr__(self, "_given_weights",
                           frozenset(name for name in weight_options if getattr(self, name) is not None))
        for name, weight in preset_weights(self.preset).items():  # recorded as numbers, not as None
            if getattr(self, LOSS_TERMS[name].option) is None:
                object.__setattr__(self, LOSS_TERMS[name].option, weight)
        # nan passes every comparison below (nan < 0 is False), so finiteness comes first
        check_finite(self, ("epochs", "lr", "weight_decay", "warmup_ratio", *weight_options, "temperature"))
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
    from alignkd.distill.checks import check_cache_integrity, check_student_fits_cache, weights_for_cache
    from alignkd.distill.dataset import CachedDistillDataset
    from alignkd.distill.engine import AlignKDTrainer, build_callbacks
    from alignkd.distill.export import export_student
    from alignkd.distill.objective import AlignKDObjective
    from alignkd.distill.sampling import parse_order
    from alignkd.distill.sharding import check_fsdp_engaged, fsdp_arguments, gather_state_dict, parse_fsdp, wrap_classes
    from alignkd.models import load_vlm

    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    reader = open_cache(cfg.cache)  # refuses another format or version by name
    if len(reader) == 0:
        raise AlignKDError(f"cache {cfg.cache} holds no samples (every row was rejected or none was "
                           "built yet); there is nothing to distil.")
    weights, notes = weights_for_cache(cfg, reader.skipped)  # before any work: refuses a term the cache lacks
    if cfg.verify:
        check_cache_integrity(cfg.cache)
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
    dataset = CachedDistillDataset(cfg.cache, vlm.processor, images_root=cfg.images,
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
        # Parameters only go unused when a loss term is off (e.g. the adapters of w_attn=0).
        ddp_find_unused_parameters=len(weights.enabled()) < len(LOSS_TERMS),
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() else None,
        **sharding,
    )
    if objective.layer0_kit is not None:  # a damaged kit is refused before step one (--no-verify too)
        objective.layer0_kit(args.device)
    trainer = AlignKDTrainer(
        model=objective if wrap_objective is None else wrap_objective(objective), args=args, train_dataset=dataset,
        data_collator=dataset.collate, callbacks=build_callbacks(out) + list(callbacks or []),
        grad_share_steps=cfg.grad_share_steps, train_order=order)
    check_fsdp_engaged(fsdp_words, trainer)
    result = trainer.train(resume_from_checkpoint=_last_checkpoint(out) if cfg.resume else None)
    state_dict = gather_state_dict(trainer)  # under FSDP every rank takes part; rank 0 gets it whole
    if trainer.is_world_process_zero():
        export_student(objective, vlm.processor, out, cfg, meta, state_dict=state_dict)
    return DistillSummary(out=str(out), steps=int(result.global_step),
                          final_losses=trainer.last_terms(), seconds=time.perf_counter() - start, notes=notes)


def _last_checkpoint(out: Path) -> str:
    """The newest complete checkpoint. Checkpoints are renamed into place whole
    (engine.AlignKDTrainer._save_checkpoint); one without trainer_state.json (written last
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
