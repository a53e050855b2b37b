"""Shared fixtures: tiny real LLaVA models written to disk, a small dataset, a local S3 server.

The world they are built from is tests/support/world.py, which the benchmarks use too."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.support.s3 import AWS_VARIABLES, start_moto
from tests.support.world import QUESTION, build_student, build_teacher, make_image, turns, write_manifest

torch.set_num_threads(1)  # CI has 2 cores; keep one free for the writer threads


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory) -> Path:
    """A tiny LLaVA teacher: 4 heads, d=64, 16 image tokens."""
    return build_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory) -> Path:
    """A smaller student sharing the teacher's tokenizer and image grid: 2 heads, d=32."""
    return build_student(tmp_path_factory.mktemp("student"))


@pytest.fixture
def small_dataset(tmp_path) -> tuple[Path, Path]:
    """A six-record LLaVA manifest (single- and multi-turn) with PNGs under images/."""
    images = tmp_path / "images"
    records = []
    answers = ["red", "blue circle", "yes", "no", "green square", "3"]
    for i, answer in enumerate(answers):
        make_image(images / f"img{i}.png", seed=i)
        # every third record is multi-turn
        conv = turns((QUESTION, answer), *([("how many ?", "2")] if i % 3 == 2 else []))
        records.append({"id": f"s{i}", "image": f"img{i}.png", "conversations": conv})
    return write_manifest(tmp_path / "data.json", records), images


@pytest.fixture(scope="session")
def s3():
    """A moto server and the AWS environment pointing at it; yields a bucket's URL maker.

    One server per test session: moto keeps buckets in process-wide state, and fsspec caches
    S3 clients per endpoint, so a second server in the same run would find the first one's
    bucket and be reached through clients of the first one's (stopped) port."""
    import s3fs

    saved = {k: os.environ.get(k) for k in AWS_VARIABLES}
    server, env = start_moto("alignkd-test")
    fs = s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True)
    yield {"url": lambda name: f"s3://alignkd-test/{name}", "fs": fs, "env": env}
    server.stop()
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
