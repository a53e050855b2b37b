"""Sparse encodings of the teacher's next-token distribution (pure torch).

The cache cannot hold dense logits (131 MB per 2k-token sample at a 32k vocabulary),
so each distilled position keeps a handful of ids. Two encodings, both specified in
docs/method.md and measured in bench/logit_fidelity.py:

- `encode_topk`: the true top-k ids with the teacher's full-vocabulary log-probs and
  the tail mass `r_p = 1 - sum_S p`, for the (k+1)-bucket "ghost token" KL. The values
  are never renormalised: that would bias the target.
- `encode_sampled`: N draws from p with replacement, kept as unique ids + counts, for
  the unbiased RS-KD loss `-sum (c_i/N) log q_i`.

Position convention: row t of a target is the distribution of the token at t+1, i.e.
the teacher's logits at position t (see `alignkd.targets.select_positions`).

Storage: `to_storage`/`from_storage` give the compact dtypes a writer keeps
(ids uint16 below a 65536 vocabulary, else int32; log-probs and tail fp16; counts
uint8 up to N=255) and `bytes_per_token` counts exactly those bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

PAD_ID = -1  # in-memory padding id; stored as the dtype's max value for unsigned ids
UINT16_VOCAB_LIMIT = 65535  # ids 0..65534 fit uint16 with 65535 left free as padding
SAMPLE_CHUNK_ROWS = 256  # float64 CDF rows per chunk: 256 x 32k x 8 B = 64 MB


@dataclass
class SparseTarget:
    """Sparse next-token targets for P positions.

    mode: "topk" or "sampled".
    ids: LongTensor [P, K], PAD_ID (-1) where padded.
    values: FloatTensor [P, K]; teacher log-probs (topk) or draw counts (sampled).
    tail: FloatTensor [P]; r_p = 1 - sum_S p for topk, 0 for sampled.
    n: number of draws per position (sampled), 0 for topk.
    """

    mode: str
    ids: Tensor
    values: Tensor
    tail: Tensor
    n: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("topk", "sampled"):
            raise ValueError(f"SparseTarget mode must be 'topk' or 'sampled', got {self.mode!r}")
        if self.ids.shape != self.values.shape or self.ids.shape[:1] != self.tail.shape:
            raise ValueError(
                f"SparseTarget shapes disagree: ids {tuple(self.ids.shape)}, "
                f"values {tuple(self.values.shape)}, tail {tuple(self.tail.shape)}"
            )

    @property
    def width(self) -> int:
        return self.ids.shape[1]


def _teacher_logp(logits: Tensor, temperature: float) -> Tensor:
    if logits.dim() != 2:
        raise ValueError(f"expected logits [P, V], got shape {tuple(logits.shape)}")
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def encode_topk(logits: Tensor, k: int, temperature: float = 1.0) -> SparseTarget:
    """Top-k ids, their full-vocabulary log-probs at `temperature`, and the tail mass.

    The tail is the logsumexp of the complement rather than 1 - sum(top-k): the
    subtraction rounds a 1e-9 tail to 0 in float32, the complement keeps it exact.
    """
    logp = _teacher_logp(logits, temperature)
    k = min(k, logp.shape[-1])
    values, ids = logp.topk(k, dim=-1)
    rest = logp.scatter(-1, ids, float("-inf"))
    tail = torch.logsumexp(rest, dim=-1).exp().clamp(0.0, 1.0)
    return SparseTarget("topk", ids, values, tail)


def encode_sampled(
    logits: Tensor,
    n: int,
    generator: torch.Generator,
    temperature: float = 1.0,
    width: int | None = None,
) -> SparseTarget:
    """Draw n ids per position from p (with replacement); keep unique ids + counts.

    Draws use inverse-CDF sampling on `torch.rand(P, n, generator=generator)` drawn on
    the generator's device, so the random stream depends only on the generator's
    seed and the number of positions: a builder that seeds one generator per sample
    from (build seed, sample id) gets identical draws on resume. Use a CPU generator
    (u is only P x n): its stream is the same whatever device holds the logits. Draws
    are bit-identical on the same device type; on an H200, CUDA logits with the same
    CPU generator matched CPU logits in 99.2% of rows (2048 x 32k, N=64), since
    last-bit softmax differences move draws that land on a CDF boundary. Rows are
    sorted by id; `width` (default n, the most unique ids N draws can give) is the
    padded width.
    """
    logp = _teacher_logp(logits, temperature)
    P, V = logp.shape
    width = n if width is None else width
    u = torch.rand(P, n, generator=generator, device=generator.device, dtype=torch.float64)
    draws = torch.empty(P, n, dtype=torch.long, device=logp.device)
    for lo in range(0, P, SAMPLE_CHUNK_ROWS):
        cdf = logp[lo : lo + SAMPLE_CHUNK_ROWS].double().exp().cumsum(-1)
        uu = u[lo : lo + SAMPLE_CHUNK_ROWS].to(cdf.device) * cdf[:, -1:]
        # right=True: the first id whose CDF exceeds u, so p=0 ids are never drawn
        draws[lo : lo + SAMPLE_CHUNK_ROWS] = torch.searchsorted(cdf, uu, right=True).clamp_(max=V - 1)
    ids, counts = _unique_counts(draws, width)
    return SparseTarget("sampled", ids, counts, torch.zeros(P, device=logp.device), n=n)


def _unique_counts(draws: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Row-wise unique values (ascending) and their counts, padded to `width`."""
    P, n = draws.shape
    ordered = draws.sort(dim=-1).values
    is_new = torch.ones_like(ordered, dtype=torch.bool)
    is_new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    slot = is_new.long().cumsum(-1) - 1
    most = int(slot[:, -1].max()) + 1 if P else 0
    if most > width:
        raise ValueError(f"encode_sampled: a position has {most} unique ids but width is {width}")
    ids = torch.full((P, width), PAD_ID, dtype=torch.long, device=draws.device)
    counts = torch.zeros(P, width, device=draws.device)
    ids.scatter_(1, slot, ordered)
    counts.scatter_add_(1, slot, torch.ones(P, n, device=draws.device))
    return ids, counts


