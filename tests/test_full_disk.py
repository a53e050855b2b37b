"""A full disk mid-build: a file size limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes the second
shard's writes fail in a real `alignkd cache build` process. The build must stop with one
sentence naming the shard, leave no visible or temporary partial shard, and a rerun with
the space back must complete the cache exactly as an uninterrupted build does."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from alignkd.cache.shard_format import committed_shards
from conftest import write_manifest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import torture  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LIMIT = 1_500_000  # bytes per file: above catalog.duckdb (~0.5 MB), below the 2nd shard's samples.parquet


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def _dataset(root: Path) -> tuple[Path, Path]:
    """Four small images, then four 512 px noise PNGs (~0.8 MB each, stored in samples.parquet)."""
    from PIL import Image

    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    records = []
    for i in range(8):
        size = 40 if i < 4 else 512
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(images / f"{i}.png")
        conv = [{"from": "human", "value": "<image>\nwhat is the colour of this image ?"},
                {"from": "gpt", "value": ["red", "blue", "yes", "no"][i % 4]}]
        records.append({"id": f"s{i}", "image": f"{i}.png", "conversations": conv})
    return write_manifest(root / "data.json", records), images


def test_full_disk_is_one_sentence_and_resume_completes(tmp_path, tiny_llava_dir):
    data, images = _dataset(tmp_path)
    out = tmp_path / "cache"
    argv = [sys.executable, "-m", "alignkd.cli", "cache", "build", "--teacher", str(tiny_llava_dir), "--data",
            str(data), "--images", str(images), "--out", str(out), "--batch-size", "1", "--shard-size", "4",
            "--no-progress"]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    full = subprocess.run(argv, env=env, capture_output=True, text=True, preexec_fn=_limit_file_size)
    assert full.returncode == 1, full.stdout + full.stderr
    assert "Traceback" not in full.stderr, full.stderr
    lines = [ln for ln in full.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot write shard-000001 of cache"), full.stderr
    assert "file too large" in lines[0]
    assert [d.name for d in committed_shards(out)] == ["shard-000000"]
    assert [p.name for p in (out / "shards").iterdir()] == ["shard-000000"]  # no temp dir left behind

    resumed = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "cached 4 samples (4 rows already done)" in resumed.stdout
    from alignkd.cache.build import BuildConfig

    ref = BuildConfig(teacher=str(tiny_llava_dir), data=str(data), images=str(images), out=str(tmp_path / "ref"),
                      batch_size=1, shard_size=4, progress=False)
    assert torture.build_until_killed(ref, None) == "finished"
    torture.compare_caches(Path(ref.out), out)
