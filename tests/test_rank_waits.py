"""`cache build` under torchrun when ranks do not meet (issue 23), two gloo processes on CPU:

- a rank that hangs (SIGSTOPped after its first shard): the rank that finished says every
  ALIGNKD_WAIT_REPORT_S whom it waits for, and `--timeout` ends the wait with one sentence
  naming the rank not heard from, instead of gloo's 72-hour wait in silence;
- the same bad option on every rank is one `error:` line, not one per rank;
- two nodes, each with its own (unshared) `--out`: rank 1 says that every node must see the
  same `--out`, and rank 0, on the other node, says that rank 1 failed and why.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time

import pytest

from tests.support.world import make_image, write_manifest
from test_rank_killed import CONV, launch
from test_scale import launch_node
from test_distributed import _free_port


def errors(stderr: str) -> list[str]:
    assert not re.search(r'File "[^"]*alignkd/', stderr), stderr[-3000:]  # no alignkd traceback
    return [line for line in stderr.splitlines() if "error:" in line]


def manifest(root, n: int = 8):
    records = []
    for i in range(n):
        make_image(root / "images" / f"{i}.png", seed=i)
        records.append({"id": f"w{i}", "image": f"{i}.png", "conversations": CONV})
    return write_manifest(root / "train.json", records)


def build_args(root, teacher, out, *extra):
    return ["cache", "build", "--teacher", teacher, "--data", root / "train.json", "--images", root / "images",
            "--shard-size", "2", "--batch-size", "1", "--no-progress", "--out", out, *extra]


def test_a_hung_rank_is_named_while_waited_for_and_the_timeout_ends_the_wait(tmp_path, tiny_llava_dir):
    manifest(tmp_path)
    # rank 1 is held after its first committed shard (tests/torchrun_pause.py), then stopped cold
    proc = launch(build_args(tmp_path, tiny_llava_dir, tmp_path / "cache", "--timeout", "0.1"), tmp_path,
                  ALIGNKD_PAUSE_RANK="1", ALIGNKD_WAIT_REPORT_S="1")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    marker, deadline = tmp_path / "held.pid-r1", time.monotonic() + 120
    while not marker.is_file():
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
        time.sleep(0.05)
    held = int(marker.read_text())
    os.kill(held, signal.SIGSTOP)
    while not any(line.startswith("error:") for line in lines):  # rank 0 gives up after --timeout
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
        time.sleep(0.1)
    os.kill(held, signal.SIGKILL)  # what the user does next; torchrun would wait 30 s for a stopped process
    proc.wait(timeout=60)
    reader.join(timeout=10)
    stderr = "".join(lines)
    assert proc.returncode != 0
    waiting = [ln for ln in stderr.splitlines() if ln.startswith("rank 0: waiting")]
    assert len(waiting) >= 3, stderr[-3000:]
    assert re.fullmatch(r"rank 0: waiting for rank 1 to finish their rows \(\d+ s so far, --timeout 0.1 minutes\)\.",
                        waiting[0]), waiting
    assert errors(stderr) == ["error: rank 1 did not finish their rows within --timeout 0.1 minutes, while rank 0 "
                              "waited; the shards committed so far are kept: stop the launch and rerun the same "
                              "command to resume."], stderr[-3000:]


@pytest.mark.parametrize("case", ["every rank", "rank 0 only"])
def test_an_error_is_printed_once(tmp_path, tiny_llava_dir, case):
    """A bad option fails every rank alike; a directory that is not a cache fails rank 0 alone
    (it opens the cache while the others wait for it), and they stay silent."""
    manifest(tmp_path, 1)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    extra, expected = {
        "every rank": (["--batch-size", "0"], "--batch-size must be at least 1."),
        "rank 0 only": ([], f"{tmp_path / 'junk'} exists and is not an alignkd cache (no cache.json); choose an "
                            "empty or new directory."),
    }[case]
    proc = launch(build_args(tmp_path, tiny_llava_dir, tmp_path / "junk", *extra), tmp_path)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert errors(stderr) == [f"error: {expected}"], stderr[-3000:]
    assert (tmp_path / "junk" / "notes.txt").read_text() == "mine"


def test_nodes_with_their_own_out_are_told_to_share_one(tmp_path, tiny_llava_dir):
    manifest(tmp_path)
    port = _free_port()
    nodes = [launch_node(n, port, build_args(tmp_path, tiny_llava_dir, tmp_path / f"out-node{n}"), tmp_path,
                         ALIGNKD_SAME_OUT_WAIT_S="1") for n in (0, 1)]
    results = [node.communicate(timeout=180) for node in nodes]
    assert [node.returncode != 0 for node in nodes] == [True, True]
    sentence = (f"every node must see the same --out: rank 1 sees {tmp_path / 'out-node1'} without rank 0's "
                "cache.json (give every node a shared directory, or a cache on object storage).")
    assert errors(results[1][1]) == [f"error: {sentence}"], results[1][1][-3000:]
    node0 = errors(results[0][1])
    assert len(node0) == 1 and node0[0].startswith("error: rank 1 (on another node) failed") and sentence in node0[0], \
        results[0][1][-3000:]
    assert not (tmp_path / "out-node1").exists()  # nothing written where rank 0's cache is not
