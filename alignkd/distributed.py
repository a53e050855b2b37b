"""The few torch.distributed facts both stages need under `torchrun`.

Over 300 lines on purpose: the ranks' meeting, waiting and error protocol is one piece;
split, each side of it would lose sight of the other.

The cache build shards the manifest by rank; distillation leaves process groups to
the HF Trainer. Nothing here starts a process group unless torchrun set WORLD_SIZE > 1.
Besides the process group, the ranks share torchrun's key-value store: the build's ranks
meet through it with a bounded, talkative wait (`meet`), and a failing rank leaves its
sentence there, so that an error is printed once per launch (`say_error`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from alignkd.errors import AlignKDError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # processes on this node

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# The build's ranks wait for each other only at the start and at the end, where the last
# rank may still have hours of rows to go (a resumed build whose other nodes had finished);
# the default 30 minutes would fail that wait. A rank that dies is noticed anyway: its
# connections close, or torchrun stops the survivors.
BUILD_WAIT_HOURS = 72


def dist_info() -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", 1))
    return DistInfo(int(os.environ.get("RANK", 0)), world, int(os.environ.get("LOCAL_RANK", 0)),
                    int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def init_process_group() -> DistInfo:
    """Join torchrun's process group when there is one (the cache build's).

    Always gloo: the build exchanges a barrier and a few counts in CPU tensors, which NCCL
    cannot carry, and it works the same with one process per GPU or one per node.
    """
    from datetime import timedelta

    import torch.distributed as dist

    info = dist_info()
    if info.world_size > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(hours=BUILD_WAIT_HOURS))
    return info


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks (identity in a single process)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    # NCCL (the Trainer's group on GPUs) carries CUDA tensors only
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ------------------------------------------------------------------ a rank that stopped
# Under torchrun a rank that dies (SIGKILL, OOM killer) surfaces in the others either as a
# collective that fails ("Connection closed by peer" from gloo) or as the SIGTERM torchrun
# sends the survivors. Either way the user gets one sentence naming the rank that stopped
# and how to resume, from the lowest surviving rank on the node, instead of a traceback.

PEER_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe",
             "remote worker crashing", "communicator was aborted", "socket timeout")

RESUME_HINTS = {
    "build": "the shards committed so far are kept: rerun the same command to resume",
    "distill": "rerun the same command with --resume to continue from the last checkpoint",
}


def under_torchrun() -> bool:
    return dist_info().world_size > 1 and "TORCHELASTIC_RUN_ID" in os.environ


def is_peer_failure(err: BaseException) -> bool:
    """A collective that failed because another rank went away (not a bug of ours)."""
    if not under_torchrun() or not isinstance(err, RuntimeError):
        return False
    text = str(err).lower()
    return any(sign in text for sign in PEER_LOST)


def _sibling_ranks() -> dict[int, int] | None:
    """rank -> pid of the live worker processes torchrun started on this node (Linux /proc)."""
    parent, found = os.getppid(), {}
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) != parent or fields[0] in "ZX":  # fields: state, ppid, ...
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            if b"RANK" in env:
                found[int(env[b"RANK"])] = pid
        except (OSError, ValueError, IndexError):
            continue
    return found


def stopped_ranks() -> tuple[list[int], list[int]] | None:
    """(ranks of this node whose process is gone, ranks still alive), or None off Linux."""
    alive = _sibling_ranks()
    if alive is None:
        return None
    info = dist_info()
    first = info.rank - info.local_rank
    node = range(first, first + info.local_world_size)
    return [r for r in node if r not in alive], sorted(set(alive) | {info.rank})


_report = {"state": ""}  # "", "reporting", "done": printed once, whichever path comes first


def _elsewhere(info: DistInfo, from_peer: bool) -> str:
    """Who stopped, when no rank of this node did: the ranks of the other nodes. A failed
    collective proves one of them went away; a bare SIGTERM may also be torchrun interrupted."""
    first = info.rank - info.local_rank
    remote = [r for r in range(info.world_size) if not first <= r < first + info.local_world_size]
    if not from_peer:
        return "another rank stopped (on another node, or torchrun was interrupted)"
    return f"rank {remote[0]} (on another node) stopped" if len(remote) == 1 else "a rank on another node stopped"


def report_stopped_rank(command: str, from_peer: bool = True) -> None:
    """Print the sentence once, from the lowest surviving rank of this node."""
    import sys
    import time

    if _report["state"]:
        return
    _report["state"] = "reporting"
    info = dist_info()
    for _ in range(10):  # a killed peer's sockets close a moment before its process is gone
        found = stopped_ranks()
        stopped, alive = found if found is not None else ([], [info.rank])
        if stopped or found is None:
            break
        time.sleep(0.1)
    failed = _failed_peers()
    first = info.rank - info.local_rank
    if min(alive) != info.rank or any(first <= r < first + info.local_world_size for r in failed):
        _report["state"] = "done"  # a lower surviving rank says it, or the failed rank said why
        return
    hint = RESUME_HINTS.get(command.split()[-1], "rerun the same command")
    if failed:  # a rank on another node stopped on an error: its sentence, here too
        rank, text = next(iter(failed.items()))
        sys.stderr.write(f"error: rank {rank} (on another node) failed during `{command}`, so rank {info.rank} "
                         f"stopped too: {text}\n")
    else:
        who = f"rank {', '.join(map(str, stopped))} stopped" if stopped else _elsewhere(info, from_peer)
        sys.stderr.write(f"error: {who} during `{command}`, so rank {info.rank} stopped too; {hint}.\n")
    sys.stderr.flush()
    _report["state"] = "done"


def _failed_peers() -> dict[int, str]:
    """The sentences other ranks failed with; none when the store cannot be reached (it is
    torchrun's, and torchrun may be going away)."""
    try:
        return peer_errors()
    except (RuntimeError, ValueError):
        return {}


def exit_when_torchrun_stops_us(command: str) -> None:
    """torchrun SIGTERMs the survivors when a rank dies: say so in one sentence and exit 1
    at once (a SIGTERM leaves files exactly as a SIGKILL would, which resume handles)."""
    import signal

    if not under_torchrun():
        return

    def stop(signum, frame):
        if _report["state"] == "reporting":
            return  # the failed collective is already saying it; it exits right after
        report_stopped_rank(command, from_peer=False)
        os._exit(1)

    signal.signal(signal.SIGTERM, stop)


# ------------------------------------------------------------------ what ranks tell each other
# A small key-value store every rank can reach, before and after the process group exists:
# torchrun's own (the agent's TCPStore at MASTER_ADDR:MASTER_PORT), else the process
# group's. Through it a rank says "I finished", "the cache I opened is this one" or "I
# failed with this sentence", and the others can wait for a word with a bound and say whom
# they wait for, where a collective would only block until gloo's timeout (72 hours).

REPORT_EVERY_S = float(os.environ.get("ALIGNKD_WAIT_REPORT_S", 30))  # tests make it short
ERROR_WAIT_S = 5.0  # how long a failing rank > 0 waits to hear whether rank 0 failed the same way
_store: dict = {}


class RanksNotHeardError(AlignKDError):
    """A wait for other ranks ran past --timeout, or a rank waited for failed. `said_nearby`:
    that rank is on this node and printed its own sentence, so this one need not repeat it."""

    def __init__(self, message: str, said_nearby: bool = False) -> None:
        super().__init__(message)
        self.said_nearby = said_nearby


def shared_store():
    """The store all ranks of this torchrun launch share (prefixed by restart), or None."""
    if "store" in _store:
        return _store["store"]
    from datetime import timedelta

    import torch.distributed as dist

    store = None
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        try:
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                  timeout=timedelta(seconds=30))
        except (RuntimeError, ValueError, KeyError):
            store = None
    if store is None and dist.is_available() and dist.is_initialized():
        store = dist.distributed_c10d._get_default_store()
    if store is not None:  # cached once found: the process group's may only exist later
        store = _store["store"] = dist.PrefixStore(f"alignkd/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}",
                                                   store)
    return store


