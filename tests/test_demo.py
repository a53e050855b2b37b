"""`alignkd demo --quick` end to end: world, teacher training, cache, five students, report."""

from __future__ import annotations

import json

from click.testing import CliRunner

from alignkd.cli import main
from alignkd.demo.runner import ABLATION, DEMO_QTYPES, DemoConfig


def test_quick_demo_runs_end_to_end_and_reports_every_row(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--quick", "--ablation", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    for name, _ in ABLATION:
        assert f"| {name} | 1 |" in report
    assert "| teacher | - |" in report and "Align-KD against CE only" in report
    # the report names the objective the rows really ran with
    run = json.loads((out / "runs" / "full-align-kd-seed0" / "distill_run.json").read_text())["config"]
    assert f"--loss-scale {run['loss_scale']}," in report
    assert (out / "attention.png").stat().st_size > 0 and (out / "loss_curves.png").stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["quick"] is True and 0 <= summary["teacher"] <= 1

    from transformers import AutoModelForImageTextToText

    runs = sorted(p for p in (out / "runs").iterdir() if p.is_dir())  # beside each run: its distill log
    assert len(runs) == len(ABLATION)
    for run in runs:
        AutoModelForImageTextToText.from_pretrained(run)
        scores = json.loads((run / "eval-test.json").read_text())  # `alignkd eval --json`'s output
        assert set(scores["by_type"]) == set(DEMO_QTYPES) and scores["samples"] > 0

    # a rerun skips every finished stage and reproduces the same table
    again = CliRunner().invoke(main, ["demo", "--quick", "--ablation", "--out", str(out), "--no-progress"])
    assert again.exit_code == 0
    assert (out / "report.md").read_text().split("## Cache")[0].split("Wall time")[1].split("\n", 1)[1] == \
        report.split("## Cache")[0].split("Wall time")[1].split("\n", 1)[1]


def test_shipped_teacher_matches_its_record_and_loads(tmp_path):
    """The weights `make demo` uses: checksum as recorded, and a LLaVA that transformers loads."""
    import hashlib

    from transformers import AutoModelForImageTextToText

    from alignkd.demo.shipped import RECORD, WEIGHTS, materialise_shipped_teacher, shipped_teacher_available

    assert shipped_teacher_available()
    record = json.loads(RECORD.read_text())
    assert hashlib.sha256(WEIGHTS.read_bytes()).hexdigest() == record["sha256"]
    assert record["command"].startswith("alignkd demo train-teacher")
    model = AutoModelForImageTextToText.from_pretrained(materialise_shipped_teacher(tmp_path / "teacher"))
    assert model.config.text_config.num_attention_heads == 8


def test_default_demo_trains_ce_only_against_full_align_kd():
    """`make demo` runs the two rows the claim is about; the ablation is opt-in."""
    assert [name for name, _ in DemoConfig().rows()] == ["CE only", "full Align-KD"]
    assert [name for name, _ in DemoConfig(ablation=True).rows()] == [name for name, _ in ABLATION]
