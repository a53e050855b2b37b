"""The cache BUILD against a real tiny teacher: live-forward equivalence, rejects, SIGKILL resume,
option refusals, locking, and the cache commands on a freshly built cache.

Storage round trips on synthetic records live in test_cache_storage.py; the statistical
draw test of sampled logits lives in test_sparse_logits.py.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from alignkd.cache.teacher.build import BuildConfig, build_cache
from alignkd.targets import sample_seed
from alignkd.cache.catalog import run_sql
from alignkd.cache.reader import open_cache
from alignkd.cache.teacher.sparse_logits import encode_sampled
from alignkd.cache.verify import verify_cache
from alignkd.cli import main
from alignkd.data import collate, read_manifest, render_sample
from alignkd.models import capture_forward, load_vlm
from tests.support.world import make_image, write_manifest

# Round-to-nearest storage: relative error <= 2^-9 (bf16) and 2^-11 (fp16); 2x margin.
BF16_RTOL, FP16_RTOL = 2.0 ** -8, 2.0 ** -10
F32_TOL = 1e-5  # float32 storage; the only difference is batch shape in the forward

ANSWERS = ["red", "blue circle", "yes", "no", "green square", "3", "left", "a red cross above"]


def conversation(i: int, image: bool = True) -> list[dict]:
    question = ("<image>\n" if image else "") + "what is the colour of this image ?"
    conv = [{"from": "human", "value": question}, {"from": "gpt", "value": ANSWERS[i % len(ANSWERS)]}]
    if i % 3 == 2:  # multi-turn, so lengths (and padding) differ within a batch
        conv += [{"from": "human", "value": "how many ?"}, {"from": "gpt", "value": "2"}]
    return conv


def good_record(i: int, sid: str | None = None) -> dict:
    return {"id": sid or f"s{i}", "image": f"img{i}.png", "conversations": conversation(i)}


def make_dataset(root: Path, n: int, extra: list[dict] = ()) -> tuple[Path, Path]:
    images = root / "images"
    for i in range(n):
        make_image(images / f"img{i}.png", seed=i)
    return write_manifest(root / "data.json", [good_record(i) for i in range(n)] + list(extra)), images


def build(teacher, data, images, out, **kw) -> Path:
    build_cache(BuildConfig(teacher=str(teacher), data=str(data), images=str(images), out=str(out),
                            progress=False, **kw))
    return Path(out)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def error_line(result) -> str:
    """The single user-facing error a refused command printed (loading bars aside)."""
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip() and "Loading weights" not in ln]
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].endswith("."), lines
    return lines[0]


def sql(cache, query: str) -> list[dict]:
    return run_sql(cache, query).to_pylist()


# ---------------------------------------------------------------- 1. cache == live teacher
@pytest.fixture(scope="module")
def six(tmp_path_factory, tiny_llava_dir):
    """Six samples built three ways (batch 4 while the live forward takes all six at once)."""
    root = tmp_path_factory.mktemp("six")
    data, images = make_dataset(root, 6)
    kw = dict(batch_size=4, logit_k=8)
    caches = {
        "bf16": build(tiny_llava_dir, data, images, root / "bf16", attn_dtype="bfloat16",
                      vision_dtype="bfloat16", logit_positions="response", **kw),
        "fp16": build(tiny_llava_dir, data, images, root / "fp16", attn_dtype="float16",
                      vision_dtype="float16", **kw),  # the default logit positions: text
        "u8": build(tiny_llava_dir, data, images, root / "u8", attn_dtype="uint8-sqrt", vision_dtype="int8-channel",
                    **kw),
        "sampled": build(tiny_llava_dir, data, images, root / "sampled", batch_size=4, logit_mode="sampled",
                         logit_samples=16, logit_positions="text"),
    }
    vlm = load_vlm(tiny_llava_dir)
    rendered = [render_sample(r, vlm.processor, images, 2048) for r in read_manifest(data)]
    batch = collate(rendered, pad_token_id=vlm.processor.tokenizer.pad_token_id, padding_side="right")
    cap = capture_forward(vlm.model, {k: v for k, v in batch.items() if k != "labels"})
    image_id = vlm.model.config.image_token_id
    return {"data": data, "images": images, "caches": caches, "rendered": rendered, "cap": cap,
            "image_id": image_id}


def live_sample(six, b: int) -> dict:
    """What the live forward says about sample b, cut out independently of teacher_pass."""
    cap, r = six["cap"], six["rendered"][b]
    ids = r.input_ids.numpy()
    L = len(ids)
    vision_pos = np.flatnonzero(ids == six["image_id"])
    text_pos = np.arange(vision_pos.max() + 1, L)
    attn = cap.attn_text_vision[b][:, text_pos, :].permute(1, 0, 2).numpy()  # [T, H, Nv]
    return {"sample_id": r.sample_id, "input_ids": ids, "label_mask": (r.labels != -100).numpy(),
            "vision_positions": vision_pos, "text_positions": text_pos, "attn": attn,
            "vision": cap.vision_tokens[b].numpy(), "logits": cap.logits[b, :L].float()}


@pytest.mark.parametrize("kind,rtol", [("bf16", BF16_RTOL), ("fp16", FP16_RTOL)])
def test_attention_and_vision_tokens_equal_live_forward(six, kind, rtol):
    reader = open_cache(six["caches"][kind])
    assert len(reader) == 6
    worst = 0.0
    for b in range(6):
        live = live_sample(six, b)
        got = reader[reader.index_of(live["sample_id"])]
        for name in ("input_ids", "label_mask", "vision_positions", "text_positions"):
            np.testing.assert_array_equal(getattr(got, name), live[name], err_msg=name)
        assert got.attn.shape == live["attn"].shape and got.attn.shape[1] == 4  # 4 teacher heads
        np.testing.assert_allclose(got.attn, live["attn"], rtol=rtol, atol=1e-7)
        np.testing.assert_allclose(got.vision, live["vision"], rtol=rtol, atol=1e-7)
        np.testing.assert_allclose(got.focus, live["attn"].mean(1).sum(0), rtol=F32_TOL, atol=1e-6)
        # text rows also attend to text keys, so a row's vision mass is in (0, 1)
        assert np.all(got.attn.sum(-1) < 1) and np.all(got.attn.sum(-1) > 0)
        worst = max(worst, float(np.max(np.abs(got.attn - live["attn"]) / np.abs(live["attn"]))))
    # the option took effect: fp16 keeps 3 more mantissa bits than bf16
    assert (worst > 1e-3) if kind == "bf16" else (worst < 1e-3)


def test_uint8_sqrt_attention_and_int8_vision_are_within_their_steps_of_live_forward(six):
    """round(sqrt(p)*255) then squared: the error is at most half a step in sqrt space.
    int8-channel vision tokens: at most half a step of each channel's scale."""
    reader = open_cache(six["caches"]["u8"])
    for b in range(6):
        live = live_sample(six, b)
        got = reader[reader.index_of(live["sample_id"])]
        bound = (np.sqrt(live["attn"]) + 0.5 / 255) ** 2 - live["attn"]  # one half-step up in sqrt space
        assert np.all(np.abs(got.attn - live["attn"]) <= bound + 1e-7)
        assert np.abs(got.attn - live["attn"]).max() > 0  # really lossy, so the option took effect
        half_step = np.abs(live["vision"]).max(0) / 127 / 2
        assert np.all(np.abs(got.vision - live["vision"]) <= half_step * (1 + 1e-5) + 1e-9)
        assert np.abs(got.vision - live["vision"]).max() > 0


