"""The scale check of issue 25 in small (bench/manifest_scale.py runs it at LLaVA-665K's size):
planning under 2-rank torchrun splits the rows and keys them as one process does, keeping a
compact share; a --limit slice of a six-source OneVision-style mixture is cached with
per-source counts that match the sampling, no record lost and every reject explained."""

from __future__ import annotations


import pyarrow.compute as pc

from alignkd.data.mixture import MixedSource, source_specs
from bench.llava_mix import write_llava665k, write_onevision_mix
from bench.manifest_scale import build_slice, expected_sample, plan_under_torchrun


def test_two_ranks_plan_disjoint_halves_keyed_as_one_process_keys_them(tmp_path):
    data = tmp_path / "llava665k.json"
    counts = write_llava665k(data, 0.004)
    whole = MixedSource(source_specs(str(data), None)).share()
    renamed = int(pc.sum(pc.not_equal(whole.keys, whole.ids)).as_py())
    assert len(whole.rows) == sum(counts.values()) == 2662
    assert renamed > 600  # COCO's image ids repeat: every record kept under a key of its own
    assert len(set(whole.keys.to_pylist())) == len(whole.rows)
    ranks = plan_under_torchrun(data, tmp_path)
    assert [(r["rank"], r["first_row"], r["share"]) for r in ranks] == [(0, 0, 1331), (1, 1, 1331)]
    assert sum(r["renamed"] for r in ranks) == renamed
    for r in ranks:
        assert r["share_bytes"] / r["share"] < 48  # row, id and key: no Python object a row
        assert r["added_mb"] < 64, r


def test_a_slice_of_a_mixture_keeps_the_sampling_and_loses_no_record(tmp_path):
    mix, records = write_onevision_mix(tmp_path / "mix", 0.0001, images=True)
    result = build_slice(mix, 50, tmp_path)
    table = result["sources"]
    assert list(table) == ["sharegpt4v.jsonl", "ocr.parquet", "docs", "text.json", "odd.json",
                           "llava_v1_5_mix665k.json"]
    for name, s in table.items():
        assert s["sampled"] == expected_sample(s["sampling"], s["records"]), name
        assert s["kept"] + sum(s["rejects"].values()) == s["in_slice"], name
    assert [s["in_slice"] for s in table.values()] == [4, 3, 4, 12, 10, 17]  # --limit 50 cuts the last
    assert table["odd.json"]["rejects"] == {"missing_image": 1, "video_unsupported": 1}
    assert table["ocr.parquet"]["records"] == records["ocr"]
    assert table["llava_v1_5_mix665k.json"]["repeats"] >= 1  # repeated image ids kept, as ID#k
    assert result["unexplained_rejects"] == 0
