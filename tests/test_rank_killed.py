"""A rank SIGKILLed under torchrun (two gloo processes on CPU): the survivor says in one
sentence which rank stopped and how to resume, no alignkd traceback, no half-written shard
or student, and the same command (with --resume for distill) finishes the job: the build
to a cache equal to an uninterrupted one, the training from its last checkpoint.

Rank 1 is held at a known moment by tests/torchrun_pause.py (after its first committed
shard, after its first checkpoint) so that the kill lands there and not after the end.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from alignkd.cache.reader import open_cache
from alignkd.cli import main
from tests.support.world import make_image, write_manifest
from test_distributed import _free_port

from bench import torture

REPO = Path(__file__).resolve().parents[1]
PAUSE = Path(__file__).with_name("torchrun_pause.py")
CONV = [{"from": "human", "value": "<image>\nwhat is the colour ?"}, {"from": "gpt", "value": "red"}]


def launch(args, cwd: Path, **env) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ALIGNKD_PAUSE_MARKER": str(cwd / "held.pid"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **env}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(PAUSE),
                             *map(str, args)], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def kill_held_rank(proc: subprocess.Popen, cwd: Path, ready, held=(1,)) -> int:
    """Wait until the `held` ranks hold (and `ready()`), SIGKILL rank 1: a child of the torchrun launcher."""
    markers, deadline = [cwd / f"held.pid-r{r}" for r in held], time.monotonic() + 180
    while not (all(m.is_file() for m in markers) and ready()):
        assert proc.poll() is None, f"torchrun ended before rank 1 held: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "rank 1 never reached its moment"
        time.sleep(0.05)
    pid = int((cwd / "held.pid-r1").read_text())
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    assert int(stat[1]) == proc.pid  # a worker torchrun started, not some other process
    for m in markers:
        m.unlink()
    os.kill(pid, signal.SIGKILL)
    return pid


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=180)
    return proc.returncode, out, err


def assert_one_sentence(stderr: str, expected: str) -> None:
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert errors == [f"error: {expected}"], stderr[-3000:]
    # torchrun's own summary may follow (it names rank 1 and SIGKILL); nothing from alignkd's frames
    assert not re.search(r'File "[^"]*alignkd/', stderr), stderr[-3000:]
    assert "[rank0]" not in stderr and "[rank1]" not in stderr, stderr[-3000:]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llava_dir):
    root = tmp_path_factory.mktemp("rank-killed")
    records = []
    for i in range(10):
        make_image(root / "images" / f"{i}.png", seed=i)
        records.append({"id": f"k{i}", "image": f"{i}.png", "conversations": CONV})
    records.append({"id": "k0", "image": "0.png", "conversations": CONV})  # a reject, too
    write_manifest(root / "train.json", records)
    args = ["cache", "build", "--teacher", tiny_llava_dir, "--data", root / "train.json", "--images",
            root / "images", "--shard-size", "2", "--batch-size", "1", "--no-progress", "--out"]
    reference = CliRunner().invoke(main, [*map(str, args), str(root / "reference")])
    assert reference.exit_code == 0, reference.output
    return root, args


def test_build_with_a_killed_rank_resumes_to_the_uninterrupted_cache(world):
    root, args = world
    cache = root / "cache"
    # rank 0 is held too, in Python: it learns of rank 1 from torchrun's SIGTERM, not from a collective
    proc = launch([*args, cache], root, ALIGNKD_PAUSE_RANK="0,1")
    kill_held_rank(proc, root, ready=lambda: True, held=(0, 1))
    code, _, stderr = finish(proc)
    assert code != 0
    assert re.search(r"rank\s*: 0 \(local_rank: 0\)\n\s*exitcode\s*: 1 ", stderr), stderr[-3000:]  # our exit
    assert_one_sentence(stderr, "rank 1 stopped during `alignkd cache build`, so rank 0 stopped too; "
                                "the shards committed so far are kept: rerun the same command to resume.")
    visible = [p for p in (cache / "shards").iterdir() if not p.name.startswith(".")]
    assert "shard-r1-000000" in {p.name for p in visible}
    assert all((p / "shard.json").is_file() for p in visible)  # committed, or not visible at all
    assert {"k1", "k3"} <= set(open_cache(cache).sample_ids) < {f"k{i}" for i in range(10)}

    proc = launch([*args, cache], root)
    code, stdout, stderr = finish(proc)
    assert code == 0, stderr[-3000:]
    assert re.search(r"cached \d+ samples \(\d+ rows already done\)", stdout)
    torture.compare_caches(root / "reference", cache)  # tensors byte for byte, tables row for row, verify


def test_distill_with_a_killed_rank_resumes_from_its_last_checkpoint(world, tiny_student_dir):
    root, _ = world
    run = root / "run"
    args = ["distill", "--student", tiny_student_dir, "--cache", root / "reference", "--out", run,
            "--max-steps", "4", "--save-steps", "2", "--batch-size", "2", "--logging-steps", "1",
            "--workers", "0", "--no-progress"]
    # rank 0 trains on into step 3 and learns of rank 1 from the gradient all-reduce that fails
    proc = launch(args, root, ALIGNKD_PAUSE_RANK="1")
    kill_held_rank(proc, root, ready=lambda: (run / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file())
    code, _, stderr = finish(proc)
    assert code != 0
    assert_one_sentence(stderr, "rank 1 stopped during `alignkd distill`, so rank 0 stopped too; "
                                "rerun the same command with --resume to continue from the last checkpoint.")
    assert not (run / "model.safetensors").exists()  # no student exported from a broken run

    proc = launch([*args, "--resume"], root, ALIGNKD_START_STEP=str(root / "start-step"))
    code, stdout, stderr = finish(proc)
    assert code == 0, stderr[-3000:]
    assert (root / "start-step").read_text() == "2"  # continued from checkpoint-2, not from scratch
    assert stdout.strip().splitlines()[-1].startswith("distilled 4 steps")
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss_attn" in r] == [1, 2, 3, 4]
    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText.from_pretrained(run)