@pytest.mark.parametrize("kind", ["bf16", "fp16"])
def test_topk_logits_are_the_true_topk_of_live_logits(six, kind):
    reader = open_cache(six["caches"][kind])
    for b in range(6):
        live = live_sample(six, b)
        got = reader[reader.index_of(live["sample_id"])]
        if kind == "bf16":  # --logit-positions response: row t predicts the answer token at t+1
            expected_pos = np.flatnonzero(live["label_mask"][1:])
        else:  # text, the default: every text position after the image that has a next token
            expected_pos = live["text_positions"][:-1]
        np.testing.assert_array_equal(got.logit_positions, expected_pos)
        logp = torch.log_softmax(live["logits"][torch.from_numpy(expected_pos)], -1).numpy()
        assert got.logit_ids.shape == (len(expected_pos), 8)
        for p, row in enumerate(logp):
            ids = got.logit_ids[p]
            rest = np.setdiff1d(np.arange(len(row)), ids)
            assert len(set(ids)) == 8 and row[ids].min() >= row[rest].max() - 1e-6
            # v2 stores log-probs in fp16 and the tail as an fp16 log (2^-11 relative, 2x margin)
            np.testing.assert_allclose(got.logit_values[p], row[ids], rtol=2.0 ** -10, atol=F32_TOL)
            tail = 1 - np.exp(row[ids]).sum()
            np.testing.assert_allclose(got.logit_tail[p], tail, rtol=abs(np.log(tail)) * 2.0 ** -10, atol=F32_TOL)
        answer = live["label_mask"][expected_pos + 1]  # teacher_ce is over the answer tokens
        answer_ids = live["input_ids"][expected_pos[answer] + 1]
        ce = -logp[np.flatnonzero(answer), answer_ids].mean()
        assert got.teacher_ce == pytest.approx(ce, rel=1e-4)


