"""`cache build --skip attn|vision`: a cache without a teacher target, its bytes, and distill on it.

One tiny teacher, six records, three caches (full, --skip vision, --skip attn) with the default
storage. The skipped target's arrays hold nothing (the other arrays are byte for byte the full
cache's), cache.json says what was left out, verify/stats/show/sql/open_cache work, distill runs
with the term off (no loss_vis in its logs, said in the summary line) and refuses the term asked for.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from alignkd.cache.teacher.build import BuildConfig, build_cache
from alignkd.cache.reader import open_cache
from alignkd.cache.inspection.stats import cache_stats
from alignkd.cache.verify import verify_cache
from alignkd.cli import main
from alignkd.distill.run import DistillConfig, distill
from alignkd.errors import ConfigError
from alignkd.storage_schemas import ABSENT, SHARDS_DIR
from alignkd.storage_schemas.kinds import kinds_of
from conftest import make_image, write_manifest

SKIPS = {"full": (), "novision": ("vision",), "noattn": ("attn",)}


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_llava_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("skip")
    records = []
    for i, answer in enumerate(["red", "blue circle", "yes", "no", "green square", "3"]):
        make_image(root / "images" / f"img{i}.png", seed=i)
        records.append({"id": f"s{i}", "image": f"img{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat is the colour of this image ?"},
            {"from": "gpt", "value": answer}]})
    data = write_manifest(root / "data.json", records)
    out = {}
    for name, skip in SKIPS.items():
        out[name] = root / name
        build_cache(BuildConfig(teacher=str(tiny_llava_dir), data=str(data), images=str(root / "images"),
                                out=str(out[name]), batch_size=3, shard_size=4, skip=skip, progress=False))
    return out


def _array_bytes(cache: Path, kind: str) -> bytes:
    return b"".join((shard / kind / "c" / "0").read_bytes() for shard in sorted((cache / SHARDS_DIR).iterdir())
                    if (shard / kind / "c" / "0").exists())


@pytest.mark.parametrize("name", ["novision", "noattn"])
def test_skipped_target_stores_nothing_and_the_rest_is_unchanged(caches, name):
    (target,) = SKIPS[name]
    doc = json.loads((caches[name] / "cache.json").read_text())
    assert doc["storage"]["skip"] == [target] and doc["build_options"]["skip"] == [target]
    for shard in sorted((caches[name] / SHARDS_DIR).iterdir()):
        arrays = json.loads((shard / "shard.json").read_text())["arrays"]
        assert {k: arrays[k]["encoding"] for k in kinds_of(target)} == {k: ABSENT for k in kinds_of(target)}
        assert all(arrays[k]["length"] == 0 for k in kinds_of(target))
    assert _array_bytes(caches["full"], target) and not _array_bytes(caches[name], target)
    for kind in ("focus", "logit_ids", "logit_values", *kinds_of("attn" if target == "vision" else "vision")):
        assert _array_bytes(caches[name], kind) == _array_bytes(caches["full"], kind), kind
    full, skipped = cache_stats(caches["full"]), cache_stats(caches[name])
    assert skipped["bytes_per_sample"] < full["bytes_per_sample"]
    assert skipped["bytes_raw"][target] == 0 and skipped["skipped"] == (target,)
    assert verify_cache(str(caches[name])) == []


def test_reader_returns_none_for_a_skipped_target(caches):
    full, novision, noattn = (open_cache(caches[n]) for n in ("full", "novision", "noattn"))
    assert novision.skipped == ("vision",) and full.skipped == ()
    for i in range(len(full)):
        a, v, t = full[i], novision[i], noattn[i]
        assert v.vision is None and v.attn.shape == a.attn.shape and (v.focus == a.focus).all()
        assert t.attn is None and t.vision.shape == a.vision.shape
        assert novision.get(i, widen=False).vision is None and noattn.get(i, widen=False).attn is None


def test_stats_sql_and_show_work_on_a_skip_cache(caches, tmp_path):
    runner = CliRunner()
    for name in ("novision", "noattn"):
        result = runner.invoke(main, ["cache", "stats", str(caches[name])])
        assert result.exit_code == 0 and "not stored (--skip)" in result.output, result.output
        result = runner.invoke(main, ["cache", "sql", str(caches[name]), "SELECT count(*) AS n FROM samples"])
        assert result.exit_code == 0 and "6" in result.output, result.output
        assert runner.invoke(main, ["cache", "verify", str(caches[name])]).exit_code == 0
    result = runner.invoke(main, ["cache", "show", str(caches["noattn"]), "s0", "--out", str(tmp_path / "s0.png")])
    assert result.exit_code == 0, result.output


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name,term,option", [("novision", "vis", "--w-vis"), ("noattn", "attn", "--w-attn")])
def test_distill_turns_the_term_off_and_says_so(caches, tiny_student_dir, tmp_path, name, term, option):
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["distill", "--student", str(tiny_student_dir), "--cache", str(caches[name]),
                                       "--out", str(run), "--max-steps", "2", "--batch-size", "3",
                                       "--logging-steps", "1", "--workers", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith("distilled 2 steps")]
    target = SKIPS[name][0]
    assert line.endswith(f"; {term} term off: the cache holds no "
                         f"{'vision tokens' if target == 'vision' else 'attention rows'} (--skip {target})")
    logged = {k for r in _metrics(run) for k in r if k.startswith("loss_")}
    assert f"loss_{term}" not in logged and "loss_logit" in logged
    other = "attn" if term == "vis" else "vis"
    assert f"loss_{other}" in logged  # the target the cache has still trains
    # asked for by name, or by a preset that needs it: one sentence naming the cache and the option
    refused = CliRunner().invoke(main, ["distill", "--student", str(tiny_student_dir), "--cache", str(caches[name]),
                                        "--out", str(tmp_path / "refused"), option, "0.5", "--no-progress"])
    assert refused.exit_code == 1
    assert refused.output.strip() == (
        f"error: cache {caches[name]} was built with --skip {target} and holds no "
        f"{'vision tokens' if target == 'vision' else 'attention rows'}, which {option} 0.5 needs; "
        f"set {option} 0 or rebuild the cache without --skip {target}.")
    preset = "logits+vision" if term == "vis" else "logits+attention"
    with pytest.raises(ConfigError, match=re.escape(f"which --preset {preset} needs")):
        distill(DistillConfig(student=str(tiny_student_dir), cache=str(caches[name]), out=str(tmp_path / "p"),
                              preset=preset, max_steps=1, progress=False))
    assert not (tmp_path / "refused").exists() and not (tmp_path / "p").exists()


def test_skip_vision_with_layer0_and_unknown_targets_are_refused(tiny_llava_dir, tmp_path):
    base = dict(teacher=str(tiny_llava_dir), data=str(tmp_path / "d.json"), images=None, out=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match=r"^--attn-store layer0 recomputes the attention rows from the stored "
                                          r"vision tokens, so --skip vision cannot go with it"):
        BuildConfig(**base, attn_store="layer0", skip=("vision",))
    with pytest.raises(ConfigError, match="--skip attn stores no attention, so --attn-topk has nothing to do"):
        BuildConfig(**base, attn_topk=4, skip=("attn",))
    with pytest.raises(ConfigError, match="--skip logits: only attn and vision may be left out"):
        BuildConfig(**base, skip=("logits",))
    result = CliRunner().invoke(main, ["cache", "build", "--teacher", str(tiny_llava_dir), "--data", base["data"],
                                       "--out", base["out"], "--attn-store", "layer0", "--skip", "vision"])
    assert result.exit_code == 1 and result.output.startswith("error: --attn-store layer0 recomputes")
    assert not Path(base["out"]).exists()


def test_resuming_with_another_skip_is_refused(caches, tiny_llava_dir):
    """A resume that would store the target in some shards and not in others names the option."""
    doc = json.loads((caches["novision"] / "cache.json").read_text())
    with pytest.raises(ConfigError, match=r"stores --skip=\['vision'\] but this run asks for \[\]"):
        build_cache(BuildConfig(teacher=str(tiny_llava_dir), data=doc["manifest"],
                                images=str(caches["novision"].parent / "images"), out=str(caches["novision"]),
                                batch_size=3, shard_size=4, progress=False))
    assert json.loads((caches["novision"] / "cache.json").read_text()) == doc
