"""Models named by hub id (`org/name[@revision]`), resolved through a local Hugging Face cache.

The tests lay out a hub cache by hand, the way huggingface_hub writes one (blobs, snapshots
of symlinks, refs), in a temporary HF_HUB_CACHE, and run with HF_HUB_OFFLINE=1. The two
download tests lift offline mode but point HF_ENDPOINT at loopback: a closed port, and a
stand-in Hub (tests/fake_hub.py). Nothing reaches the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from alignkd.cache.identity import teacher_identity
from alignkd.cli import main
from alignkd.errors import AlignKDError
from alignkd.hub import ModelSource, parse_hub_id, resolve_model
from tests.support.world import make_image, write_manifest
from fake_hub import FakeHub

COMMIT_A, COMMIT_B = "a" * 39 + "1", "b" * 39 + "2"
STUDENT_COMMIT = "c" * 39 + "3"
CONV = [{"from": "human", "value": "<image>\nwhat is the colour of this image ?"}, {"from": "gpt", "value": "red"}]


def put_in_hub_cache(cache: Path, repo_id: str, model_dir: Path, commit: str, refs: tuple[str, ...]) -> Path:
    """models--org--name/{blobs/<hash>, snapshots/<commit>/<file> -> ../../blobs/<hash>, refs/<ref>}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in sorted(p for p in model_dir.iterdir() if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_llava_dir, tiny_student_dir):
    """A hub cache with org/teacher at two commits (main -> A, tag v2 -> B) and org/student, plus data."""
    root = tmp_path_factory.mktemp("hub")
    cache = root / "hf" / "hub"
    snaps = {"A": put_in_hub_cache(cache, "org/teacher", tiny_llava_dir, COMMIT_A, ("main",)),
             "B": put_in_hub_cache(cache, "org/teacher", tiny_llava_dir, COMMIT_B, ("v2",)),
             "student": put_in_hub_cache(cache, "org/student", tiny_student_dir, STUDENT_COMMIT, ("main",))}
    for i in range(2):
        make_image(root / "images" / f"img{i}.png", seed=i)
    data = write_manifest(root / "data.json",
                          [{"id": f"s{i}", "image": f"img{i}.png", "conversations": CONV} for i in range(2)])
    return {"root": root, "cache": cache, "snaps": snaps, "data": data, "images": root / "images"}


@pytest.fixture(autouse=True)
def offline_hub(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def build(hub, teacher, out, *extra):
    return cli("cache", "build", "--teacher", teacher, "--data", hub["data"], "--images", hub["images"],
               "--out", out, "--batch-size", 2, "--shard-size", 2, "--no-progress", *extra)


def error_line(result) -> str:
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip() and "Loading weights" not in ln]
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].endswith("."), lines
    return lines[0]