def test_sampled_logits_are_seeded_draws_from_live_logits(six):
    reader = open_cache(six["caches"]["sampled"])
    for b in range(6):
        live = live_sample(six, b)
        got = reader[reader.index_of(live["sample_id"])]
        text_pos = live["text_positions"]
        np.testing.assert_array_equal(got.logit_positions, text_pos[text_pos < len(live["input_ids"]) - 1])
        logits = live["logits"][torch.from_numpy(got.logit_positions.astype(np.int64))]
        p = torch.softmax(logits, -1).numpy()
        valid = got.logit_ids >= 0
        np.testing.assert_array_equal(got.logit_values.sum(1), 16)
        assert np.all(got.logit_values[valid] >= 1) and np.all(got.logit_values[~valid] == 0)
        assert np.all(got.logit_tail == 0)
        for row, ids in zip(p, got.logit_ids):
            assert np.all(row[ids[ids >= 0]] > 0)
        # the same draw the build made, from the live logits and the per-sample seed
        again = encode_sampled(logits, 16, torch.Generator().manual_seed(sample_seed(0, live["sample_id"])))
        np.testing.assert_array_equal(got.logit_ids, again.ids.numpy()[:, : got.logit_ids.shape[1]])
        np.testing.assert_array_equal(got.logit_values, again.values.numpy()[:, : got.logit_ids.shape[1]])


