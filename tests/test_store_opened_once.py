"""A command opens its cache location once and hands the store down: `cache build` (new or
resumed), `open_cache` and `distill` each turn the path into a store one time, and the writer,
catalog, tokenizer, footprint, verify and dataset all work through that store.

Counted by a fixture that wraps the local store's constructor and calls through: a store
opened from a location starts with no resolved root (`jail`), while a shard's store (`sub`)
inherits its cache's, so only the first kind is counted.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from alignkd.cache.teacher.build import BuildConfig, build_cache
from alignkd.cache.reader import open_cache
from alignkd.cache.storage import LocalStore
from alignkd.distill.run import DistillConfig, distill
from tests.support.world import make_image, write_manifest

CONV = [{"from": "human", "value": "<image>\nwhat is the colour of this image ?"}, {"from": "gpt", "value": "red"}]


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """The locations opened as stores (not shards of one) while the test runs, in order."""
    roots: list[str] = []
    construct = LocalStore.__init__

    def counting(self, root, jail=None):
        if jail is None:
            roots.append(str(root))
        construct(self, root, jail)

    monkeypatch.setattr(LocalStore, "__init__", counting)
    return roots


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("once")
    for i in range(3):
        make_image(root / "images" / f"{i}.png", seed=i)
    data = write_manifest(root / "data.json", [{"id": f"s{i}", "image": f"{i}.png", "conversations": CONV}
                                               for i in range(3)])
    return data, root / "images"


def test_build_and_its_resume_open_the_cache_once(dataset, tiny_llava_dir, tmp_path, opened):
    data, images = dataset
    out = tmp_path / "cache"
    cfg = BuildConfig(teacher=str(tiny_llava_dir), data=str(data), images=str(images), out=str(out),
                      batch_size=2, shard_size=2, progress=False)  # two shards: two catalog commits
    assert build_cache(cfg).samples == 3
    assert opened == [str(out)]
    opened.clear()
    assert build_cache(cfg).skipped_done == 3  # the resume rebuilds the catalog too
    assert opened == [str(out)]
    opened.clear()
    assert len(open_cache(out)) == 3
    assert opened == [str(out)]


def test_distill_opens_the_cache_once(dataset, tiny_llava_dir, tiny_student_dir, tmp_path, opened):
    data, images = dataset
    cache = tmp_path / "cache"
    build_cache(BuildConfig(teacher=str(tiny_llava_dir), data=str(data), images=str(images), out=str(cache),
                            batch_size=3, progress=False))
    opened.clear()
    distill(DistillConfig(student=str(tiny_student_dir), cache=str(cache), out=str(tmp_path / "student"),
                          batch_size=3, max_steps=1, progress=False))  # verify on: it reads through the store too
    assert opened == [str(cache)]