@pytest.fixture(scope="module")
def named_cache(hub):
    """A cache built with --teacher org/teacher (offline, from the hub cache)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HUB_CACHE", str(hub["cache"]))
        out = hub["root"] / "cache"
        result = build(hub, "org/teacher", out)
    assert result.exit_code == 0, result.output
    return out


def fingerprints(identity: dict) -> dict:
    return {k: identity[k] for k in ("config_sha256", "weights_fingerprint", "tokenizer_fingerprint")}


def test_hub_ids_and_paths_are_told_apart():
    assert parse_hub_id("Qwen/Qwen2.5-VL-7B-Instruct") == ("Qwen/Qwen2.5-VL-7B-Instruct", None)
    assert parse_hub_id("gpt2") == ("gpt2", None)
    assert parse_hub_id("org/name@v2") == ("org/name", "v2")
    for path in ("/abs/model", "./model", "../model", "a/b/c", "model/", "~/model", "org/name@", "org/name@/etc",
                 "org/name@../../x"):
        assert parse_hub_id(path) is None, path


def test_build_by_name_records_repo_id_and_revision_and_resumes(hub, named_cache, tiny_llava_dir):
    teacher = json.loads((named_cache / "cache.json").read_text())["teacher"]
    assert teacher == {"path": str(hub["snaps"]["A"].resolve()), "repo_id": "org/teacher", "revision": COMMIT_A,
                       **fingerprints(teacher_identity(tiny_llava_dir))}
    again = build(hub, "org/teacher", named_cache)  # the same name resolves to the same snapshot: a resume
    assert again.exit_code == 0, again.output
    assert "cached 0 samples (2 rows already done)" in again.output
    stats = cli("cache", "stats", named_cache)
    assert f"teacher org/teacher@{COMMIT_A[:12]}" in stats.output


def test_another_revision_is_refused_on_resume(hub, named_cache):
    """Commit B holds the very same files as A, so only the recorded revision can tell them apart."""
    line = error_line(build(hub, "org/teacher@v2", named_cache))
    assert f"cache {named_cache} was built by a different teacher" in line
    assert COMMIT_A in line and COMMIT_B in line and "--overwrite" in line


def test_name_at_revision_picks_that_snapshot(hub):
    out = hub["root"] / "cache-b"
    result = build(hub, f"org/teacher@{COMMIT_B}", out, "--limit", 1)
    assert result.exit_code == 0, result.output
    teacher = json.loads((out / "cache.json").read_text())["teacher"]
    assert (teacher["path"], teacher["repo_id"], teacher["revision"]) == (
        str(hub["snaps"]["B"].resolve()), "org/teacher", COMMIT_B)
    assert resolve_model("org/teacher@v2") == ModelSource(hub["snaps"]["B"], "org/teacher", COMMIT_B)


def test_distill_and_eval_take_a_student_by_name(hub, named_cache, tiny_student_dir):
    run = hub["root"] / "run"
    result = cli("distill", "--student", "org/student", "--cache", named_cache, "--out", run, "--max-steps", 1,
                 "--batch-size", 2, "--workers", 0, "--no-progress")
    assert result.exit_code == 0, result.output
    exported = json.loads((run / "config.json").read_text())
    assert exported["text_config"]["hidden_size"] == 32  # the student's width, not the teacher's 64
    assert not any(p.is_symlink() for p in run.rglob("*"))  # a plain directory, not a cache snapshot
    assert json.loads((run / "distill_run.json").read_text())["config"]["student"] == "org/student"

    args = ["--data", hub["data"], "--images", hub["images"], "--max-new-tokens", 2, "--json", "--no-progress"]
    by_name, by_path = cli("eval", "--model", "org/student", *args), cli("eval", "--model", tiny_student_dir, *args)
    assert by_name.exit_code == 0 and by_path.exit_code == 0, by_name.output + by_path.output
    assert json.loads(by_name.output) == json.loads(by_path.output)


@pytest.mark.parametrize("command", ["build", "distill", "eval"])
def test_unknown_name_offline_is_one_sentence(hub, named_cache, command):
    option, args = {
        "build": ("--teacher", ["cache", "build", "--data", hub["data"], "--images", hub["images"],
                                "--out", hub["root"] / "never"]),
        "distill": ("--student", ["distill", "--cache", named_cache, "--out", hub["root"] / "never"]),
        "eval": ("--model", ["eval", "--data", hub["data"], "--images", hub["images"]]),
    }[command]
    line = error_line(cli(*args, option, "org/missing", "--no-progress"))
    assert line == (f"error: {option} org/missing is neither a local directory nor in the local Hugging Face "
                    f"cache at {hub['cache']}, and offline mode (HF_HUB_OFFLINE=1) forbids downloading it.")
    assert not (hub["root"] / "never").exists()


def test_unknown_revision_and_partial_snapshot_offline(hub, tiny_llava_dir):
    line = error_line(build(hub, "org/teacher@v9", hub["root"] / "never"))
    assert "--teacher org/teacher@v9 is neither a local directory nor in the local Hugging Face cache" in line
    partial = put_in_hub_cache(hub["cache"], "org/partial", tiny_llava_dir, COMMIT_A, ("main",))
    (partial / "model.safetensors").unlink()  # as after `hf_hub_download(..., "config.json")` alone
    line = error_line(build(hub, "org/partial", hub["root"] / "never"))
    assert "--teacher org/partial is only partly in the local Hugging Face cache" in line


def test_a_local_directory_still_wins_and_records_no_revision(hub, tiny_llava_dir, tmp_path, monkeypatch):
    """A directory that happens to be called org/teacher is loaded as a directory, as before."""
    shutil.copytree(tiny_llava_dir, tmp_path / "org" / "teacher")
    monkeypatch.chdir(tmp_path)
    result = build(hub, "org/teacher", tmp_path / "cache", "--limit", 1)
    assert result.exit_code == 0, result.output
    teacher = json.loads((tmp_path / "cache" / "cache.json").read_text())["teacher"]
    assert teacher == teacher_identity(tmp_path / "org" / "teacher")
    assert set(teacher) == {"path", "config_sha256", "weights_fingerprint", "tokenizer_fingerprint"}


def test_a_failed_download_is_one_sentence(hub, monkeypatch):
    """Online mode with the Hub unreachable (a closed loopback port): one sentence naming id and endpoint."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    line = error_line(build(hub, "org/absent", hub["root"] / "never"))
    assert line.startswith(f"error: --teacher org/absent is neither a local directory nor in the local Hugging "
                           f"Face cache at {hub['cache']}, and downloading it from http://127.0.0.1:9 failed (")
    assert not (hub["cache"] / "models--org--absent" / "snapshots").exists()


