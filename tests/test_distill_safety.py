"""`alignkd distill` never calls a broken run a success and never writes over a user's files.

- a nan/inf loss or parameter stops the run in one sentence naming the step and the term
  or tensor, exit 1, and no student is exported;
- non-finite or out-of-range options are refused in one sentence naming the option;
- --out that is an input, or holds a model, a cache or files the run did not write, is
  refused (byte-identical afterwards) unless --resume continues that very run or
  --overwrite replaces a run's own files;
- a full disk while checkpointing is one sentence naming the path and the size, and
  leaves no half-written checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from alignkd.cache.teacher.build import BuildConfig, build_cache
from alignkd.cli import main
from alignkd.distill.run import DistillConfig
from alignkd.errors import ConfigError

from tests.support.limits import in_child_with_file_size_limit, invoke_cli_with_file_size_limit
from tests.support.world import make_image, write_manifest


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llava_dir):
    root = tmp_path_factory.mktemp("safety")
    records = []
    for i in range(4):
        make_image(root / "images" / f"{i}.png", seed=20 + i)
        records.append({"id": f"d{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat is the shape of this image ?"},
            {"from": "gpt", "value": ["red", "blue circle", "yes", "no"][i]}]})
    manifest = write_manifest(root / "train.json", records)
    cache = root / "cache"
    build_cache(BuildConfig(teacher=str(tiny_llava_dir), data=str(manifest), images=str(root / "images"),
                            out=str(cache), batch_size=2, shard_size=4, logit_k=8, progress=False))
    return {"root": root, "cache": cache, "images": root / "images", "manifest": manifest}


def _args(world, student, out, *extra):
    return ["distill", "--student", str(student), "--cache", str(world["cache"]), "--out", str(out),
            "--batch-size", "2", "--max-steps", "2", "--save-steps", "1", "--logging-steps", "1",
            "--workers", "0", "--no-progress", *extra]


def _one_sentence(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, (SystemExit, type(None))), result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def _tree(path: Path) -> dict[str, str]:
    """Every file under `path` with its sha256: byte-identity of a user's directory."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- non-finite training
@pytest.mark.parametrize("lr,step,needle", [
    ("1e39", 1, "after the optimizer step the parameter "),  # the update itself overflows float32
    ("1e30", 2, "loss is "),                                 # finite weights of 1e30, then logits overflow
])
def test_non_finite_training_stops_naming_the_step_and_exports_nothing(world, tiny_student_dir, tmp_path, lr, step,
                                                                       needle):
    out = tmp_path / "run"
    line = _one_sentence(CliRunner().invoke(main, _args(world, tiny_student_dir, out, "--lr", lr)))
    assert line.startswith(f"error: step {step}: ") and needle in line, line
    assert "nothing was exported" in line
    exported = {"config.json", "model.safetensors", "adapters.safetensors", "distill_run.json"}
    assert not exported & {p.name for p in out.iterdir()}
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints == [f"checkpoint-{s}" for s in range(1, step)]  # the steps before it, all finite
    for name in checkpoints:
        weights = load_file(out / "checkpoints" / name / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values())


def test_eval_refuses_a_model_with_non_finite_weights(world, tiny_student_dir, tmp_path):
    model = tmp_path / "diverged"
    shutil.copytree(tiny_student_dir, model)
    weights = load_file(model / "model.safetensors")
    name = sorted(weights)[3]
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    line = _one_sentence(CliRunner().invoke(main, ["eval", "--model", str(model), "--data", str(world["manifest"]),
                                                   "--images", str(world["images"]), "--no-progress"]))
    assert line.startswith(f"error: model {model} has non-finite weights (first: ")
    assert line.endswith("), so it cannot be scored.")
    reported = line.split("(first: ")[1].split(")")[0]  # the module's name; the file may use the legacy prefix
    assert reported.split(".")[-4:] == name.split(".")[-4:], (reported, name)


# ---------------------------------------------------------------- options
BAD_OPTIONS = [
    (["--lr", "nan"], "--lr must be a finite number, not nan."),
    (["--lr", "inf"], "--lr must be a finite number, not inf."),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number, not nan."),
    (["--warmup-ratio", "nan"], "--warmup-ratio must be a finite number, not nan."),
    (["--w-ce", "nan"], "--w-ce must be a finite number, not nan."),
    (["--w-logit", "inf"], "--w-logit must be a finite number, not inf."),
    (["--w-attn", "nan"], "--w-attn must be a finite number, not nan."),
    (["--w-vis", "-inf"], "--w-vis must be a finite number, not -inf."),
    (["--temperature", "nan"], "--temperature must be a finite number, not nan."),
    (["--temperature", "inf"], "--temperature must be a finite number, not inf."),
    (["--epochs", "nan"], "--epochs must be a finite number, not nan."),
    (["--max-steps", "-1", "--epochs", "0"], "--epochs must be positive when --max-steps is not, not 0.0"),
    (["--max-steps", "0", "--epochs", "-1"], "--epochs must be positive when --max-steps is not, not -1.0"),
    (["--w-ce", "-1"], "--w-ce must not be negative."),
    (["--lr", "-1e-3"], "--lr must not be negative."),
    (["--temperature", "0"], "--temperature must be positive."),
    (["--temperature", "-2"], "--temperature must be positive."),
    (["--resume", "--overwrite"], "--resume continues the run in --out and --overwrite replaces it"),
]


