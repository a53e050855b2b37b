"""The loss terms of the objective, one component each, and the one table that lists them.

A term is a small callable with a narrow signature, `term(cap, batch) -> scalar tensor`: it
reads the student's capture (`alignkd.models.capture_forward`) and the batch's teacher targets,
and keeps its own settings (temperature, adapter, loss form) from construction. The objective
(`alignkd.distill.objective`) builds every term of `LOSS_TERMS` once and, each step, computes
and sums only those whose weight is positive; a term whose weight is 0 never runs, and the
targets only it `reads` are dropped from the batch before they are widened.

`LOSS_TERMS` is the one place a term is named: its class, its weight option (`w_NAME` in
`DistillConfig`, `--w-NAME` on the command line) and its default weight. `PRESETS` are named
weight settings built from it, so a term added to the table is off in `ce` and `logits`
without anyone editing a flag list. Adding a term: a class here and its row, a `w_NAME` field
on `DistillConfig` (tests/test_terms.py checks the two agree), and its tests.

Torch is imported inside the terms' calls only: the command line reads this table to build
its options, and `alignkd --help` stays instant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from alignkd.errors import ConfigError


class LossTerm:
    """One term: `name` is its key in the weights and in the logs (`loss_NAME`); `reads` are the
    prefixes of the batch keys it reads (`t_vision` also covers `t_vision_mask`, `t_vision_scale`...)."""

    name: ClassVar[str]
    reads: ClassVar[tuple[str, ...]]
    # An alignment term (the teacher's inner states, not its outputs): `--align-fade` fades these.
    aligns: ClassVar[bool] = False

    @classmethod
    def from_objective(cls, objective) -> "LossTerm":
        """The term with its settings and adapter taken from an `AlignKDObjective`."""
        return cls()

    def __call__(self, cap, batch: dict):
        raise NotImplementedError


class CrossEntropy(LossTerm):
    """Next-token CE on the answer tokens: the student's own task loss."""

    name, reads = "ce", ("labels",)

    def __call__(self, cap, batch: dict):
        from alignkd.distill.losses import ce_loss

        return ce_loss(cap.logits, batch["labels"])


class LogitKD(LossTerm):
    """KL to the teacher's cached sparse next-token distribution at every cached logit position."""

    name, reads = "logit", ("t_logit",)

    def __init__(self, mode: str, samples: int, temperature: float = 1.0) -> None:
        self.mode, self.samples, self.temperature = mode, samples, temperature

    @classmethod
    def from_objective(cls, objective) -> "LogitKD":
        return cls(objective.logit_mode, objective.logit_samples, objective.temperature)

    def __call__(self, cap, batch: dict):
        from alignkd.distill.losses import sparse_kl_sampled, sparse_kl_topk, temper_topk_target

        positions = batch["t_logit_positions"]
        rows, cols = (positions >= 0).nonzero(as_tuple=True)  # the real entries of the -1-padded table
        logits = cap.logits[rows, positions[rows, cols]].float()
        ids = batch["t_logit_ids"][rows, cols]
        values = batch["t_logit_values"][rows, cols]
        if self.mode != "topk":
            return sparse_kl_sampled(logits, ids, values, self.samples, self.temperature)
        tail = batch["t_logit_tail"][rows, cols]
        if self.temperature != 1.0:  # the cache holds the teacher at temperature 1
            values, tail = temper_topk_target(values, ids, tail, self.temperature, logits.shape[-1])
        return sparse_kl_topk(logits, ids, values, tail, self.temperature)


class VisionAlignment(LossTerm):
    """L_vis: the student's vision tokens against the teacher's, all tokens plus the top-k by text focus."""

    name, reads = "vis", ("t_vision", "t_focus")
    aligns = True

    def __init__(self, adapter, loss_scale: str, topk: int | None = None) -> None:
        self.adapter, self.loss_scale, self.topk = adapter, loss_scale, topk

    @classmethod
    def from_objective(cls, objective) -> "VisionAlignment":
        return cls(objective.projector_adapter, objective.loss_scale, objective.vision_topk)

    def __call__(self, cap, batch: dict):
        from alignkd.distill.losses import default_vision_topk, normalized_vision_loss, vision_loss

        loss = normalized_vision_loss if self.loss_scale == "normalized" else vision_loss
        mask = batch.get("t_vision_mask")
        topk = self.topk or default_vision_topk(batch["t_vision"].shape[1] if mask is None else mask.sum(1))
        return loss(cap.vision_tokens.float(), batch["t_vision"], batch["t_focus"], self.adapter, topk=topk,
                    vision_mask=mask)


