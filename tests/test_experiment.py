"""The experiment runner's plan and tables (alignkd.experiment), without training anything:
run directory names that earlier benches wrote must resolve again, arms parse as documented,
and the tables keep their format. The stages run end to end in tests/test_efficacy.py and
tests/test_demo.py."""

from __future__ import annotations


import pytest

from alignkd.errors import ConfigError
from alignkd.experiment import plan, tables

DEMO_RECIPE = {"steps": 1000, "batch_size": 32, "lr": 2e-3, "warmup_ratio": 0.05}


def test_run_names_are_the_ones_earlier_efficacy_runs_wrote():
    """Names copied from an efficacy --out written before the runner existed: a rerun resumes them."""
    names = {arm.name: plan.hashed_run_name(DEMO_RECIPE, arm, 1) for arm in plan.preset_arms()}
    assert names["alignkd"] == "1000steps-b32-lr0.002-w0.05-xe3b0c442-seed1"
    assert names["ce"] == "1000steps-b32-lr0.002-w0.05-x8becc011-seed1"  # the CE-only flags before the presets
    assert plan.hashed_run_name(DEMO_RECIPE, plan.Arm("logits", "--w-attn 0 --w-vis 0"), 1) == \
        "1000steps-b32-lr0.002-w0.05-xf2fd32bb-seed1"


def test_arms_from_presets_and_flags():
    assert [(a.name, a.flags) for a in plan.preset_arms()] == [
        ("ce", "--preset ce"), ("logits", "--preset logits"), ("logits+vision", "--preset logits+vision"),
        ("logits+attention", "--preset logits+attention"), ("alignkd", "")]
    assert plan.parse_arm('paper=--loss-scale paper --w-vis 2').argv() == ["--loss-scale", "paper", "--w-vis", "2"]
    with pytest.raises(ConfigError, match="expected NAME="):
        plan.parse_arm("--w-vis 2")
    with pytest.raises(ConfigError, match="unknown objective preset 'logit'"):
        plan.Arm.of_preset("x", "logit")


def test_sweep_rows_become_distill_flags():
    from bench.objective_sweep import parse_row

    assert parse_row("vis 0.3:preset=logits+vision, w_vis=0.3") == plan.Arm("vis 0.3", "--preset logits+vision --w-vis 0.3")
    assert parse_row("full:") == plan.Arm("full", "")


def test_accuracy_table_mean_and_sample_sd_per_type():
    teacher = {"all": 0.9, "count": 0.8, "colour": 1.0, "answer_ce": 0.1}
    rows = {"CE only": [{"all": 0.5, "colour": 0.5, "count": 0.5}, {"all": 0.7, "colour": 0.6, "count": 0.8}],
            "full": [{"all": 0.75, "colour": 1.0, "count": 0.5}]}
    assert tables.accuracy_table(rows, teacher).splitlines() == [
        "| model | seeds | all | colour | count |", "|---|---|---|---|---|",
        "| teacher | - | 90.0 | 100.0 | 80.0 |",
        "| CE only | 2 | 60.0 ± 14.1 | 55.0 ± 7.1 | 65.0 ± 21.2 |",
        "| full | 1 | 75.0 | 100.0 | 50.0 |"]


def test_missing_world_parts_are_one_config_error(tmp_path):
    (tmp_path / "w").mkdir()
    with pytest.raises(ConfigError, match=r"world .*w lacks teacher, student, train_student.json, images"):
        plan.load_world(str(tmp_path / "w"), {})
