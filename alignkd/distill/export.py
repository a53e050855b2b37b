"""Write what a distillation run leaves behind: a loadable student, its adapters, a loss plot."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path


def export_student(objective, processor, out: Path, cfg, cache_meta: dict) -> None:
    """`from_pretrained(out)` loads the student; adapters and the run config sit beside it."""
    import safetensors.torch

    out = Path(out)
    objective.student.save_pretrained(out)
    processor.save_pretrained(out)
    adapters = {f"head_adapter.{k}": v for k, v in objective.head_adapter.state_dict().items()}
    adapters.update({f"projector_adapter.{k}": v for k, v in objective.projector_adapter.state_dict().items()})
    safetensors.torch.save_file({k: v.contiguous() for k, v in adapters.items()}, out / "adapters.safetensors")
    run = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
           "cache_teacher": cache_meta.get("teacher", {}), "cache_options": cache_meta.get("build_options", {})}
    (out / "distill_run.json").write_text(json.dumps(run, indent=2))
    plot_loss_curves(out / "metrics.jsonl", out / "loss_curves.png")


def plot_loss_curves(metrics: Path, png: Path) -> Path | None:
    """One panel per loss term from metrics.jsonl; returns None when nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics.exists():
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    records = [r for r in records if "loss" in r]
    keys = ["loss"] + sorted({k for r in records for k in r if k.startswith("loss_")})
    if not records:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".")
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
