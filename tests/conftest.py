"""Shared fixtures: tiny real LLaVA models written to disk, and images made in code."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from alignkd.demo.tiny_models import TinyLlavaSpec, build_tiny_llava

torch.set_num_threads(1)  # CI has 2 cores; keep one free for the writer threads


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory) -> Path:
    """A tiny LLaVA teacher: 4 heads, d=64, 16 image tokens."""
    return build_tiny_llava(tmp_path_factory.mktemp("teacher"), TinyLlavaSpec(), seed=0)


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory) -> Path:
    """A smaller student sharing the teacher's tokenizer and image grid: 2 heads, d=32."""
    spec = TinyLlavaSpec(hidden_size=32, num_heads=2, intermediate_size=64, num_layers=2)
    return build_tiny_llava(tmp_path_factory.mktemp("student"), spec, seed=1)


def make_image(path: Path, seed: int = 0, size: int = 40) -> Path:
    """Write a random RGB PNG (generated with numpy) and return its path."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def write_manifest(path: Path, records: list[dict], jsonl: bool = False) -> Path:
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return path


@pytest.fixture
def small_dataset(tmp_path) -> tuple[Path, Path]:
    """A six-record LLaVA manifest (single- and multi-turn) with PNGs under images/."""
    images = tmp_path / "images"
    records = []
    answers = ["red", "blue circle", "yes", "no", "green square", "3"]
    for i, answer in enumerate(answers):
        make_image(images / f"img{i}.png", seed=i)
        conv = [
            {"from": "human", "value": "<image>\nwhat is the colour of this image ?"},
            {"from": "gpt", "value": answer},
        ]
        if i % 3 == 2:  # every third record is multi-turn
            conv += [{"from": "human", "value": "how many ?"}, {"from": "gpt", "value": "2"}]
        records.append({"id": f"s{i}", "image": f"img{i}.png", "conversations": conv})
    return write_manifest(tmp_path / "data.json", records), images


@pytest.fixture(scope="session")
def s3():
    """A moto server and the AWS environment pointing at it; yields a bucket's URL maker.

    One server per test session: moto keeps buckets in process-wide state, and fsspec caches
    S3 clients per endpoint, so a second server in the same run would find the first one's
    bucket and be reached through clients of the first one's (stopped) port."""
    from moto.server import ThreadedMotoServer

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    fs = s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True)
    fs.mkdir("alignkd-test")
    yield {"url": lambda name: f"s3://alignkd-test/{name}", "fs": fs, "env": env}
    server.stop()
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def in_child_with_file_size_limit(body, limit: int, timeout_s: float = 300.0) -> int:
    """Run `body()` in a forked child whose files may not grow past `limit` bytes, and return
    the child's exit code (body's return value, 99 if it raised).

    RLIMIT_FSIZE with SIGXFSZ ignored makes a write past the limit fail with EFBIG, as a full
    disk fails it, without filling a real disk. A child still running after `timeout_s` is
    killed and fails the test: code that hangs on a failed write must not stall the suite.
    """
    import resource
    import signal
    import time

    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
            code = body()
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"the child hung for {timeout_s:.0f} s after its writes were limited to {limit} bytes a file")


def invoke_cli_with_file_size_limit(args: list, log: Path, limit: int) -> int:
    """The CLI in such a child; its output (and any exception that escaped click) goes to `log`."""
    from click.testing import CliRunner

    from alignkd.cli import main

    def body() -> int:
        result = CliRunner().invoke(main, [str(a) for a in args])
        log.write_text(result.output + ("" if isinstance(result.exception, (SystemExit, type(None)))
                                        else f"escaped: {result.exception!r}"))
        return result.exit_code

    return in_child_with_file_size_limit(body, limit)
