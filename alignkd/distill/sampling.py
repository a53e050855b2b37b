"""The order in which `alignkd distill` visits the cache: `--shuffle uniform` or `--shuffle window:N`.

- `uniform` (the default): a fresh permutation of every sample each epoch, drawn from
  (seed, epoch). What every SGD recipe assumes, and what a local cache can afford: a
  sample read is one `preadv` of its own byte ranges wherever it sits, so a shuffled
  order costs no more than a sequential one once the shards are in the page cache
  (bench/cache_storage.py measures both orders side by side; BENCHMARKS.md).
- `window:N`: the shards are shuffled, taken N at a time, and the samples of those N
  shards are shuffled among themselves, so each DataLoader worker streams through N
  shard files at a time: for caches far larger than memory on slow or remote storage.
  A batch then mixes samples of N shards only; docs/method.md has what that cost students
  on the development worlds.

Both visit every sample exactly once per epoch, draw a new order each epoch (the Trainer
calls `set_epoch`), and give the same order for the same seed. Under DDP every rank draws
the same order and accelerate hands each rank every world_size-th batch of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch.utils.data import Sampler

from alignkd.errors import ConfigError


@dataclass(frozen=True)
class TrainOrder:
    kind: str = "uniform"          # "uniform" | "window"
    window: int = 0                # shards shuffled together (kind "window")

    def __str__(self) -> str:
        return self.kind if self.kind == "uniform" else f"window:{self.window}"


def parse_order(text: str) -> TrainOrder:
    """`uniform`, `window:N` or `window N` -> TrainOrder; anything else is one clear sentence."""
    kind, _, window = str(text).strip().replace(" ", ":", 1).partition(":")
    if kind == "uniform" and not window:
        return TrainOrder()
    if kind == "window" and window.isdigit() and int(window) >= 1:
        return TrainOrder("window", int(window))
    raise ConfigError(f"--shuffle must be 'uniform' or 'window:N' with N >= 1 shards, not {text!r}.")


class _EpochSampler(Sampler[int]):
    """A sampler whose order is a function of (seed, epoch) only."""

    def __init__(self, shard_of: np.ndarray, seed: int = 0) -> None:
        self.shard_of = np.asarray(shard_of)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.shard_of)

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng((self.seed, self.epoch))


class UniformSampler(_EpochSampler):
    def __iter__(self):
        yield from self._rng().permutation(len(self.shard_of)).tolist()


class ShardWindowSampler(_EpochSampler):
    def __init__(self, shard_of: np.ndarray, window: int, seed: int = 0) -> None:
        if window < 1:
            raise ValueError(f"shard window must be at least 1, not {window}")
        super().__init__(shard_of, seed)
        self.window = window

    def __iter__(self):
        rng = self._rng()
        shards = np.unique(self.shard_of)
        order = rng.permutation(shards)
        members = {int(s): np.flatnonzero(self.shard_of == s) for s in shards}
        for lo in range(0, len(order), self.window):
            pool = np.concatenate([members[int(s)] for s in order[lo:lo + self.window]])
            yield from rng.permutation(pool).tolist()


def make_sampler(order: TrainOrder, shard_of: np.ndarray, seed: int) -> _EpochSampler:
    if order.kind == "window":
        return ShardWindowSampler(shard_of, order.window, seed)
    return UniformSampler(shard_of, seed)