# ---------------------------------------------------------------- 2 + 8. rejects
def test_bad_rows_are_rejected_and_every_row_is_accounted_for(tmp_path, tiny_llava_dir):
    images = tmp_path / "images"
    make_image(tmp_path / "outside.png", seed=9)  # exists, but outside the images root
    (images / "corrupt.png").parent.mkdir(parents=True)
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    bad = [
        {"id": "missing", "image": "nope.png", "conversations": conversation(0)},
        good_record(1, sid="s0"),  # a repeated id: kept as "s0#2"
        {"id": "escape", "image": "../outside.png", "conversations": conversation(0)},
        {"id": "corrupt", "image": "corrupt.png", "conversations": conversation(0)},
        {"id": "noplace", "image": "img0.png", "conversations": conversation(0, image=False)},
        {"id": "latesystem", "image": "img0.png", "conversations": conversation(0) + [
            {"from": "system", "value": "be brief"}] + conversation(1, image=False)},
    ]
    data, images = make_dataset(tmp_path, 4, extra=bad)
    out = build(tiny_llava_dir, data, images, tmp_path / "cache", batch_size=3)
    samples = sql(out, "SELECT sample_id, manifest_row FROM samples ORDER BY manifest_row")
    rejects = cli("cache", "sql", out, "SELECT sample_id, manifest_row, reason FROM rejects ORDER BY manifest_row",
                  "--format", "json")
    assert rejects.exit_code == 0, rejects.output
    rejects = [json.loads(line) for line in rejects.output.splitlines()]  # JSON lines
    assert [s["sample_id"] for s in samples] == ["s0", "s1", "s2", "s3", "s0#2"]
    assert {r["sample_id"]: r["reason"] for r in rejects} == {
        "missing": "missing_image", "escape": "image_outside_root",
        "corrupt": "corrupt_image", "noplace": "image_without_placeholder", "latesystem": "bad_conversation"}
    rows = sorted(r["manifest_row"] for r in samples + rejects)
    assert rows == list(range(len(json.loads(data.read_text()))))


def assert_closing_line(output: str, out: Path, head: str, images: int, distinct: int) -> None:
    """`cache build` closes with `cache stats`' own bytes per sample (the shards over the samples),
    what the cache holds once (everything beside shards/), and its images against distinct ones."""
    import re

    from alignkd.cache.inspection.stats import kilobytes

    stats = json.loads(cli("cache", "stats", out, "--json").output)
    per_sample = kilobytes(stats["bytes_per_sample"])
    assert f"on disk {per_sample} per sample;" in cli("cache", "stats", out).output  # what stats prints
    fixed = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and p.relative_to(out).parts[0]
                in ("cache.json", "catalog.duckdb", "tokenizer"))
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == {
        "cache.json", "catalog.duckdb", "tokenizer", "shards"}
    expected = (f"{head}; {per_sample} per sample in shards + {kilobytes(fixed)} once "
                f"(cache.json, catalog.duckdb, tokenizer); {images} images, {distinct} distinct; ")
    line = output.strip().splitlines()[-1]
    assert re.fullmatch(re.escape(expected) + r"\d+\.\ds -> " + re.escape(str(out)), line), (line, expected)
    assert (stats["images"]["images"], stats["images"]["distinct_images"]) == (images, distinct)


def test_text_only_rows_are_cached_inside_an_image_batch(tmp_path, tiny_llava_dir):
    """A text-only record batched with image records: no vision tokens and no attention rows for
    it, its logits and labels as for any sample, and its neighbours unchanged."""
    data, images = make_dataset(tmp_path, 3, extra=[{"id": "t", "conversations": conversation(0, image=False)}])
    records = json.loads(data.read_text())
    write_manifest(data, [records[0], records[3], records[1], records[2]])  # text-only inside batch 1
    for name, size in (("cache", 4), ("alone", 1)):
        result = cli("cache", "build", "--teacher", tiny_llava_dir, "--data", data, "--images", images,
                     "--out", tmp_path / name, "--batch-size", size, "--attn-dtype", "float16", "--no-progress")
        assert result.exit_code == 0, result.output
        assert_closing_line(result.output, tmp_path / name, "cached 4 samples (0 rows already done), rejects: none",
                            images=3, distinct=3)
    assert sql(tmp_path / "cache", "SELECT sample_id, n_images, n_vision, n_text, n_logit_positions > 0 AS logits "
                                   "FROM samples WHERE sample_id = 't'") == [
        {"sample_id": "t", "n_images": 0, "n_vision": 0, "n_text": 0, "logits": True}]
    batched, alone = open_cache(tmp_path / "cache"), open_cache(tmp_path / "alone")
    for sid in ("s0", "t", "s1", "s2"):  # batch 1 held the text-only sample; batch size 1 never mixes
        a, b = batched[batched.index_of(sid)], alone[alone.index_of(sid)]
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_allclose(a.attn, b.attn, rtol=2e-3, atol=1e-6)
        np.testing.assert_allclose(a.logit_values, b.logit_values, rtol=2e-3, atol=2e-3)