def _read(store, key: str) -> str | None:
    return store.get(key).decode() if store.check([key]) else None


def peer_errors(store=None) -> dict[int, str]:
    """rank -> the sentence that rank failed with (from `say_error`), for every other rank that did."""
    store = store or shared_store()
    info = dist_info()
    if store is None:
        return {}
    found = {r: _read(store, f"error/{r}") for r in range(info.world_size) if r != info.rank}
    return {r: text for r, text in found.items() if text is not None}


def say_error(message: str, quiet: bool = False) -> None:
    """Print `error: message` once per launch, not once per rank.

    Every rank publishes its sentence. Rank 0 prints its own; another rank stays silent when
    rank 0 failed with the same sentence (bad options fail every rank alike) and otherwise
    prints it, marked with its rank unless the sentence names it already. `quiet`: the
    sentence only repeats one a rank of this node printed (it stopped us), so print nothing.
    """
    import sys
    import time

    info = dist_info()
    if info.world_size == 1:
        sys.stderr.write(f"error: {message}\n")
        return
    if quiet:
        _report["state"] = "done"
        return
    _report["state"] = "reporting"  # torchrun's SIGTERM, arriving meanwhile, adds no sentence of its own
    store = shared_store()
    if store is not None:
        store.set(f"error/{info.rank}", message)
    first = None
    deadline = time.monotonic() + ERROR_WAIT_S
    while info.rank and store is not None and first is None and time.monotonic() < deadline:
        first = _read(store, "error/0")
        time.sleep(0.05 if first is None else 0)
    if first != message:
        named = info.rank == 0 or f"rank {info.rank} " in message
        sys.stderr.write(f"error: {message}\n" if named else f"error: rank {info.rank}: {message}\n")
    sys.stderr.flush()
    _report["state"] = "done"


