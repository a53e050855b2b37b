"""`alignkd demo --quick` end to end: world, teacher training, cache, five students, report."""

from __future__ import annotations

import json

from click.testing import CliRunner

from alignkd.cli import main
from alignkd.demo.runner import ABLATION


def test_quick_demo_runs_end_to_end_and_reports_every_row(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    for name, _ in ABLATION:
        assert f"| {name} | 1 |" in report
    assert "| teacher | - |" in report and "Align-KD against CE only" in report
    assert (out / "attention.png").stat().st_size > 0 and (out / "loss_curves.png").stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["quick"] is True and 0 <= summary["teacher"] <= 1

    from transformers import AutoModelForImageTextToText

    runs = sorted((out / "runs").iterdir())
    assert len(runs) == len(ABLATION)
    for run in runs:
        AutoModelForImageTextToText.from_pretrained(run)
        scores = json.loads((run / "test_scores.json").read_text())
        assert set(scores) >= {"all", "where", "relation"}

    # a rerun skips every finished stage and reproduces the same table
    again = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out), "--no-progress"])
    assert again.exit_code == 0
    assert (out / "report.md").read_text().split("## Cache")[0].split("Wall time")[1].split("\n", 1)[1] == \
        report.split("## Cache")[0].split("Wall time")[1].split("\n", 1)[1]