# ---------------------------------------------------------------- 3. SIGKILL + resume
N_RESUME = 40
RESUME_OPTS = {"batch_size": 2, "shard_size": 4}


@pytest.fixture(scope="module")
def forty(tmp_path_factory, tiny_llava_dir):
    """38 good rows and two rejects (so rejects must survive a resume too), and reference builds."""
    root = tmp_path_factory.mktemp("forty")
    extra = [{"id": "gone", "image": "gone.png", "conversations": conversation(0)},
             {"id": "noplace", "image": "img0.png", "conversations": conversation(1, image=False)}]
    data, images = make_dataset(root, N_RESUME - 2, extra=extra)
    refs, seconds = {}, {}
    for mode in ("topk", "sampled"):
        start = time.perf_counter()
        refs[mode] = build(tiny_llava_dir, data, images, root / f"ref-{mode}", logit_mode=mode, logit_samples=16,
                           **RESUME_OPTS)
        seconds[mode] = time.perf_counter() - start
    return {"root": root, "data": data, "images": images, "refs": refs, "seconds": seconds}


def build_argv(teacher, data, images, out, *extra) -> list[str]:
    return [sys.executable, "-m", "alignkd.cli", "cache", "build", "--teacher", str(teacher), "--data", str(data),
            "--images", str(images), "--out", str(out), "--no-progress", *map(str, extra)]


def start_build(argv: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)


def wait_until_building(procs: dict[Path, subprocess.Popen], on_ready=None, timeout: float = 120) -> None:
    """Poll until each build holds its lock and has written cache.json, calling on_ready(out) once each."""
    waiting, deadline = dict(procs), time.monotonic() + timeout
    while waiting:
        for out, proc in list(waiting.items()):
            if (out / "cache.json").is_file():
                del waiting[out]
                if on_ready:
                    on_ready(out)
            elif proc.poll() is not None or time.monotonic() > deadline:
                for p in procs.values():
                    p.kill()
                pytest.fail(f"build into {out} did not start: {(out.parent / 'build.log').read_text()[-2000:]}")
        time.sleep(0.01)


def assert_same_cache(ref: Path, got: Path, exact_logits: bool) -> None:
    a, b = open_cache(ref), open_cache(got)
    assert len(set(b.sample_ids)) == len(b.sample_ids), "a resumed sample was stored twice"
    assert sorted(a.sample_ids) == sorted(b.sample_ids)
    for sid in a.sample_ids:
        x, y = a[a.index_of(sid)], b[b.index_of(sid)]
        assert x.manifest_row == y.manifest_row and x.image_sha256 == y.image_sha256
        for name in ("input_ids", "label_mask", "vision_positions", "text_positions", "logit_positions", "logit_ids"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name), err_msg=f"{sid} {name}")
        for name in ("attn", "vision"):  # batches differ after a resume: one bf16 step at most
            np.testing.assert_allclose(getattr(x, name), getattr(y, name), rtol=BF16_RTOL, atol=1e-7)
        for name in ("focus", "logit_values", "logit_tail"):
            if exact_logits and name != "focus":
                np.testing.assert_array_equal(getattr(x, name), getattr(y, name), err_msg=f"{sid} {name}")
            else:
                np.testing.assert_allclose(getattr(x, name), getattr(y, name), rtol=F32_TOL, atol=F32_TOL)
    rejects = "SELECT sample_id, manifest_row, reason FROM rejects ORDER BY manifest_row"
    assert sql(ref, rejects) == sql(got, rejects)
    assert verify_cache(got) == []


