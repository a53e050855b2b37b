"""Both stages under torchrun with two gloo processes on CPU, as a user would launch them."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

from alignkd.cache.reader import open_cache
from alignkd.cache.verify import verify_cache

from tests.support.world import make_image, write_manifest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(*args: str, cwd) -> subprocess.CompletedProcess:
    cli = shutil.which("alignkd", path=os.path.dirname(sys.executable))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), cli, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240)


def test_build_and_distill_under_torchrun(tmp_path, tiny_llava_dir, tiny_student_dir):
    images = tmp_path / "images"
    records = []
    for i in range(9):
        make_image(images / f"{i}.png", seed=i)
        records.append({"id": f"t{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat is the colour ?"}, {"from": "gpt", "value": "red"}]})
    records.append({"id": "t0", "image": "0.png", "conversations": records[0]["conversations"]})
    manifest = write_manifest(tmp_path / "train.json", records)

    build = _torchrun("cache", "build", "--teacher", str(tiny_llava_dir), "--data", str(manifest),
                      "--images", str(images), "--out", "cache", "--shard-size", "2", "--no-progress",
                      cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-3000:]
    # one summary line, from rank 0, with the totals of both ranks
    summaries = [line for line in build.stdout.splitlines() if line.startswith("cached")]
    # the repeated id is kept on whichever rank its row falls to, as "t0#2"
    assert summaries == [summaries[0]] and summaries[0].startswith("cached 10 samples")
    assert "rejects: none" in summaries[0]
    shard_names = sorted(p.name for p in (tmp_path / "cache" / "shards").iterdir())
    assert any(n.startswith("shard-r1-") for n in shard_names) and "shard-000000" in shard_names
    assert verify_cache(tmp_path / "cache") == []
    assert sorted(open_cache(tmp_path / "cache").sample_ids) == sorted([f"t{i}" for i in range(9)] + ["t0#2"])

    run = _torchrun("distill", "--student", str(tiny_student_dir), "--cache", "cache", "--out", "run",
                    "--max-steps", "3", "--batch-size", "2", "--logging-steps", "1", "--no-progress",
                    cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [line for line in run.stdout.splitlines() if line.startswith("distilled")][0].startswith(
        "distilled 3 steps")
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss_attn" in r] == [1, 2, 3]
    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText.from_pretrained(tmp_path / "run")