@pytest.mark.parametrize("extra,message", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_training_options_are_one_sentence(world, tiny_student_dir, tmp_path, extra, message):
    out = tmp_path / "run"
    line = _one_sentence(CliRunner().invoke(main, _args(world, tiny_student_dir, out, *extra)))
    assert line.startswith(f"error: {message}"), line
    assert not out.exists()


def test_the_library_refuses_what_the_cli_refuses(world, tiny_student_dir, tmp_path):
    base = dict(student=str(tiny_student_dir), cache=str(world["cache"]), out=str(tmp_path / "run"))
    for field, value in [("lr", float("nan")), ("w_ce", float("nan")), ("temperature", float("inf")),
                         ("epochs", 0.0)]:
        with pytest.raises(ConfigError, match=f"--{field.replace('_', '-')} must"):
            DistillConfig(**base, **{field: value})


# ---------------------------------------------------------------- --out
def test_out_that_is_or_holds_an_input_is_refused_even_with_overwrite(world, tiny_student_dir, tmp_path):
    student_files, cache_files = _tree(tiny_student_dir), _tree(world["cache"])
    cases = [(tiny_student_dir, f"--out {tiny_student_dir} is the --student directory"),
             (world["cache"], f"--out {world['cache']} is the --cache directory"),
             (world["cache"] / "run", "is inside the --cache directory"),
             (tiny_student_dir.parent, "contains the --student directory")]
    for out, needle in cases:
        for flags in ([], ["--overwrite"]):
            line = _one_sentence(CliRunner().invoke(main, _args(world, tiny_student_dir, out, *flags)))
            assert needle in line, (out, flags, line)
    assert _tree(tiny_student_dir) == student_files and _tree(world["cache"]) == cache_files
    assert not (world["cache"] / "run").exists()


def test_out_holding_a_model_a_cache_or_user_files_is_refused(world, tiny_student_dir, tiny_llava_dir, tmp_path):
    user = tmp_path / "home"
    (user / "src").mkdir(parents=True)
    (user / "thesis.txt").write_text("four years")
    (user / "src" / "m.py").write_text("print(1)\n")
    cache_copy = tmp_path / "other-cache"
    shutil.copytree(world["cache"], cache_copy)
    # the cache's own teacher is an input too: refused even with --overwrite
    teacher_files = _tree(tiny_llava_dir)
    line = _one_sentence(CliRunner().invoke(main, _args(world, tiny_student_dir, tiny_llava_dir, "--overwrite")))
    assert f"--out {tiny_llava_dir} is the cache's teacher directory" in line, line
    assert _tree(tiny_llava_dir) == teacher_files
    teacher_copy = tmp_path / "some-model"
    shutil.copytree(tiny_llava_dir, teacher_copy)
    before = {p: _tree(p) for p in (teacher_copy, cache_copy, user)}
    for out, needle in [(teacher_copy, "already holds a model (config.json)"),
                        (cache_copy, "already holds a cache (cache.json)"),
                        (user, "already holds files this run did not write (src and more)")]:
        line = _one_sentence(CliRunner().invoke(main, _args(world, tiny_student_dir, out)))
        assert f"--out {out} {needle}" in line, line
        assert "--resume" in line and "--overwrite" in line
        line = _one_sentence(CliRunner().invoke(main, _args(world, tiny_student_dir, out, "--resume")))
        assert "not a distill run to continue" in line, line
    assert {p: _tree(p) for p in before} == before

    # --overwrite into a folder of user files writes the student beside them and keeps them byte for byte
    result = CliRunner().invoke(main, _args(world, tiny_student_dir, user, "--overwrite"))
    assert result.exit_code == 0, result.output
    assert {k: v for k, v in _tree(user).items() if k in before[user]} == before[user]
    assert (user / "model.safetensors").is_file()


def test_overwrite_refuses_distill_named_files_it_did_not_write(world, tiny_student_dir, tmp_path):
    out = tmp_path / "teacher-training"
    (out / "checkpoints" / "checkpoint-100").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-100" / "weights.bin").write_bytes(b"\0" * 10)
    (out / "metrics.jsonl").write_text('{"step": 100, "loss": 1.0}\n')
    before = _tree(out)
    line = _one_sentence(CliRunner().invoke(main, _args(world, tiny_student_dir, out, "--overwrite")))
    assert f"--overwrite: --out {out} holds checkpoints but no distill run record" in line
    assert _tree(out) == before


def test_rerun_needs_resume_or_overwrite_and_resume_needs_the_same_run(world, tiny_student_dir, tmp_path):
    from alignkd.demo.tiny_models import TinyLlavaSpec, build_tiny_llava

    out = tmp_path / "run"
    assert CliRunner().invoke(main, _args(world, tiny_student_dir, out)).exit_code == 0
    record = json.loads((out / "distill_run.json").read_text())
    assert record["inputs"] == {"student": str(tiny_student_dir.resolve()), "cache": str(world["cache"].resolve())}
    assert {"model.safetensors", "config.json", "adapters.safetensors"} <= set(record["files"])

    line = _one_sentence(CliRunner().invoke(main, _args(world, tiny_student_dir, out)))
    assert f"--out {out} already holds a distill run (checkpoints/run.json)" in line

    other = build_tiny_llava(tmp_path / "other-student", TinyLlavaSpec(hidden_size=32, num_heads=2,
                                                                      intermediate_size=64), seed=7)
    line = _one_sentence(CliRunner().invoke(main, _args(world, other, out, "--resume")))
    assert f"is a run of student {tiny_student_dir.resolve()}" in line and f"not of student {other.resolve()}" in line

    (out / "notes.txt").write_text("mine")
    result = CliRunner().invoke(main, _args(world, other, out, "--overwrite", "--max-steps", "1"))
    assert result.exit_code == 0, result.output
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1", "run.json"]
    assert json.loads((out / "distill_run.json").read_text())["inputs"]["student"] == str(other.resolve())


# ---------------------------------------------------------------- full disk
LIMIT = 235_000  # bytes per file: above a checkpoint's model.safetensors (217 kB), below its optimizer.pt (251 kB)


def _invoke_with_file_size_limit(args: list[str], log: Path) -> int:
    return invoke_cli_with_file_size_limit(args, log, LIMIT)


def test_full_disk_while_checkpointing_is_one_sentence_and_leaves_no_partial_checkpoint(world, tiny_student_dir,
                                                                                       tmp_path):
    assert (tiny_student_dir / "model.safetensors").stat().st_size < LIMIT
    out = tmp_path / "run"
    args = _args(world, tiny_student_dir, out)
    code = _invoke_with_file_size_limit(args, tmp_path / "full.log")
    output = (tmp_path / "full.log").read_text()
    assert code == 1, output
    assert "Traceback" not in output and "escaped" not in output, output
    lines = [ln for ln in output.splitlines() if ln.strip()]
    target = out / "checkpoints" / "checkpoint-1"
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot write a checkpoint to {target}: "
                                                   "the file size limit (ulimit -f) is 0.2 MB (about "), output
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["run.json"]  # nothing half-written
    assert not (out / "config.json").exists()

    line = _one_sentence(CliRunner().invoke(main, args + ["--resume"]))  # nothing to resume from yet
    assert "no complete checkpoint found" in line and "--overwrite" in line
    result = CliRunner().invoke(main, args + ["--overwrite"])  # the space is back
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2", "run.json"]


