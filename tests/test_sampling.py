"""The training orders (`--shuffle uniform|window:N`): every sample once per epoch, a new order
each epoch, the same order for the same seed, on one process and on two gloo ranks."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from alignkd.distill.sampling import TrainOrder, make_sampler, parse_order
from alignkd.errors import ConfigError

PROBE = Path(__file__).with_name("order_probe.py")
SHARD_OF = np.repeat(np.arange(7), [8, 8, 8, 8, 8, 8, 5])  # 53 samples, a short last shard


def epochs(order: str, seed: int, n: int = 3, shard_of=SHARD_OF) -> list[list[int]]:
    sampler = make_sampler(parse_order(order), shard_of, seed)
    out = []
    for epoch in range(n):
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


@pytest.mark.parametrize("order", ["uniform", "window:1", "window:3", "window:100"])
def test_each_epoch_visits_every_sample_once_in_a_new_order_fixed_by_the_seed(order):
    runs = epochs(order, seed=5)
    for e in runs:
        assert sorted(e) == list(range(len(SHARD_OF)))
    assert runs[0] != runs[1] != runs[2]
    assert runs == epochs(order, seed=5)
    assert runs != epochs(order, seed=6)


def test_a_window_keeps_consecutive_samples_within_its_shards():
    order = epochs("window:3", seed=0, n=1)[0]
    shards = SHARD_OF[order]
    windows, seen = [], set()
    for s in shards:  # the shards in the order they first appear, grouped 3 at a time
        if s not in seen:
            seen.add(s)
            windows.append(s)
    groups = [set(windows[i:i + 3]) for i in range(0, len(windows), 3)]
    lengths = [sum((SHARD_OF == s).sum() for s in g) for g in groups]
    start = 0
    for group, length in zip(groups, lengths):
        assert set(shards[start:start + length]) == group
        start += length


def test_uniform_mixes_every_shard_into_the_first_batch():
    # a uniform permutation reaches the whole cache at once; window:1 reads shard after shard
    # (16 samples span at most 3 shards: the 5-sample shard, an 8, and part of another)
    first = [SHARD_OF[epochs(o, seed=s, n=1)[0][:16]] for o in ("uniform", "window:1") for s in range(5)]
    assert min(len(set(f)) for f in first[:5]) >= 4
    assert max(len(set(f)) for f in first[5:]) <= 3


@pytest.mark.parametrize("text", ["bogus", "window", "window:0", "window:x", "uniform:3", ""])
def test_a_bad_order_is_one_sentence(text):
    with pytest.raises(ConfigError, match="--shuffle must be 'uniform' or 'window:N'"):
        parse_order(text)


def test_order_spellings():
    assert parse_order("uniform") == TrainOrder()
    assert parse_order("window:4") == parse_order("window 4") == TrainOrder("window", 4)
    assert str(TrainOrder("window", 4)) == "window:4"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


ORDERS = ("uniform", "window:2")


def _probe(tmp_path: Path, ranks: int) -> dict[str, list[list[int]]]:
    """Each order's indices per rank, as the Trainer fed them to the model (seed 3)."""
    out = tmp_path / f"ranks{ranks}"
    out.mkdir()
    launch = [sys.executable] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    proc = subprocess.run([*launch, str(PROBE), str(out), ",".join(ORDERS), "3"], capture_output=True, text=True,
                          timeout=240, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {o: [json.loads((out / f"{o.replace(':', '-')}-r{r}.json").read_text()) for r in range(ranks)]
            for o in ORDERS}


def test_the_trainer_draws_the_same_order_on_one_process_and_on_two_gloo_ranks(tmp_path):
    from tests.order_probe import BATCH, EPOCHS, N, SHARD

    singles, pairs = _probe(tmp_path, ranks=1), _probe(tmp_path, ranks=2)
    for order in ORDERS:
        [single] = singles[order]
        per_epoch = [single[e * N:(e + 1) * N] for e in range(EPOCHS)]
        assert len(single) == N * EPOCHS
        for e in per_epoch:
            assert sorted(e) == list(range(N))
        assert per_epoch[0] != per_epoch[1] != per_epoch[2]
        # the Trainer calls set_epoch: its epoch e is the sampler's epoch e for this seed
        assert per_epoch == epochs(order, seed=3, shard_of=np.arange(N) // SHARD)
        r0, r1 = pairs[order]
        # accelerate hands rank r every second batch of the one order all ranks draw
        merged = []
        for k in range(len(r0) // BATCH):
            merged += r0[k * BATCH:(k + 1) * BATCH] + r1[k * BATCH:(k + 1) * BATCH]
        assert merged == single, order
