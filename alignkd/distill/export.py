"""Write what a distillation run leaves behind: a loadable student, its adapters, a loss plot.

The export is written whole into OUT/.tmp-export, then each file is moved into OUT with
`config.json` last (and the old one removed first): a run killed while exporting leaves
no directory that `from_pretrained` would take for a finished student, and `--resume`
(which restarts from the final checkpoint) exports again. A state dict holding a nan or
inf is never written, and a write that fails (full disk) is one sentence naming OUT.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

EXPORT_TMP = ".tmp-export"
LAST = "config.json"  # what makes a directory look like a model to from_pretrained


ADAPTERS = ("head_adapter.", "projector_adapter.")


def export_student(objective, processor, out: Path, cfg, cache_meta: dict, state_dict: dict | None = None) -> None:
    """`from_pretrained(out)` loads the student; adapters and the run config sit beside it.

    `state_dict` is the objective's full state dict when its modules hold only shards (FSDP:
    gathered on this rank by `sharding.gather_state_dict`); None reads the modules."""
    from alignkd.distill.finite import NonFiniteError, first_non_finite
    from alignkd.distill.saving import is_write_failure, tensor_bytes, write_failure

    out = Path(out)
    weights = state_dict if state_dict is not None else objective.state_dict()
    if (bad := first_non_finite(weights.items())) is not None:
        raise NonFiniteError(f"the trained tensor {bad} is not finite, so nothing was exported to {out}.")
    (out / LAST).unlink(missing_ok=True)  # until the end, OUT does not look like a finished model
    tmp = out / EXPORT_TMP
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_export(objective, processor, tmp, out / "metrics.jsonl", cfg, cache_meta, state_dict)
    except Exception as err:
        if not is_write_failure(err):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failure("the student", out, err, tensor_bytes(weights.values())) from None
    publish(tmp, out)


def write_export(objective, processor, tmp: Path, metrics: Path, cfg, cache_meta: dict,
                 state_dict: dict | None = None) -> None:
    import safetensors.torch

    if state_dict is None:
        state_dict = objective.state_dict()
        objective.student.save_pretrained(tmp)
    else:
        student = {k.removeprefix("student."): v for k, v in state_dict.items() if k.startswith("student.")}
        objective.student.save_pretrained(tmp, state_dict=student)
    processor.save_pretrained(tmp)
    adapters = {k: v for k, v in state_dict.items() if k.startswith(ADAPTERS)}
    safetensors.torch.save_file({k: v.contiguous() for k, v in adapters.items()}, tmp / "adapters.safetensors")
    plot_loss_curves(metrics, tmp / "loss_curves.png")
    from alignkd.distill.outdir import FINISHED, run_record

    # the exported names, so that --overwrite later removes exactly these (alignkd.distill.outdir)
    files = sorted({p.relative_to(tmp).parts[0] for p in tmp.rglob("*")} | {FINISHED})
    (tmp / FINISHED).write_text(json.dumps({**run_record(cfg, cache_meta), "files": files}, indent=2))


def publish(tmp: Path, out: Path) -> None:
    """Move every exported file into `out` (durably), `config.json` last, then drop `tmp`."""
    files = sorted((p for p in tmp.rglob("*") if p.is_file()), key=lambda p: (p.name == LAST, str(p)))
    for path in files:
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        target = out / path.relative_to(tmp)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    fd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    shutil.rmtree(tmp)


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