@dataclass(frozen=True)
class TeacherStats:
    """Per-sample teacher statistics stored next to its cached targets.

    ce: mean CE (nats, temperature 1) of the teacher on the answer tokens, NaN if none.
    entropy: mean entropy (nats, temperature 1) of p over the stored positions.
    tail: mean top-k tail mass r_p over the stored positions (0 for sampled targets).
    num_answer: number of positions with an answer label.
    """

    ce: float
    entropy: float
    tail: float
    num_answer: int


def teacher_stats(logits: Tensor, labels_next: Tensor, target: SparseTarget) -> TeacherStats:
    """Statistics of the teacher at the stored positions.

    logits: [P, V] teacher logits at the stored positions t.
    labels_next: [P] the label at t+1 (-100 where t+1 is not an answer token).
    target: the sparse target built from these logits (for the tail mass).
    A sample with no answer labels has ce = NaN rather than 0, so it is not mistaken
    for a perfect teacher when stats are averaged.
    """
    logp = _teacher_logp(logits, 1.0)
    entropy = -(logp.exp() * logp).sum(-1)
    answer = labels_next != -100
    nll = -logp[answer].gather(-1, labels_next[answer, None]).squeeze(-1)
    ce = float(nll.mean()) if answer.any() else float("nan")
    tail = float(target.tail.float().mean()) if target.tail.numel() else 0.0
    ent = float(entropy.mean()) if entropy.numel() else float("nan")
    return TeacherStats(ce=ce, entropy=ent, tail=tail, num_answer=int(answer.sum()))


def id_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id and the padding sentinel fit, else int32."""
    return np.dtype(np.uint16) if vocab_size <= UINT16_VOCAB_LIMIT else np.dtype(np.int32)


def count_dtype(n: int) -> np.dtype:
    return np.dtype(np.uint8) if n <= 255 else np.dtype(np.uint16)


def to_storage(target: SparseTarget, vocab_size: int) -> dict[str, np.ndarray]:
    """The compact arrays a writer stores: ids, values, and (topk only) tail.

    Unsigned ids store padding as the dtype's max value; log-probs and tail are fp16
    (the relative error of fp16 log-probs is below the bench's loss tolerance).
    """
    dt = id_dtype(vocab_size)
    ids = target.ids.cpu().numpy()
    pad = np.iinfo(dt).max if dt.kind == "u" else PAD_ID
    out = {"ids": np.where(ids < 0, pad, ids).astype(dt)}
    if target.mode == "topk":
        out["values"] = target.values.cpu().numpy().astype(np.float16)
        out["tail"] = target.tail.cpu().numpy().astype(np.float16)
    else:
        out["values"] = target.values.cpu().numpy().astype(count_dtype(target.n))
    return out


def from_storage(arrays: dict[str, np.ndarray], mode: str, n: int = 0) -> SparseTarget:
    """Inverse of `to_storage`: float32 values, long ids with PAD_ID padding."""
    raw = arrays["ids"]
    ids = raw.astype(np.int64)
    if raw.dtype.kind == "u":
        ids[raw == np.iinfo(raw.dtype).max] = PAD_ID
    values = torch.from_numpy(arrays["values"].astype(np.float32))
    tail = arrays.get("tail", np.zeros(ids.shape[0], np.float32)).astype(np.float32)
    return SparseTarget(mode, torch.from_numpy(ids), values, torch.from_numpy(tail), n=n)


def bytes_per_token(target: SparseTarget, vocab_size: int, ragged: bool = False) -> float:
    """Stored bytes per position under `to_storage`'s dtypes.

    ragged=False: fixed-width rows, as `to_storage` writes them.
    ragged=True: only the non-padding entries plus a one-byte entry count per row
    (what a writer that flattens rows with offsets would keep; only useful for
    sampled targets, whose unique-id count varies).
    """
    P = max(target.ids.shape[0], 1)
    per_entry = id_dtype(vocab_size).itemsize
    per_entry += 2 if target.mode == "topk" else count_dtype(target.n).itemsize
    tail = 2 if target.mode == "topk" else 0
    if ragged:
        entries = int((target.ids >= 0).sum())
        return entries * per_entry / P + tail + 1
    return target.width * per_entry + tail