def test_sigkill_at_random_moments_then_resume_equals_uninterrupted_build(forty, tiny_llava_dir, tmp_path):
    """Three builds run side by side (their ~4 s imports overlap), each SIGKILLed at its own seeded
    moment within the first 80% of an in-process build's time, then resumed."""
    runs = {0: "topk", 1: "sampled", 2: "sampled"}
    procs, modes, kill_at = {}, {}, {}
    for seed, mode in runs.items():
        out = tmp_path / f"run{seed}" / "cache"
        out.parent.mkdir()
        opts = ["--batch-size", RESUME_OPTS["batch_size"], "--shard-size", RESUME_OPTS["shard_size"],
                "--logit-mode", mode, "--logit-samples", 16]
        procs[out] = start_build(build_argv(tiny_llava_dir, forty["data"], forty["images"], out, *opts),
                                 out.parent / "build.log")
        modes[out] = (seed, mode)

    def schedule(out):
        seed, mode = modes[out]
        kill_at[out] = time.monotonic() + random.Random(seed).uniform(0.0, 0.8) * forty["seconds"][mode]

    wait_until_building(procs, on_ready=schedule)
    for out in sorted(procs, key=kill_at.get):
        time.sleep(max(0.0, kill_at[out] - time.monotonic()))
        procs[out].send_signal(signal.SIGKILL)
    for out, proc in procs.items():
        assert proc.wait() == -signal.SIGKILL, f"{out} finished before its kill; lower the delay"
    for out, (seed, mode) in modes.items():
        shards = len(list((out / "shards").glob("shard-*")))
        build(tiny_llava_dir, forty["data"], forty["images"], out, logit_mode=mode, logit_samples=16, **RESUME_OPTS)
        assert_same_cache(forty["refs"][mode], out, exact_logits=mode == "sampled")
        print(f"seed {seed} ({mode}): killed with {shards} of 10 shards committed")


# ---------------------------------------------------------------- 4. resume with other options
@pytest.mark.parametrize("option,value", [("--logit-k", 4), ("--attn-dtype", "float16"), ("--seed", 3),
                                          ("--logit-positions", "text"), ("--attn-topk", 4)])
