"""How faithful stored targets are, judged by the training signal: the cosine between the
student's gradient (every trainable parameter, the full objective) from two target batches.

Per-tensor errors (row-KL, relative error) say little about what training receives: a
1 % error on attention probabilities whose loss term is 1e-6 of the total changes the
step less than a 0.1 % error on the vision tokens. `gradient_cosine` measures the step
itself; `bench/cache_storage.py` and tests/test_gradient_fidelity.py use it.
"""

from __future__ import annotations

import torch
from torch import nn


def flat_gradient(objective: nn.Module, batch: dict) -> torch.Tensor:
    """d(loss)/d(theta) over every trainable parameter, flattened (zeros where a term has no path)."""
    params = [p for p in objective.parameters() if p.requires_grad]
    loss = objective(**batch)["loss"]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                      for g, p in zip(grads, params)])


def gradient_cosine(objective: nn.Module, stored: dict, reference: dict) -> float:
    """cos(grad from `stored` targets, grad from `reference` (fp32) targets), same student state."""
    a, b = flat_gradient(objective, stored), flat_gradient(objective, reference)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))
