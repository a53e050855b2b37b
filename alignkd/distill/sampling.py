"""Training order that reads a cache shard by shard: shuffled, but only within a window of shards.

A uniform shuffle over millions of samples touches every shard file in every batch: on
object storage that is one request per sample against cold objects, and locally it
defeats the page cache and readahead. Here the shards are shuffled, taken W at a time,
and the samples of those W shards are shuffled among themselves, so each DataLoader
worker streams through a few shard files at a time (which the reader prefetches) while
a batch still mixes samples from W shards. Each epoch draws a new order from
(seed, epoch), as `set_epoch` is called by the Trainer.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import Sampler

SHARD_WINDOW = 4  # shards shuffled together: 4 x 256 samples mix well and keep 4 files hot per worker


class ShardWindowSampler(Sampler[int]):
    def __init__(self, shard_of: np.ndarray, window: int = SHARD_WINDOW, seed: int = 0) -> None:
        if window < 1:
            raise ValueError(f"shard window must be at least 1, not {window}")
        self.shard_of = np.asarray(shard_of)
        self.window, self.seed, self.epoch = window, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.shard_of)

    def __iter__(self):
        rng = np.random.default_rng((self.seed, self.epoch))
        shards = np.unique(self.shard_of)
        order = rng.permutation(shards)
        members = {int(s): np.flatnonzero(self.shard_of == s) for s in shards}
        for lo in range(0, len(order), self.window):
            pool = np.concatenate([members[int(s)] for s in order[lo:lo + self.window]])
            yield from rng.permutation(pool).tolist()
