"""`alignkd demo`: the whole pipeline on the generated grid world, ending in an ablation table.

The demo uses the public pipeline and nothing else: an ordinary LLaVA manifest and PNGs, then
`alignkd cache build`, `alignkd distill` and `alignkd eval` as subprocesses through the
experiment runner (`alignkd.experiment`), exactly as on a user's data. Every stage writes
under `--out` and is skipped when its output is already there, so a rerun picks up where an
interrupted one stopped. The test split is used only for the final table."""

from __future__ import annotations

import json
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from alignkd.errors import ConfigError

# One row per objective preset (alignkd.distill.terms.PRESETS): CE only, logit KD, logit KD plus
# each Align-KD term, and the full objective. The default run trains the first and last rows
# only (CE only against full Align-KD); `--ablation` adds the others.
ABLATION = (
    ("CE only", "ce"),
    ("logits only", "logits"),
    ("logits + vision", "logits+vision"),
    ("logits + attention", "logits+attention"),
    ("full Align-KD", "full"),
)
DEFAULT_ROWS = ("CE only", "full Align-KD")

# The question types of the demo's student data and test split: the five the shipped
# teacher masters (>= 98.5% on val). `where` (77%) and `relation` (74%) stay in the
# world generator and in the teacher's training data, but distilling a teacher that is
# wrong a quarter of the time on a type teaches its mistakes, and the demo is meant to
# show what a competent teacher transfers (docs/demo-notes.md).
DEMO_QTYPES = ("colour", "shape", "position", "count", "exist")


@dataclass(frozen=True)
class DemoConfig:
    out: str = "demo-out"
    quick: bool = False
    seeds: int = 3
    teacher: str | None = None        # a trained teacher directory; default: shipped, else trained
    student_records: int = 4000       # the student's (small) share of the teacher's training split
    test_records: int = 1400
    distill_steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-3
    ablation: bool = False            # also train the single-term rows
    qtypes: tuple[str, ...] = DEMO_QTYPES
    workers: int = 2                  # students trained side by side, one CPU thread each
    progress: bool = True

    def rows(self) -> tuple[tuple[str, dict], ...]:
        return tuple(row for row in ABLATION if self.ablation or row[0] in DEFAULT_ROWS)

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise ConfigError("--seeds must be at least 1.")
        if self.teacher is not None and not Path(self.teacher).is_dir():
            raise ConfigError(f"teacher directory {self.teacher} does not exist.")

    @classmethod
    def quick_mode(cls, out: str, **kw) -> "DemoConfig":
        """A few hundred records and steps, one seed: the whole path in about two minutes."""
        return cls(out=out, quick=True, seeds=kw.pop("seeds", 1), student_records=256, test_records=140,
                   distill_steps=20, **kw)


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def prepare_teacher(cfg: DemoConfig, out: Path) -> Path:
    """The teacher model directory: given, already trained under --out, shipped, or trained now."""
    from alignkd.demo.shipped import materialise_shipped_teacher, shipped_teacher_available
    from alignkd.demo.teacher import TrainConfig, train_teacher

    if cfg.teacher is not None:
        return Path(cfg.teacher)
    target = out / "teacher" / "model"
    if (target / "config.json").exists():
        _log(f"teacher: reusing {target}")
        return target
    if not cfg.quick and shipped_teacher_available():
        _log("teacher: using the shipped weights (alignkd/demo/assets/teacher.json records how they were trained)")
        return materialise_shipped_teacher(target)
    if cfg.quick:
        _log("teacher: quick mode trains a small teacher (the path `alignkd demo train-teacher` takes)")
        run = train_teacher(out / "teacher", seed=0, world_dir=out / "teacher-world",
                            cfg=TrainConfig(steps=150, batch_size=32, lr=2e-3, warmup=20),
                            world_sizes=dict(n_train=cfg.student_records * 2, n_val=56, n_test=cfg.test_records),
                            pretrain_steps=60, log_every=50)
        return run.model_dir
    raise ConfigError("no shipped teacher weights are installed and no --teacher was given; "
                      "train one with `alignkd demo train-teacher --out DIR` and pass --teacher DIR/model.")


