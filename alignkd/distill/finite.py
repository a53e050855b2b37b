"""Non-finite numbers stop a run instead of being exported as a model.

A too-large learning rate or a nan weight decay used to train on silently: the Trainer
replaces a nan loss by the running mean in its log, and AdamW turns inf/nan parameters
into more of the same, so the run ended "successfully" with a student full of nan. The
checks here are one fused pass each: the loss terms are stacked and tested together, and
the parameters are reduced with `torch._foreach_norm(ord=inf)` (one max-abs per tensor,
which is inf or nan exactly when the tensor holds one, and cannot overflow as a 2-norm
could) and tested with one `isfinite`; only a failure walks the tensors to name one.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from alignkd.errors import AlignKDError


class NonFiniteError(AlignKDError):
    """Training produced a nan or inf; nothing was exported."""


def first_non_finite(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first tensor holding a nan or inf, or None when all are finite."""
    named = [(name, t.detach()) for name, t in named if t.is_floating_point() and t.numel()]
    if not named:
        return None
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, t) in enumerate(named):
        by_device.setdefault(t.device, []).append(i)
    bad: list[int] = []
    for indices in by_device.values():
        peaks = torch._foreach_norm([_local(named[i][1]) for i in indices], ord=float("inf"))
        finite = torch.isfinite(torch.stack([p.float() for p in peaks]))
        if not bool(finite.all()):
            bad += [indices[j] for j in (~finite).nonzero().flatten().tolist()]
    return named[min(bad)][0] if bad else None


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's (FSDP) own shard: each rank checks what it holds."""
    return t.to_local() if hasattr(t, "to_local") else t


def describe_value(t: torch.Tensor) -> str:
    """'nan', 'inf' or '-inf': what a non-finite tensor holds first."""
    t = _local(t.detach()).float()
    if torch.isnan(t).any():
        return "nan"
    return "inf" if bool((t == float("inf")).any()) else "-inf"


def check_loss_terms(step: int, total: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
    """Stop at a nan/inf loss, naming the step and the first non-finite term."""
    named = {**terms, "weighted total": total}
    finite = torch.isfinite(torch.stack([v.detach().float() for v in named.values()]))
    if bool(finite.all()):
        return
    name = next(n for n, ok in zip(named, finite.tolist()) if not ok)
    raise NonFiniteError(f"step {step}: the {name} loss is {describe_value(named[name])}, so training stopped "
                         "and nothing was exported (lower --lr or check --weight-decay).")


def check_parameters(step: int, named: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Stop when the optimizer step left a parameter non-finite, naming the first one."""
    named = list(named)
    name = first_non_finite(named)
    if name is None:
        return
    value = describe_value(dict(named)[name])
    raise NonFiniteError(f"step {step}: after the optimizer step the parameter {name} holds {value}, so training "
                         "stopped and nothing was exported (lower --lr or check --weight-decay).")
