"""`cache sql` and `cache show` on an s3:// cache (the moto server of test_s3): the SQL
sandbox holds on object storage too (one SELECT over the cache's own tables; no local
file, no other object, no SET), and `show` draws a sample straight from the bucket."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignkd.cache.catalog import SQLRefusedError, run_sql
from alignkd.cache.writer import CacheWriter
from test_cache_build import cli, make_dataset
from test_cache_storage import META, make_record


def bucket_digest(fs) -> dict:
    """Every object's size and ETag (the MD5 of its bytes), from one listing."""
    return {k: (v["size"], v.get("ETag")) for k, v in fs.find("alignkd-test", detail=True).items()}


@pytest.fixture(scope="module")
def remote(s3, tmp_path_factory):
    root = tmp_path_factory.mktemp("s3-sandbox")
    url = s3["url"]("sandbox")
    with CacheWriter(url, META, shard_size=2) as w:
        for i in range(5):
            w.add(make_record(i))
        w.reject("bad7", 7, "too_long", "x")
    pq.write_table(pa.table({"secret": ["leaked"]}), root / "outside.parquet")
    with s3["fs"].open("alignkd-test/outside.parquet", "wb") as f:
        pq.write_table(pa.table({"secret": ["leaked"]}), f)
    s3["fs"].pipe_file("alignkd-test/sandbox/secret.txt", b"leaked\n")
    return url, root, s3["fs"]


REFUSED = [
    ("SELECT * FROM read_csv('/etc/passwd')", "/etc/passwd"),
    ("SELECT * FROM glob('/etc/*')", "/etc/*"),
    ("SELECT * FROM read_parquet('{root}/outside.parquet')", "{root}/outside.parquet"),
    ("SELECT * FROM read_parquet('s3://alignkd-test/outside.parquet')", "s3://alignkd-test/outside.parquet"),
    ("SELECT * FROM read_parquet('{url}/shards/../../outside.parquet')", "outside.parquet"),
    ("SELECT * FROM read_csv('{url}/secret.txt')", "{url}/secret.txt"),
    ("SELECT * FROM read_text('{url}/cache.json')", "{url}/cache.json"),
    ("SELECT * FROM glob('s3://alignkd-test/*')", "s3://alignkd-test/*"),
    ("SET enable_external_access = true", "SET"),
    ("SET allowed_directories = ['s3://']", "SET"),
]


@pytest.mark.parametrize("template,named", REFUSED, ids=[q for q, _ in REFUSED])
def test_sql_sandbox_on_s3(remote, template, named):
    url, root, fs = remote
    query, named = template.format(url=url, root=root), named.format(url=url, root=root)
    before = bucket_digest(fs)
    with pytest.raises(SQLRefusedError) as err:
        run_sql(url, query)
    message = str(err.value)
    assert named in message and "leaked" not in message and "\n" not in message
    result = cli("cache", "sql", url, query)
    assert result.exit_code == 1 and result.output.strip() == f"error: {message}"
    assert bucket_digest(fs) == before


def test_sql_on_s3_still_answers(remote):
    url, _, _ = remote
    assert run_sql(url, "SELECT count(*) AS n FROM samples").to_pylist() == [{"n": 5}]
    assert run_sql(url, "SELECT sample_id, reason FROM rejects").to_pylist() == [
        {"sample_id": "bad7", "reason": "too_long"}]
    joined = run_sql(url, "SELECT count(*) AS n FROM samples s JOIN shards h "
                          "ON s.manifest_row BETWEEN h.min_manifest_row AND h.max_manifest_row")
    assert joined.to_pylist() == [{"n": 5}]
    result = cli("cache", "sql", url, "SELECT sample_id FROM samples ORDER BY sample_id", "--format", "csv")
    assert result.exit_code == 0 and result.output.split()[1:] == [f'"s00{i}"' for i in range(5)]


def test_show_on_s3_draws_the_same_picture_as_local(s3, tmp_path, tiny_llava_dir):
    from PIL import Image

    from alignkd.cache.reader import open_cache
    from alignkd.cache.inspection.show import _token_labels

    data, images = make_dataset(tmp_path, 2)
    url = s3["url"]("show")
    teacher = shutil.copytree(tiny_llava_dir, tmp_path / "teacher")
    for out in (url, tmp_path / "local"):
        result = cli("cache", "build", "--teacher", teacher, "--data", data, "--images", images,
                     "--out", out, "--no-progress")
        assert result.exit_code == 0, result.output
    shutil.rmtree(teacher)  # the teacher is gone: show needs only the cache
    sample_id = open_cache(url).sample_ids[0]
    shown = cli("cache", "show", url, sample_id, "--out", tmp_path / "remote.png")
    assert shown.exit_code == 0 and shown.output.strip() == f"wrote {tmp_path / 'remote.png'}", shown.output
    assert cli("cache", "show", tmp_path / "local", sample_id, "--out", tmp_path / "local.png").exit_code == 0
    with Image.open(tmp_path / "remote.png") as img:
        assert img.format == "PNG" and img.width > 300
    assert (tmp_path / "remote.png").read_bytes() == (tmp_path / "local.png").read_bytes()
    # token strings come from the tokenizer kept in the bucket, not "id N" and not the network
    labels = _token_labels(open_cache(url), [5, 6])
    assert labels == _token_labels(open_cache(tmp_path / "local"), [5, 6]) and not labels[0].startswith("id ")
    missing = cli("cache", "show", url, "nope", "--out", tmp_path / "x.png")
    assert missing.exit_code == 1 and missing.output.strip() == f"error: sample 'nope' is not in cache {url}."
