"""A full disk mid-build: a file size limit (RLIMIT_FSIZE, SIGXFSZ ignored, set in a forked
child that runs the CLI) makes the second shard's writes fail for real. The build must stop with one
sentence naming the shard, leave no visible or temporary partial shard, and a rerun with
the space back must complete the cache exactly as an uninterrupted build does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from click.testing import CliRunner

from alignkd.cli import main

from alignkd.cache.shard_format import committed_shards
from bench import torture
from tests.support.limits import invoke_cli_with_file_size_limit
from tests.support.world import QUESTION, random_image, turns, write_manifest

LIMIT = 1_500_000  # bytes per file: above catalog.duckdb (~0.5 MB), below the 2nd shard's samples.parquet


def _dataset(root: Path) -> tuple[Path, Path]:
    """Four small images, then four 512 px noise PNGs (~0.8 MB each, stored in samples.parquet)."""
    images = root / "images"
    rng = np.random.default_rng(0)
    records = []
    for i in range(8):
        random_image(images / f"{i}.png", rng, size=40 if i < 4 else 512)
        records.append({"id": f"s{i}", "image": f"{i}.png",
                        "conversations": turns((QUESTION, ["red", "blue", "yes", "no"][i % 4]))})
    return write_manifest(root / "data.json", records), images


def _invoke_with_file_size_limit(args: list[str], log: Path) -> int:
    return invoke_cli_with_file_size_limit(args, log, LIMIT)


def test_full_disk_is_one_sentence_and_resume_completes(tmp_path, tiny_llava_dir):
    data, images = _dataset(tmp_path)
    out = tmp_path / "cache"
    args = ["cache", "build", "--teacher", str(tiny_llava_dir), "--data", str(data), "--images", str(images),
            "--out", str(out), "--batch-size", "1", "--shard-size", "4", "--no-progress"]
    code = _invoke_with_file_size_limit(args, tmp_path / "full.log")
    output = (tmp_path / "full.log").read_text()
    assert code == 1, output
    assert "Traceback" not in output and "escaped" not in output, output
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot write shard-000001 of cache"), output
    assert "file too large" in lines[0]
    assert [d.name for d in committed_shards(out)] == ["shard-000000"]
    assert [p.name for p in (out / "shards").iterdir()] == ["shard-000000"]  # no temp dir left behind

    resumed = CliRunner().invoke(main, args)  # the space is back
    assert resumed.exit_code == 0, resumed.output
    assert "cached 4 samples (4 rows already done)" in resumed.output
    from alignkd.cache.teacher.build import BuildConfig

    ref = BuildConfig(teacher=str(tiny_llava_dir), data=str(data), images=str(images), out=str(tmp_path / "ref"),
                      batch_size=1, shard_size=4, progress=False)
    assert torture.build_until_killed(ref, None) == "finished"
    torture.compare_caches(Path(ref.out), out)
