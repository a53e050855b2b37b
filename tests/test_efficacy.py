"""bench/efficacy.py end to end on a tiny world directory it has never seen: the CLI stages,
the ablation over the objective presets, the per-world tables and summary, resume, and
refusals of a malformed world."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.world import make_image, write_manifest

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


PRESET_ARMS = {"ce": "ce", "logits": "logits", "logits+vision": "logits+vision",
               "logits+attention": "logits+attention", "alignkd": "full"}


def _logged_terms(run: Path) -> set[str]:
    """The loss terms a run's metrics.jsonl logged at any step: the terms its objective computed."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {k.removeprefix("loss_") for r in records for k in r if k.startswith("loss_")}


def test_efficacy_ablation_runs_a_new_world_through_the_cli(tmp_path, tiny_llava_dir, tiny_student_dir):
    """`--ablation`: one arm per objective preset, each a real CLI distill whose objective computed
    exactly its preset's terms, the usual table, and each arm's paired increment over logits only."""
    world = _world(tmp_path / "tinyworld", tiny_llava_dir, tiny_student_dir)
    out = tmp_path / "out"
    first = _run("--world", world, "--seeds", 1, "--split", "val", "--out", out, "--jobs", 2, "--ablation",
                 cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    [summary] = json.loads((out / "summary-val.json").read_text())
    assert summary["world"] == "tinyworld" and summary["recipe"]["steps"] == 2
    assert list(summary["arms"]) == list(PRESET_ARMS)
    for arm in PRESET_ARMS:
        if arm != "ce":
            a = summary["arms"][arm]
            assert len(a["per_seed"]) == len(a["per_seed_gain"]) == 1
            assert abs(a["gain"] - (a["per_seed"][0] - summary["arms"]["ce"]["per_seed"][0])) < 1e-9
    logits = summary["arms"]["logits"]["per_seed"][0]
    assert set(summary["over_logits"]) == {"logits+vision", "logits+attention", "alignkd"}
    for arm, inc in summary["over_logits"].items():
        assert abs(inc["mean"] - (summary["arms"][arm]["per_seed"][0] - logits)) < 1e-9
        assert inc["wins"] == int(inc["mean"] > 0) and inc["sd"] == 0.0
    # every student is a real distill run through the CLI, with the recipe and its arm's preset,
    # and its objective computed its preset's terms and no other (a term that ran is logged)
    runs = sorted(out.glob("tinyworld-*/*/*-seed*/distill_run.json"))
    assert len(runs) == len(PRESET_ARMS)
    configs = {p.parent.parent.name: json.loads(p.read_text())["config"] for p in runs}
    terms = {p.parent.parent.name: _logged_terms(p.parent) for p in runs}
    assert {arm: c["preset"] for arm, c in configs.items()} == PRESET_ARMS
    assert configs["ce"]["w_vis"] == configs["ce"]["w_attn"] == configs["ce"]["w_logit"] == 0
    assert terms == {"ce": {"ce"}, "logits": {"ce", "logit"}, "logits+vision": {"ce", "logit", "vis"},
                     "logits+attention": {"ce", "logit", "attn"}, "alignkd": {"ce", "logit", "vis", "attn"}}
    assert configs["alignkd"]["max_steps"] == 2 and configs["alignkd"]["batch_size"] == 2
    table = (out / "table-val.md").read_text()
    assert "| tinyworld | alignkd |" in table and "| tinyworld | logits+vision |" in table
    assert table.splitlines()[0] in first.stdout
    increments = table[table.index("increment over logits only"):].splitlines()
    assert increments[2] == "| world | arm | over logits | sd | wins | per seed |"
    assert len(increments) == 4 + 3 and all(line in first.stdout for line in increments)
    # a rerun reuses every finished stage: no distill runs again
    again = _run("--world", world, "--seeds", 1, "--split", "val", "--out", out, "--ablation", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert not [line for line in again.stdout.splitlines() if line.startswith("[efficacy] tinyworld:")]
    assert json.loads((out / "summary-val.json").read_text()) == [summary]


def test_a_world_without_its_parts_is_named(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "train_student.json").write_text("[]")
    result = _run("--world", tmp_path / "half", "--out", tmp_path / "o", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "lacks teacher, student, images" in result.stderr