def test_resume_with_other_stored_option_is_refused(six, tiny_llava_dir, tmp_path, option, value):
    out = tmp_path / "cache"
    shutil.copytree(six["caches"]["bf16"], out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    args = ["cache", "build", "--teacher", tiny_llava_dir, "--data", six["data"], "--images", six["images"],
            "--out", out, "--batch-size", 4, "--logit-k", 8, "--attn-dtype", "bfloat16", "--vision-dtype", "bfloat16",
            "--logit-positions", "response", "--no-progress"]
    line = error_line(cli(*args, option, value))
    assert option in line and str(out) in line
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before


def test_overwrite_starts_over_with_the_new_options(six, tiny_llava_dir, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(six["caches"]["bf16"], out)
    result = cli("cache", "build", "--teacher", tiny_llava_dir, "--data", six["data"], "--images", six["images"],
                 "--out", out, "--logit-k", 4, "--limit", 3, "--overwrite", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "cached 3 samples (0 rows already done)" in result.output
    assert json.loads((out / "cache.json").read_text())["build_options"]["logit_k"] == 4
    reader = open_cache(out)
    assert sorted(reader.sample_ids) == ["s0", "s1", "s2"] and reader[0].logit_ids.shape[1] == 4


# ---------------------------------------------------------------- 5. lock
def test_second_concurrent_build_is_refused_with_the_lock_message(forty, tiny_llava_dir, tmp_path):
    out = tmp_path / "cache"
    argv = build_argv(tiny_llava_dir, forty["data"], forty["images"], out, "--batch-size", 1, "--shard-size", 1)
    proc = start_build(argv, tmp_path / "build.log")
    wait_until_building({out: proc})
    try:
        result = cli("cache", "build", "--teacher", tiny_llava_dir, "--data", forty["data"], "--images",
                     forty["images"], "--out", out, "--overwrite", "--no-progress")
        assert proc.poll() is None, "the first build ended before the second tried the lock"
    finally:
        proc.kill()
        proc.wait()
    line = error_line(result)
    assert f"cache {out} is locked by another build (pid {proc.pid})" in line
    assert (out / "cache.json").is_file()  # --overwrite did not wipe the running build


# ---------------------------------------------------------------- 6. verify, stats, show, sql
def test_verify_stats_and_sql_agree_on_a_fresh_build(forty):
    ref = forty["refs"]["topk"]
    result = cli("cache", "verify", ref)
    assert result.exit_code == 0 and result.output.strip() == f"ok: {ref} verified"
    result = cli("cache", "stats", ref, "--json")
    assert result.exit_code == 0, result.output
    stats = json.loads(result.output)
    (row,) = sql(ref, "SELECT count(*) AS n, sum(n_logit_positions) AS p, sum(n_text) AS t FROM samples")
    assert stats["samples"] == row["n"] == N_RESUME - 2
    assert stats["tokens"]["logit_positions"] == row["p"] and stats["tokens"]["text_query_rows"] == row["t"]
    by_reason = {r["reason"]: r["n"] for r in sql(ref, "SELECT reason, count(*) AS n FROM rejects GROUP BY reason")}
    assert stats["rejects"] == by_reason == {"missing_image": 1, "image_without_placeholder": 1}
    assert stats["shards"] == sql(ref, "SELECT count(*) AS n FROM shards")[0]["n"] == 10
    assert stats["build_options"]["logit_mode"] == "topk"


def test_show_writes_a_png_and_refuses_an_unknown_sample(forty, tmp_path):
    from PIL import Image

    ref = forty["refs"]["topk"]
    png = tmp_path / "s2.png"
    result = cli("cache", "show", ref, "s2", "--out", png)
    assert result.exit_code == 0 and str(png) in result.output
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 0 and im.height > 0
    line = error_line(cli("cache", "show", ref, "nope", "--out", tmp_path / "x.png"))
    assert "'nope'" in line and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("statement", ["DELETE FROM samples", "CREATE TABLE t AS SELECT 1", "SELECT 1; DROP VIEW samples"])
def test_sql_refuses_writes(forty, statement):
    ref = forty["refs"]["topk"]
    line = error_line(cli("cache", "sql", ref, statement))
    assert "read-only" in line
    assert sql(ref, "SELECT count(*) AS n FROM samples") == [{"n": N_RESUME - 2}]


# ---------------------------------------------------------------- 7. bad options
def test_bad_options_are_one_sentence_errors(six, tiny_llava_dir, tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(good_record(0)) + "\n" + json.dumps(good_record(1)) + "\n{not json\n")
    base = {"--teacher": tiny_llava_dir, "--data": six["data"], "--images": six["images"], "--out": tmp_path / "c"}
    cases = [
        ({"--logit-k": 0}, "--logit-k must be at least 1"),
        ({"--batch-size": 0}, "--batch-size must be at least 1"),
        ({"--data": tmp_path / "none.json"}, f"manifest {tmp_path / 'none.json'} does not exist"),
        ({"--images": tmp_path / "noimg"}, f"images directory {tmp_path / 'noimg'} does not exist"),
        ({"--data": broken}, f"{broken} line 3 is not valid JSON"),
        ({"--teacher": tmp_path / "noteacher"}, f"model directory {tmp_path / 'noteacher'} does not exist"),
    ]
    for change, message in cases:
        opts = {**base, **change}
        args = [x for k, v in opts.items() for x in (k, v)]
        line = error_line(cli("cache", "build", *args, "--no-progress"))
        assert message in line, line
    assert not (tmp_path / "c").exists()