def prepare_student_init(teacher_dir: Path, out: Path) -> Path:
    """The student at initialisation, with a copy of the teacher's frozen, pretrained tower."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from alignkd.demo.teacher import STUDENT_SPEC, build_model

    target = out / "student-init"
    if (target / "config.json").exists():
        return target
    teacher = AutoModelForImageTextToText.from_pretrained(teacher_dir)
    processor = AutoProcessor.from_pretrained(teacher_dir)
    tower = teacher.model.vision_tower.state_dict()
    student = build_model(STUDENT_SPEC, processor.tokenizer, tower, seed=0)
    tmp = out / ".tmp-student-init"
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    tmp.rename(target)
    return target


def prepare_world(cfg: DemoConfig, out: Path):
    """The student's training subset and the test split (a prefix of the teacher's world)."""
    from alignkd.demo import world
    from alignkd.demo.teacher import WORLD_SEED

    root = out / "world"
    if (root / "scenes.json").exists():
        return world.world_paths(root)
    return world.generate_world(root, seed=WORLD_SEED, n_train=cfg.student_records, n_val=56,
                                n_test=cfg.test_records, qtypes=cfg.qtypes)


def demo_stages(cfg: DemoConfig):
    """The demo's students through the experiment runner: two at a time with one torch thread each,
    scored with two threads and greedy answers of at most 6 tokens."""
    from alignkd.experiment.stages import Stages

    return Stages(tag="demo", threads=1, eval_threads=2, drop_checkpoints=True,
                  distill_flags=("--logging-steps", "10", "--save-steps", str(10**9), "--no-verify", "--workers", "0",
                                 "--no-progress"),
                  eval_flags=("--batch-size", "128", "--max-new-tokens", "6"))


def build_demo_cache(cfg: DemoConfig, teacher: Path, paths, out: Path) -> Path:
    from alignkd.experiment.stages import build_cache

    st = replace(demo_stages(cfg), threads=2)  # the build has the machine to itself
    return build_cache(st, "", teacher, paths.train, paths.images_root, out,
                       ["--batch-size", "64", "--shard-size", "512"], overwrite=False)


def _slug(name: str, seed: int) -> str:
    return f"{name.lower().replace('+ ', '').replace(' ', '-')}-seed{seed}"


def student_tasks(cfg: DemoConfig, student: Path, cache: Path, paths, out: Path) -> list:
    """(row, seed) students, rows first; their runs are `runs/<row>-seed<N>`."""
    from alignkd.experiment.plan import Arm, Student, recipe_flags
    from alignkd.experiment.stages import Task

    recipe = recipe_flags({"steps": cfg.distill_steps, "batch_size": cfg.batch_size, "lr": cfg.lr,
                           "warmup_ratio": 0.05})
    return [Task(Student(Arm.of_preset(name, preset), seed, out / "runs" / _slug(name, seed)), student, cache,
                 recipe, paths.test, paths.images_root, "eval-test.json", steps=cfg.distill_steps)
            for name, preset in cfg.rows() for seed in range(cfg.seeds)]


def ablation_table(rows: dict[str, list[dict]], teacher: dict) -> tuple[str, dict]:
    """Markdown table: test accuracy (%) per question type, mean ± sample std over seeds."""
    from alignkd.experiment.tables import accuracy_table

    ce = statistics.fmean(r["all"] for r in rows["CE only"])
    full = statistics.fmean(r["all"] for r in rows["full Align-KD"])
    gap = teacher["all"] - ce
    summary = {"ce_only": ce, "align_kd": full, "teacher": teacher["all"], "gain_points": 100 * (full - ce),
               "gap_closed": (full - ce) / gap if gap > 0 else None}
    return accuracy_table(rows, teacher), summary


def write_report(out: Path, cfg: DemoConfig, table: str, summary: dict, cache: Path, seconds: float) -> Path:
    from alignkd.cache.inspection.show import show_sample
    from alignkd.cache.inspection.stats import cache_stats, render_stats
    from alignkd.cache.reader import open_cache

    heatmap = show_sample(str(cache), open_cache(cache).sample_ids[0], str(out / "attention.png"))
    curves = out / "runs" / "full-align-kd-seed0" / "loss_curves.png"
    if curves.exists():
        shutil.copy(curves, out / "loss_curves.png")
    gap = summary["gap_closed"]
    from alignkd.cache.teacher.build import BuildConfig
    from alignkd.distill.run import DistillConfig

    # the defaults the rows ran with, read from the configs so the report cannot go stale
    objective = f"--loss-scale {DistillConfig.loss_scale}, --logit-positions {BuildConfig.logit_positions}"
    text = f"""# alignkd demo report

Mode: {"quick" if cfg.quick else "full"}; {cfg.seeds} seed(s); student trained on {cfg.student_records} records
for {cfg.distill_steps} steps (batch {cfg.batch_size}, lr {cfg.lr}, default objective: {objective});
question types {", ".join(cfg.qtypes)};
scored on {cfg.test_records} test records by greedy exact match. Wall time {seconds / 60:.1f} min.

## {"Ablation" if cfg.ablation else "CE only against Align-KD"} (test accuracy, %, mean ± std over seeds)

{table}

Align-KD against CE only: {summary["gain_points"]:+.1f} points
(teacher {100 * summary["teacher"]:.1f}, CE-only student {100 * summary["ce_only"]:.1f},
Align-KD student {100 * summary["align_kd"]:.1f}); share of the teacher–student gap closed:
{f"{100 * gap:.0f}%" if gap is not None else "n/a (the student is not below the teacher)"}.

## Cache

```
{render_stats(cache_stats(str(cache)))}
```

## Figures

- Loss curves of the full Align-KD run (seed 0): ![loss curves](loss_curves.png)
- Teacher text→vision attention (`alignkd cache show`): ![attention](attention.png)
"""
    report = out / "report.md"
    report.write_text(text)
    (out / "summary.json").write_text(json.dumps({"config": asdict(cfg), **summary}, indent=1))
    return report


def _quiet_transformers() -> None:
    """No "Loading weights" bars per model load: the demo draws one bar per stage."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def run_demo(cfg: DemoConfig) -> Path:
    """Every stage of the pipeline; returns the path of report.md."""
    from alignkd.demo.teacher import torch_threads

    with torch_threads(2):
        return _run_demo(cfg)


def _run_demo(cfg: DemoConfig) -> Path:
    from alignkd.experiment.stages import evaluate, train_students

    _quiet_transformers()
    start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = prepare_teacher(cfg, out)
    paths = prepare_world(cfg, out)
    student = prepare_student_init(teacher, out)
    cache = build_demo_cache(cfg, teacher, paths, out)
    tasks = student_tasks(cfg, student, cache, paths, out)
    st = demo_stages(cfg)
    rows: dict[str, list[dict]] = {}
    for task, scores in zip(tasks, train_students(st, tasks, max(cfg.workers, 1), progress=cfg.progress)):
        rows.setdefault(task.student.arm.name, []).append(scores)
    teacher_scores = evaluate(st, teacher, paths.test, paths.images_root, out / "teacher-eval-test.json")
    table, summary = ablation_table(rows, teacher_scores)
    report = write_report(out, cfg, table, summary, cache, time.perf_counter() - start)
    print(table)
    return report