def test_full_disk_while_exporting_is_one_sentence_and_leaves_no_student(world, tiny_student_dir, tmp_path):
    from alignkd.cache.reader import open_cache
    from alignkd.distill.export import export_student
    from alignkd.distill.objective import AlignKDObjective, LossWeights
    from alignkd.models import load_vlm

    vlm, meta = load_vlm(tiny_student_dir), open_cache(world["cache"]).meta
    objective = AlignKDObjective(vlm.model, teacher_heads=meta["teacher_shapes"]["num_heads"],
                                 teacher_dim=meta["teacher_shapes"]["hidden_size"], weights=LossWeights(),
                                 logit_mode="topk", logit_samples=16, loss_scale="normalized")
    out = tmp_path / "run"
    cfg = DistillConfig(student=str(tiny_student_dir), cache=str(world["cache"]), out=str(out))
    log = tmp_path / "export.log"

    def body() -> int:
        try:
            export_student(objective, vlm.processor, out, cfg, meta)
        except Exception as err:  # noqa: BLE001 - reported through the log
            log.write_text(f"{type(err).__name__}: {err}")
            return 3
        return 0

    assert in_child_with_file_size_limit(body, 100_000) == 3  # below the student's 208 kB weights
    assert log.read_text().startswith(f"WriteError: cannot write the student to {out}: the file size limit "
                                      "(ulimit -f) is 0.1 MB (about "), log.read_text()
    assert sorted(p.name for p in out.iterdir()) == []  # no .tmp-export, no config.json, no weights
