"""Data as it is published (issue 25): Hugging Face dataset layouts and ids, extra columns,
path-only image structs, damaged pages, and streamed JSON whose memory does not grow with the file."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignkd.data import open_source, read_manifest
from alignkd.data.errors import ManifestError, SampleError
from alignkd.data.images import load_image
from alignkd.errors import AlignKDError
from tests.support.world import make_image

TURNS = [{"from": "human", "value": "<image>\nwhat is the colour of this image ?"}, {"from": "gpt", "value": "red"}]


def _table(ids, image=None, **extra):
    cols = {"id": ids, "conversations": [TURNS] * len(ids), **extra}
    if image is not None:
        cols["image"] = image
    return pa.table(cols)


def _repo(root):
    """A dataset repository as `hf download --repo-type dataset` lays one out."""
    (root / "data").mkdir(parents=True)
    pq.write_table(_table(["a", "b"], data_source=["x", "y"]), root / "data" / "train-00000-of-00002.parquet")
    pq.write_table(_table(["c"], data_source=["z"]), root / "data" / "train-00001-of-00002.parquet")
    pq.write_table(_table(["v"], data_source=["z"]), root / "data" / "validation-00000-of-00001.parquet")
    (root / "README.md").write_text("---\nconfigs: []\n---\n")
    return root


def test_a_dataset_repository_is_searched_and_its_extra_columns_are_named(tmp_path):
    source = open_source(_repo(tmp_path / "repo"))
    assert [r.sample_id for r in source.index()] == ["a", "b", "c", "v"]
    assert source.ignored_columns == ["data_source"]


def test_a_dataset_id_resolves_in_the_local_hub_cache_with_config_and_split(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap = cache / "datasets--org--mix" / "snapshots" / ("0" * 40)
    _repo(snap / "cfg")
    (cache / "datasets--org--mix" / "refs").mkdir(parents=True)
    (cache / "datasets--org--mix" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert [r.sample_id for r in open_source("org/mix:cfg").index()] == ["a", "b", "c", "v"]
    assert [r.sample_id for r in open_source("org/mix:cfg/train").index()] == ["a", "b", "c"]
    assert [r.sample_id for r in open_source(f"org/mix@{'0' * 40}:cfg/validation").index()] == ["v"]
    with pytest.raises(AlignKDError, match="org/other is neither a file nor a dataset in the local"):
        open_source("org/other")
    with pytest.raises(ManifestError, match="no config folder 'nope'"):
        open_source("org/mix:nope")


def test_several_configs_must_be_chosen_between(tmp_path):
    _repo(tmp_path / "repo" / "one")
    _repo(tmp_path / "repo" / "two")
    with pytest.raises(ManifestError, match=r"several configs \(one, two\); name one"):
        open_source(tmp_path / "repo")


def test_a_path_only_image_without_images_root_is_that_rows_reject(tmp_path):
    image = pa.array([{"bytes": None, "path": "img1.png"}],
                     pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(_table(["a"], image=image), tmp_path / "d.parquet")
    (record,) = open_source(tmp_path / "d.parquet").records()
    with pytest.raises(SampleError) as err:
        load_image(None, record.images[0], record.sample_id, record.row)
    assert err.value.reason == "missing_image" and "no --images directory" in str(err.value)
    make_image(tmp_path / "images" / "img1.png")
    assert load_image(tmp_path / "images", record.images[0], "a", 0).name == "img1.png"


def test_a_damaged_data_page_names_file_and_row_group(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(_table([f"id{i}" for i in range(64)]), path, row_group_size=32, compression="none")
    chunk = pq.ParquetFile(path).metadata.row_group(1).column(1)  # the second row group's turns
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data = bytearray(path.read_bytes())
    data[start:start + chunk.total_compressed_size] = b"\x15" * chunk.total_compressed_size  # its page headers too
    path.write_bytes(bytes(data))
    source = open_source(path)
    with pytest.raises(ManifestError, match=r"d\.parquet row group 1 cannot be read \(.+\); the file is damaged"):
        list(source.records())


def test_a_directory_named_as_an_image_and_undecodable_bytes_say_what_they_are(tmp_path):
    (tmp_path / "images" / "dir.png").mkdir(parents=True)
    (tmp_path / "images" / "bad.png").write_bytes(b"not an image")
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"id": "d", "image": "dir.png", "conversations": TURNS},
                                {"id": "b", "image": "bad.png", "conversations": TURNS}]))
    d, b = read_manifest(data)
    with pytest.raises(SampleError, match="is a directory, not an image file"):
        load_image(tmp_path / "images", d.images[0], d.sample_id, d.row)
    with pytest.raises(SampleError) as err:
        load_image(tmp_path / "images", b.images[0], b.sample_id, b.row)
    assert "BytesIO" not in str(err.value) and "'bad.png'" in str(err.value)


MEMORY_PROBE = """
import resource, sys
from alignkd.data import open_source
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rows = sum(1 for _ in open_source(sys.argv[1]).records())
print(rows, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)
"""


@pytest.mark.parametrize("jsonl", [False, True])
def test_streaming_a_manifest_costs_the_same_memory_at_ten_times_the_size(tmp_path, jsonl):
    """Reading every record of a 40 MB manifest peaks no higher than a 4 MB one (+8 MB of slack):
    a whole-file parse would cost ~10x the file."""
    long_answer = " ".join(["red"] * 400)
    rec = {"id": "x", "image": "a.png", "conversations": [TURNS[0], {"from": "gpt", "value": long_answer}]}
    peaks = []
    for n in (2_000, 20_000):
        path = tmp_path / f"m{n}.{'jsonl' if jsonl else 'json'}"
        with path.open("w") as f:
            lines = (json.dumps({**rec, "id": f"r{i}"}) for i in range(n))
            f.write("\n".join(lines) + "\n" if jsonl else "[\n" + ",\n".join(lines) + "\n]\n")
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path)], capture_output=True, text=True, check=True)
        rows, grew_kb = map(int, out.stdout.split())
        assert rows == n
        peaks.append(grew_kb)
    assert peaks[1] <= peaks[0] + 8 * 1024, peaks