def meet(step: str, doing: str, timeout_minutes: float | None, value: str = "") -> dict[int, str]:
    """A barrier of every rank at `step` that says whom it waits for: what each rank passed as
    `value`, once all arrived.

    The barrier itself runs in a thread, so that a rank that dies still fails it at once (its
    connections close); meanwhile this thread reads from the store which ranks have not
    arrived, names them every REPORT_EVERY_S (the lowest waiting rank of each node does),
    ends the wait with one sentence after `timeout_minutes`, and at once when a rank it waits
    for failed with a sentence of its own.
    """
    import threading

    info, store = dist_info(), shared_store()
    store.set(f"{step}/{info.rank}", value or "")
    outcome: dict = {}

    def run_barrier() -> None:
        try:
            barrier()
        except RuntimeError as err:  # a rank went away; its sentence, if it said one, is better
            outcome["error"] = err

    waiter = threading.Thread(target=run_barrier, name=f"alignkd-{step}", daemon=True)
    waiter.start()
    watch = _Watch(store, step, doing, timeout_minutes)
    while waiter.is_alive():
        watch.check()
        waiter.join(0.2)
    if "error" in outcome:
        watch.raise_for_failed_peer()
        raise outcome["error"]
    return {r: store.get(f"{step}/{r}").decode() for r in range(info.world_size)}


class _Watch:
    """Who has not reached `step` yet, said now and then, and the --timeout bound."""

    def __init__(self, store, step: str, doing: str, timeout_minutes: float | None) -> None:
        import time

        self.store, self.step, self.doing, self.info = store, step, doing, dist_info()
        self.bound = 60 * (timeout_minutes if timeout_minutes is not None else BUILD_WAIT_HOURS * 60)
        self.start = time.monotonic()
        self.next_report = self.start + REPORT_EVERY_S
        first = self.info.rank - self.info.local_rank
        self.node = range(first, first + self.info.local_world_size)

    def missing(self) -> list[int]:
        return [r for r in range(self.info.world_size) if not self.store.check([f"{self.step}/{r}"])]

    def raise_for_failed_peer(self, among: list[int] | None = None) -> None:
        failed = {r: text for r, text in peer_errors(self.store).items() if among is None or r in among}
        if failed:
            r, text = next(iter(failed.items()))
            where = "" if r in self.node else " (on another node)"
            raise RanksNotHeardError(f"rank {r}{where} failed while rank {self.info.rank} waited for it to "
                                     f"{self.doing}: {text}", said_nearby=not where)

    def check(self) -> None:
        import sys
        import time

        now = time.monotonic()
        if now < self.next_report and now - self.start <= self.bound:
            return
        missing = self.missing()
        if not missing:  # all arrived: the barrier returns in a moment
            return
        self.raise_for_failed_peer(missing)
        who = f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))}"
        if now - self.start > self.bound:
            raise RanksNotHeardError(
                f"{who} did not {self.doing} within --timeout {self.bound / 60:g} minutes, while rank "
                f"{self.info.rank} waited; the shards committed so far are kept: stop the launch and rerun the "
                "same command to resume.")
        self.next_report += REPORT_EVERY_S
        if min(r for r in self.node if r not in missing) == self.info.rank:
            sys.stderr.write(f"rank {self.info.rank}: waiting for {who} to {self.doing} "
                             f"({now - self.start:.0f} s so far, --timeout {self.bound / 60:g} minutes).\n")
            sys.stderr.flush()
