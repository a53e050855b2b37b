"""Gradients of loss terms, and how faithful stored targets are judged by them: the cosine
between the student's gradient (every trainable parameter, the full objective) from two target
batches.

`per_term_gradients` is the one place a gradient is taken per term, and `flatten` the one place
a term's gradient becomes a vector: the objective's logged gradient shares, `flat_gradient` here
and bench/standin_student.py all call them.

Per-tensor errors (row-KL, relative error) say little about what training receives: a
1 % error on attention probabilities whose loss term is 1e-6 of the total changes the
step less than a 0.1 % error on the vision tokens. `gradient_cosine` measures the step
itself; `bench/cache_storage.py` and tests/test_gradient_fidelity.py use it.
"""

from __future__ import annotations

import torch
from torch import nn


def per_term_gradients(losses: dict[str, torch.Tensor], params: list, keep_graph: bool = False) -> dict[str, tuple]:
    """Each loss's gradient on `params`, one entry per parameter: None where the loss has no path
    to it. The graph is kept between losses, so they may share one forward, and after the last
    with `keep_graph` (a training step's backward still to come)."""
    last = len(losses) - 1
    return {name: torch.autograd.grad(loss, params, retain_graph=keep_graph or i < last, allow_unused=True)
            for i, (name, loss) in enumerate(losses.items())}


def flatten(grads: tuple, params: list) -> torch.Tensor:
    """One loss's gradients (`per_term_gradients`' entry) as one float64 vector over `params`, zeros
    where the loss has no path to a parameter."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                      for g, p in zip(grads, params)])


def flat_gradient(objective: nn.Module, batch: dict) -> torch.Tensor:
    """d(loss)/d(theta) over every trainable parameter, flattened (zeros where a term has no path)."""
    params = [p for p in objective.parameters() if p.requires_grad]
    return flatten(per_term_gradients({"loss": objective(**batch)["loss"]}, params)["loss"], params)


def gradient_cosine(objective: nn.Module, stored: dict, reference: dict) -> float:
    """cos(grad from `stored` targets, grad from `reference` (fp32) targets), same student state."""
    a, b = flat_gradient(objective, stored), flat_gradient(objective, reference)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))
