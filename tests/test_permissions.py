"""Permission denied on reads: each unreadable input is one sentence naming the file (exit 1,
no traceback), or, for one image among many, a recorded reject with its own reason code.

The suite runs as root, which reads every file, so the CLI runs in a subprocess whose
bounding set lacks CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (what `setpriv
--bounding-set=-dac_override,-dac_read_search` does): root then obeys permission bits
like any user, while the interpreter under /root stays reachable. As another user the
subprocess runs unchanged, since permission bits already apply to it.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from alignkd.cli import main
from tests.support.world import make_image, write_manifest

REPO = Path(__file__).resolve().parents[1]
CONV = [{"from": "human", "value": "<image>\nwhat is the colour ?"}, {"from": "gpt", "value": "red"}]
PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2


def _drop_read_override() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed: cannot test permission denied as root")


def cli_without_read_override(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "alignkd.cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300, preexec_fn=_drop_read_override if os.geteuid() == 0 else None)


def assert_one_sentence(result, expected: str) -> None:
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip() == f"error: {expected}", result.stderr[-2000:]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llava_dir, tiny_student_dir):
    root = tmp_path_factory.mktemp("permissions")
    for i in range(3):
        make_image(root / "images" / f"{i}.png", seed=i)
    records = [{"id": f"p{i}", "image": f"{i}.png", "conversations": CONV} for i in range(3)]
    write_manifest(root / "train.json", records)
    result = CliRunner().invoke(main, ["cache", "build", "--teacher", str(tiny_llava_dir), "--data",
                                       str(root / "train.json"), "--images", str(root / "images"), "--out",
                                       str(root / "cache"), "--no-progress"])
    assert result.exit_code == 0, result.output
    for name, src in (("teacher", tiny_llava_dir), ("student", tiny_student_dir)):
        shutil.copytree(src, root / name)
    shutil.copytree(root / "cache", root / "locked-cache")
    shutil.copy(root / "train.json", root / "locked.json")
    (root / "locked.json").chmod(0)
    (root / "images" / "1.png").chmod(0)
    (root / "teacher" / "model.safetensors").chmod(0)
    (root / "student").chmod(0)
    shard = next(p for p in sorted((root / "locked-cache" / "shards").iterdir()) if not p.name.startswith("."))
    (shard / "samples.parquet").chmod(0)
    (root / "no-entry").mkdir(mode=0o600)
    yield root, tiny_llava_dir, tiny_student_dir, shard / "samples.parquet"
    for p in (root / "student", root / "no-entry"):
        p.chmod(0o755)  # so that pytest can remove them


def test_the_subprocess_really_cannot_read(world):
    root, *_ = world
    result = subprocess.run(["cat", root / "locked.json"], capture_output=True, text=True,
                            preexec_fn=_drop_read_override if os.geteuid() == 0 else None)
    assert result.returncode != 0 and "Permission denied" in result.stderr


def test_unreadable_manifest(world, tmp_path):
    root, teacher, *_ = world
    result = cli_without_read_override("cache", "build", "--teacher", teacher, "--data", root / "locked.json",
                                       "--images", root / "images", "--out", tmp_path / "c", "--no-progress")
    assert_one_sentence(result, f"{root / 'locked.json'}: permission denied.")


def test_unreadable_image_is_a_recorded_reject(world, tmp_path):
    root, teacher, *_ = world
    out = tmp_path / "c"
    result = cli_without_read_override("cache", "build", "--teacher", teacher, "--data", root / "train.json",
                                       "--images", root / "images", "--out", out, "--no-progress")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "cached 2 samples" in result.stdout and "rejects: 1 unreadable_image" in result.stdout
    from alignkd.cache.catalog import run_sql

    rejects = run_sql(out, "SELECT sample_id, reason, message FROM rejects").to_pylist()
    assert [(r["sample_id"], r["reason"]) for r in rejects] == [("p1", "unreadable_image")]
    assert "'1.png' that cannot be read (Permission denied)" in rejects[0]["message"]


def test_unreadable_images_root(world, tmp_path):
    root, teacher, *_ = world
    result = cli_without_read_override("cache", "build", "--teacher", teacher, "--data", root / "train.json",
                                       "--images", root / "no-entry", "--out", tmp_path / "c", "--no-progress")
    assert_one_sentence(result, f"images directory {root / 'no-entry'} cannot be entered (permission denied).")


def test_unreadable_teacher_weights(world, tmp_path):
    root, *_ = world
    result = cli_without_read_override("cache", "build", "--teacher", root / "teacher", "--data",
                                       root / "train.json", "--images", root / "images", "--out", tmp_path / "c",
                                       "--no-progress")
    assert_one_sentence(result, f"model directory {root / 'teacher'}: model.safetensors cannot be read "
                                "(permission denied).")


def test_unreadable_student_directory(world, tmp_path):
    root, *_ = world
    result = cli_without_read_override("distill", "--student", root / "student", "--cache", root / "cache",
                                       "--out", tmp_path / "run", "--max-steps", "1", "--no-progress")
    assert_one_sentence(result, f"{root / 'student' / 'config.json'}: permission denied.")


@pytest.mark.parametrize("command", ["verify", "sql", "stats", "distill"])
def test_unreadable_shard_file_is_named(world, tmp_path, command):
    root, _, student, parquet = world
    cache = root / "locked-cache"
    args = {"verify": ["cache", "verify", cache], "sql": ["cache", "sql", cache, "SELECT count(*) FROM samples"],
            "stats": ["cache", "stats", cache],
            "distill": ["distill", "--student", student, "--cache", cache, "--out", tmp_path / "run",
                        "--max-steps", "1", "--no-progress"]}[command]
    result = cli_without_read_override(*args)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert str(parquet.relative_to(root)) in lines[0] and "ermission denied" in lines[0], lines[0]
