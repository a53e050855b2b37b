"""bench/efficacy.py end to end on a tiny world directory it has never seen: the CLI stages,
the per-world table and summary, resume, and refusals of a malformed world."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import make_image, write_manifest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "efficacy.py"


def _world(root: Path, teacher: Path, student: Path) -> Path:
    images = root / "images"
    answers = ["red", "blue", "green"]
    records = []
    for i in range(6):
        make_image(images / f"{i}.png", seed=i)
        records.append({"id": f"r{i}", "image": f"{i}.png", "qtype": "colour" if i % 2 else "shape",
                        "conversations": [{"from": "human", "value": "<image>\nwhat is the colour ?"},
                                          {"from": "gpt", "value": answers[i % 3]}]})
    write_manifest(root / "train_student.json", records[:4])
    write_manifest(root / "val.json", records[4:])
    write_manifest(root / "test.json", records[4:])
    shutil.copytree(teacher, root / "teacher")
    shutil.copytree(student, root / "student")
    (root / "recipe.json").write_text(json.dumps({"steps": 2, "batch_size": 2, "lr": 1e-3}))
    return root


def _run(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(BENCH), *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_efficacy_runs_a_new_world_through_the_cli(tmp_path, tiny_llava_dir, tiny_student_dir):
    world = _world(tmp_path / "tinyworld", tiny_llava_dir, tiny_student_dir)
    out = tmp_path / "out"
    first = _run("--world", world, "--seeds", 1, "--split", "val", "--out", out, "--jobs", 2,
                 "--arm", "vis=--w-logit 0 --w-attn 0", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    [summary] = json.loads((out / "summary-val.json").read_text())
    assert summary["world"] == "tinyworld" and summary["recipe"]["steps"] == 2
    assert set(summary["arms"]) == {"ce", "alignkd", "vis"}
    for arm in ("alignkd", "vis"):
        a = summary["arms"][arm]
        assert len(a["per_seed"]) == len(a["per_seed_gain"]) == 1
        assert abs(a["gain"] - (a["per_seed"][0] - summary["arms"]["ce"]["per_seed"][0])) < 1e-9
    # every student is a real distill run through the CLI, with the recipe and the arm's flags
    runs = sorted((out).glob("tinyworld-*/*/*-seed*/distill_run.json"))
    assert len(runs) == 3
    configs = {p.parent.parent.name: json.loads(p.read_text())["config"] for p in runs}
    assert configs["ce"]["w_vis"] == configs["ce"]["w_attn"] == configs["ce"]["w_logit"] == 0
    assert configs["vis"]["w_vis"] == 1 and configs["vis"]["w_logit"] == 0
    assert configs["alignkd"]["max_steps"] == 2 and configs["alignkd"]["batch_size"] == 2
    table = (out / "table-val.md").read_text()
    assert "| tinyworld | alignkd |" in table and "| tinyworld | vis |" in table
    assert table.splitlines()[0] in first.stdout
    # a rerun reuses every finished stage: no distill runs again
    again = _run("--world", world, "--seeds", 1, "--split", "val", "--out", out, "--arm",
                 "vis=--w-logit 0 --w-attn 0", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert not [line for line in again.stdout.splitlines() if line.startswith("[efficacy] tinyworld:")]
    assert json.loads((out / "summary-val.json").read_text()) == [summary]


def test_a_world_without_its_parts_is_named(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "train_student.json").write_text("[]")
    result = _run("--world", tmp_path / "half", "--out", tmp_path / "o", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "lacks teacher, student, images" in result.stderr
