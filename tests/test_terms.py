"""The loss-term table and the objective presets: one place names a term, its weight option and
its default, and every preset, the config and the command line follow it."""

from __future__ import annotations

import dataclasses

import pytest
from click.testing import CliRunner

from alignkd.cli import main
from alignkd.distill.terms import LOSS_TERMS, PRESETS, LossTerm, LossWeights, TermSpec, faded, preset_weights
from alignkd.distill.run import DistillConfig
from alignkd.errors import ConfigError


class _Dummy(LossTerm):
    name, reads = "dummy", ("t_dummy",)


def test_ce_preset_is_ce_alone_and_logits_adds_only_the_logit_term():
    ce, logits = preset_weights("ce"), preset_weights("logits")
    assert set(ce) == set(logits) == set(LOSS_TERMS)
    assert {name for name, w in ce.items() if w > 0} == {"ce"}
    assert {name for name, w in logits.items() if w > 0} == {"ce", "logit"}
    assert {name for name, w in preset_weights("logits+vision").items() if w > 0} == {"ce", "logit", "vis"}
    assert {name for name, w in preset_weights("logits+attention").items() if w > 0} == {"ce", "logit", "attn"}
    assert preset_weights("full") == {name: spec.default_weight for name, spec in LOSS_TERMS.items()}


def test_a_term_added_to_the_table_is_off_in_the_baselines_and_on_in_full(monkeypatch):
    monkeypatch.setitem(LOSS_TERMS, "dummy", TermSpec(_Dummy, 0.5, "a term only this test knows"))
    assert preset_weights("ce")["dummy"] == 0.0
    assert preset_weights("logits")["dummy"] == 0.0
    assert preset_weights("logits+vision")["dummy"] == preset_weights("logits+attention")["dummy"] == 0.0
    assert preset_weights("full")["dummy"] == 0.5
    assert LossWeights().dummy == 0.5 and "dummy" not in LossWeights(**preset_weights("ce")).enabled()


def test_loss_weights_default_from_the_table_and_refuse_an_unknown_term():
    assert LossWeights().enabled() == tuple(LOSS_TERMS)
    assert LossWeights(vis=0.0, attn=0).enabled() == ("ce", "logit")
    assert LossWeights(vis=0.0) == LossWeights(vis=0)
    with pytest.raises(TypeError, match="unknown loss terms"):
        LossWeights(visual=1.0)
    with pytest.raises(ConfigError, match="--preset nope: unknown objective preset"):
        preset_weights("nope")


def test_every_term_has_a_config_field_and_a_flag(tiny_student_dir, tmp_path):
    fields = {f.name: f for f in dataclasses.fields(DistillConfig)}
    for spec in LOSS_TERMS.values():
        assert fields[spec.option].default is None  # None: the preset's weight
    help_text = CliRunner().invoke(main, ["distill", "--help"], terminal_width=200).output
    for spec in LOSS_TERMS.values():
        assert f"--w-{spec.term.name} FLOAT" in help_text
    for name in PRESETS:
        assert name in help_text
    assert "--loss-scale [paper|normalized]" in help_text and f"[default: {DistillConfig.loss_scale}]" in help_text


def _config(tiny_student_dir, tmp_path, **kw) -> DistillConfig:
    (tmp_path / "cache").mkdir(exist_ok=True)
    return DistillConfig(student=str(tiny_student_dir), cache=str(tmp_path / "cache"), out=str(tmp_path / "out"), **kw)


def test_a_preset_sets_every_weight_and_a_weight_flag_overrides_it(tiny_student_dir, tmp_path):
    full = _config(tiny_student_dir, tmp_path)
    assert full.preset == "full" and full.loss_weights() == LossWeights()
    logits = _config(tiny_student_dir, tmp_path, preset="logits", w_vis=0.5)
    assert (logits.w_ce, logits.w_logit, logits.w_vis, logits.w_attn) == (1.0, 1.0, 0.5, 0.0)
    assert logits.loss_weights().enabled() == ("ce", "logit", "vis")
    # the weights are recorded as numbers, so a run's record says what it trained
    assert dataclasses.asdict(_config(tiny_student_dir, tmp_path, preset="ce"))["w_attn"] == 0.0
    with pytest.raises(ConfigError, match="every loss weight is 0; enable at least one of --w-ce/--w-logit"):
        _config(tiny_student_dir, tmp_path, preset="ce", w_ce=0.0)


def test_an_unknown_preset_is_one_sentence(tiny_student_dir, tmp_path):
    (tmp_path / "cache").mkdir()
    result = CliRunner().invoke(main, ["distill", "--student", str(tiny_student_dir), "--cache",
                                       str(tmp_path / "cache"), "--out", str(tmp_path / "o"), "--preset", "logit"])
    assert result.exit_code == 2 and "Invalid value for '--preset'" in result.output
    assert "Traceback" not in result.output


def test_align_fade_scales_only_the_alignment_terms_linearly_to_zero():
    full = LossWeights(ce=1.0, logit=2.0, vis=1.0, attn=4.0)
    assert faded(full, 0.3, 0.0) is full                   # 0: no schedule
    assert faded(full, 0.25, 0.5) == LossWeights(ce=1.0, logit=2.0, vis=0.5, attn=2.0)
    after = faded(full, 0.75, 0.5)
    assert after == LossWeights(ce=1.0, logit=2.0, vis=0.0, attn=0.0) and after.enabled() == ("ce", "logit")
