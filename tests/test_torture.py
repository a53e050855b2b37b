"""Kill torture, the fast part: a seeded chain of SIGKILLs at every kind of moment of a build
(a random time, mid-chunk, between shard.json and the rename, between the rename and the
catalog row, inside a catalog write, during a catalog rebuild), each build resuming the
last; the finished cache equals an uninterrupted build byte for byte in every tensor and
row for row in its tables. Then the --overwrite matrix once per case: refused touching
nothing, or rebuilt to the uninterrupted cache, the user's files byte-identical either way.
`python -m bench.torture --kills 200` is the long run.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from bench import torture


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("torture")
    world = torture.make_world(root, 6)
    cfg, seconds = torture.reference_build(world, root, shard_size=2, logit_mode="sampled", logit_samples=16)
    return root, cfg, seconds


def test_every_kill_moment_resumes_to_the_uninterrupted_cache(reference):
    root, cfg, seconds = reference
    kills = len(torture.POINTS)
    tally = torture.torture(cfg, root, kills, per_cache=kills, rng=random.Random(0), seconds=seconds)
    assert sum(tally.killed.values()) == kills
    assert set(tally.killed) == set(torture.POINTS), tally.killed  # every moment was hit at least once
    assert tally.caches >= 1  # and each finished cache passed compare_caches


def test_compare_caches_can_fail(reference, tmp_path):
    """The comparison is not vacuous: one changed sample in the samples table is caught."""
    import shutil

    import pyarrow.parquet as pq

    _, cfg, _ = reference
    copy = tmp_path / "copy"
    shutil.copytree(cfg.out, copy)
    shard = sorted((copy / "shards").glob("shard-*"))[0] / "samples.parquet"
    table = pq.read_table(shard)
    ce = table.column("teacher_ce").to_pylist()
    table = table.set_column(table.schema.get_field_index("teacher_ce"), "teacher_ce",
                             __import__("pyarrow").array([ce[0] + 1.0] + ce[1:]))
    pq.write_table(table, shard)
    with pytest.raises(AssertionError):
        torture.compare_caches(Path(cfg.out), copy)


# ---------------------------------------------------------------- the --overwrite matrix (issue 23)
def test_overwrite_matrix_refuses_or_rebuilds_and_keeps_every_user_file(reference):
    root, cfg, seconds = reference
    tally = torture.overwrite_matrix(cfg, root, rounds=1, rng=random.Random(1), seconds=seconds)
    assert tally == {(case, outcome): 1 for case, outcome in torture.OVERWRITE_CASES.items()}