def sharded_repo(model_dir: Path) -> dict[str, bytes]:
    """The tiny model as a big repo looks: an index and its shard, plus files alignkd must not fetch."""
    from safetensors import safe_open

    files = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        index = {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in f.keys()}}
    weights = files.pop("model.safetensors")
    return {**files, "model-00001-of-00001.safetensors": weights, "model.safetensors.index.json":
            json.dumps(index).encode(), "consolidated.safetensors": weights, "pytorch_model.bin": b"a pickle",
            "training_args.bin": b"a pickle", "README.md": b"# tiny"}


def test_a_download_takes_config_tokenizer_and_the_indexed_safetensors_only(hub, tiny_llava_dir, monkeypatch):
    from alignkd.models import load_vlm

    files = sharded_repo(tiny_llava_dir)
    wanted = sorted(set(files) - {"consolidated.safetensors", "pytorch_model.bin", "training_args.bin", "README.md"})
    pickled = {k: v for k, v in files.items() if "safetensors" not in k}
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with FakeHub({"org/sharded": (COMMIT_A, files), "org/pickled": (COMMIT_B, pickled)}) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        source = resolve_model("org/sharded", "--teacher")
        assert source == ModelSource(hub["cache"].resolve() / "models--org--sharded" / "snapshots" / COMMIT_A,
                                     "org/sharded", COMMIT_A)
        assert sorted(p.name for p in source.path.iterdir()) == wanted
        assert sorted({path.rsplit("/", 1)[1] for _, path in fake.requests if "/resolve/" in path}) == wanted
        fake.requests.clear()
        assert resolve_model("org/sharded", "--teacher") == source and fake.requests == []  # cached: no request
        assert load_vlm(source.path).model.config.model_type == "llava"

        with pytest.raises(AlignKDError, match=f"org/pickled \\(revision {COMMIT_B}\\) has no config.json or no "
                                               "safetensors weights on http://127.0.0.1:[0-9]+; alignkd loads"):
            resolve_model("org/pickled", "--teacher")
        assert not list(hub["cache"].glob("models--org--pickled/snapshots/*/*.bin"))
        line = error_line(build(hub, "org/nothere", hub["root"] / "never"))
        assert f"downloading it from {fake.url} failed (RepositoryNotFoundError: 404 Client Error)." in line