class AttentionAlignment(LossTerm):
    """L_attn: the student's first-layer text-query x vision-key attention against the teacher's.

    A cache built with `--attn-store layer0` holds no rows: `teacher_rows(batch)` recomputes them
    (the objective's, from the cache's layer-0 kit), so only a run with this term on pays for it.
    `t_vision` and `t_image_grid_thw` are the kit's inputs there."""

    name, reads = "attn", ("t_attn", "t_text_positions", "t_vision", "t_image_grid_thw")
    aligns = True

    def __init__(self, head_adapter, mode: str, teacher_rows=None) -> None:
        self.head_adapter, self.mode, self.teacher_rows = head_adapter, mode, teacher_rows

    @classmethod
    def from_objective(cls, objective) -> "AttentionAlignment":
        return cls(objective.head_adapter, objective.attn_loss, objective.teacher_rows)

    def __call__(self, cap, batch: dict):
        from alignkd.distill.losses import attention_loss

        teacher = batch["t_attn"] if "t_attn" in batch else self.teacher_rows(batch)  # [B, T, Ht, Nv]
        positions = batch["t_text_positions"]                      # [B, T], -1 = padding
        gather = positions.clamp(min=0)
        student = cap.attn_text_vision                             # [B, Hs, L, Nv]
        idx = gather[:, None, :, None].expand(-1, student.shape[1], -1, student.shape[-1])
        student_rows = student.gather(2, idx).float()              # [B, Hs, T, Nv]
        return attention_loss(student_rows, teacher.permute(0, 2, 1, 3), positions >= 0, self.head_adapter,
                              mode=self.mode, vision_mask=batch.get("t_vision_mask"))


def resolve_attn_loss(attn_loss: str, loss_scale: str) -> str:
    """The attention term's form: `auto` is the KL under the normalized scale, the paper's MSE under `paper`."""
    if attn_loss != "auto":
        return attn_loss
    return "kl" if loss_scale == "normalized" else "mse"


@dataclass(frozen=True)
class TermSpec:
    term: type[LossTerm]
    default_weight: float
    help: str

    @property
    def option(self) -> str:
        """The `DistillConfig` field of its weight (the command line's `--w-NAME`)."""
        return f"w_{self.term.name}"


# The order is the order the objective sums the terms in (and so part of its numerics).
LOSS_TERMS: dict[str, TermSpec] = {spec.term.name: spec for spec in (
    TermSpec(CrossEntropy, 1.0, "next-token CE on the answer tokens"),
    TermSpec(LogitKD, 1.0, "KL to the teacher's cached next-token distributions"),
    TermSpec(VisionAlignment, 1.0, "vision tokens against the teacher's (L_vis)"),
    TermSpec(AttentionAlignment, 1.0, "layer-0 text-to-vision attention against the teacher's (L_attn)"),
)}


class LossWeights:
    """Each term's weight, by name (`LossWeights(ce=1.0, vis=0.0)`): a term left out takes its
    table default. Immutable, like the frozen dataclass it replaces."""

    def __init__(self, **weights: float) -> None:
        unknown = sorted(set(weights) - set(LOSS_TERMS))
        if unknown:
            raise TypeError(f"LossWeights: unknown loss terms {unknown}; known: {list(LOSS_TERMS)}")
        values = {name: float(weights.get(name, spec.default_weight)) for name, spec in LOSS_TERMS.items()}
        object.__setattr__(self, "_values", values)

    def __getattr__(self, name: str) -> float:
        try:
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value) -> None:
        raise AttributeError("LossWeights is immutable; build a new one")

    def __eq__(self, other) -> bool:
        return isinstance(other, LossWeights) and self._values == other._values

    def __hash__(self) -> int:
        return hash(tuple(self._values.items()))

    def __repr__(self) -> str:
        return "LossWeights(" + ", ".join(f"{k}={v:g}" for k, v in self._values.items()) + ")"

    def as_dict(self) -> dict[str, float]:
        return dict(self._values)

    def enabled(self) -> tuple[str, ...]:
        """The terms that run, in table order: a weight of 0 means the term is not computed at all."""
        return tuple(name for name, w in self._values.items() if w > 0)


def faded(weights: LossWeights, progress: float, fade: float) -> LossWeights:
    """`weights` at `progress` (the share of the run done, 0 to 1) under `--align-fade fade`: the
    alignment terms fall linearly from their weight to 0 over the first `fade` of the run and stay
    off after; the other terms keep theirs. `fade` 0: no schedule, `weights` themselves."""
    if fade <= 0:
        return weights
    scale = max(0.0, 1.0 - progress / fade)
    return LossWeights(**{name: w * scale if LOSS_TERMS[name].term.aligns else w
                          for name, w in weights.as_dict().items()})


def _only(*names: str) -> dict[str, float]:
    """These terms at their default weights, every other term of the table at 0."""
    return {name: spec.default_weight if name in names else 0.0 for name, spec in LOSS_TERMS.items()}


# Named objectives, as weights over the table; read at call time, so a term added to the
# table is off in every preset that does not name it and on (at its default) in `full`.
PRESETS = {
    "ce": lambda: _only("ce"),
    "logits": lambda: _only("ce", "logit"),
    "logits+vision": lambda: _only("ce", "logit", "vis"),
    "logits+attention": lambda: _only("ce", "logit", "attn"),
    "full": lambda: _only(*LOSS_TERMS),
}
DEFAULT_PRESET = "full"


def preset_weights(name: str) -> dict[str, float]:
    """{term: weight} of preset `name`, every term of the table named."""
    if name not in PRESETS:
        raise ConfigError(f"--preset {name}: unknown objective preset; choose one of {', '.join(PRESETS)}.")
    return PRESETS[name]()
