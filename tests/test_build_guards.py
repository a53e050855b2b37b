"""`cache build` on inputs that used to stop it or mislead it (issue 23), one process, tiny real models:

- an image the processor refuses (Qwen-VL: aspect ratio over 200) is a `bad_image` reject
  naming the sample with the processor's words, and the build, and its resume, go on;
- a ValueError from the processor that no single image explains keeps its traceback;
- `--max-memory` sizes are bytes in, bytes out: a lowercase b (bits, to accelerate) is
  refused, and the placement is printed even when the whole teacher lands on one device.
"""

from __future__ import annotations

import duckdb
import pytest
from click.testing import CliRunner
from PIL import Image

from alignkd.cli import main
from alignkd.data import LoadedImage
from alignkd.data.images import image_refusals_as_rejects
from tests.support.world import make_image, write_manifest
from families_tiny import build_family

CONV = [{"from": "human", "value": "<image>\nwhat is the colour of this image ?"}, {"from": "gpt", "value": "red"}]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def rejects(cache) -> list[tuple]:
    with duckdb.connect() as con:
        return con.sql(f"SELECT sample_id, manifest_row, reason, message FROM read_parquet("
                       f"'{cache}/shards/*/rejects.parquet') ORDER BY manifest_row").fetchall()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_image_the_processor_refuses_is_a_reject_and_the_build_goes_on(tmp_path, family):
    teacher = build_family(family, tmp_path / "teacher")
    images = tmp_path / "images"
    make_image(images / "ok.png")
    Image.new("RGB", (2000, 4)).save(images / "thin.png")  # aspect ratio 500: Qwen's smart_resize refuses it
    data = write_manifest(tmp_path / "data.json", [{"id": "ok", "image": "ok.png", "conversations": CONV},
                                                   {"id": "thin", "image": "thin.png", "conversations": CONV},
                                                   {"id": "ok2", "image": "ok.png", "conversations": CONV}])
    args = ["cache", "build", "--teacher", teacher, "--data", data, "--images", images, "--out", tmp_path / "c",
            "--batch-size", "3", "--shard-size", "1", "--no-progress"]
    first = cli(*args)
    assert first.exit_code == 0, first.output
    assert first.output.startswith("cached 2 samples (0 rows already done), rejects: 1 bad_image;"), first.output
    [(sample, row, reason, message)] = rejects(tmp_path / "c")
    assert (sample, row, reason) == ("thin", 1, "bad_image")
    assert message.startswith("Sample 'thin' (manifest row 1) has image 'thin.png' that the processor refuses (")
    assert "aspect ratio" in message, message  # the processor's own words
    again = cli(*args)  # the resume skips the reject instead of dying on it again
    assert again.exit_code == 0, again.output
    assert again.output.startswith("cached 0 samples (3 rows already done), rejects: none;"), again.output


def test_processor_errors_not_about_one_image_keep_their_traceback(tmp_path):
    teacher = build_family("qwen2_vl", tmp_path / "teacher")
    from alignkd.models.processors import load_processor

    processor = load_processor(teacher, "qwen2_vl")
    make_image(tmp_path / "ok.png")
    good = LoadedImage(Image.open(tmp_path / "ok.png").convert("RGB"), b"", "", "ok.png")
    with pytest.raises(ValueError, match="a bug of ours"):
        with image_refusals_as_rejects(processor, [good], "s", 0):
            raise ValueError("a bug of ours")


@pytest.fixture(scope="module")
def small(tmp_path_factory, tiny_llava_dir):
    root = tmp_path_factory.mktemp("placement")
    make_image(root / "images" / "a.png")
    data = write_manifest(root / "data.json", [{"id": "s0", "image": "a.png", "conversations": CONV}])
    return ["cache", "build", "--teacher", tiny_llava_dir, "--data", data, "--images", root / "images",
            "--no-progress", "--device-map", "auto"], root


def test_placement_is_printed_when_the_whole_teacher_fits_one_device(small):
    args, root = small
    result = cli(*args, "--out", root / "whole")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "teacher placed by --device-map: the whole teacher on cpu"


@pytest.mark.parametrize("size", ["1mb", "70gb", "70Gb", "300kb"])
def test_max_memory_in_bits_is_refused(small, size):
    args, root = small
    result = cli(*args, "--out", root / "bits", "--max-memory", f"cpu={size}")
    assert result.exit_code == 1 and "Traceback" not in result.output
    prefix = size[:-1].rstrip("bBgGmMkK") + size[-2].upper()
    assert result.output == (f"error: --max-memory 'cpu={size}': {size!r} ends in a lowercase b, which accelerate "
                             f"may read as bits; write {prefix}B or {prefix}iB instead.\n")
    assert not (root / "bits").exists()



@pytest.mark.parametrize("field, value, words", [
    ("batch_size", 1e23, "--batch-size must be a whole number, not 1e+23."),
    ("batch_size", 10**23, "--batch-size 100000000000000000000000 is more than 2,147,483,647."),
    ("batch_size", -1, "--batch-size must be at least 1."),
    ("shard_size", 0, "--shard-size must be at least 1."),
    ("max_length", 0, "--max-length must be at least 1."),
    ("device", "banana", "--device 'banana' is not a device; use cpu, cuda or cuda:N."),
    ("device", "cuda:99", "--device cuda:99: this machine has "),
    ("timeout", float("nan"), "--timeout must be a positive number of minutes, not nan."),
])
def test_build_config_refuses_what_the_cli_refuses(small, field, value, words):
    """The library says the same sentence as the CLI, before any teacher loads."""
    from alignkd.cache.teacher.build import BuildConfig
    from alignkd.errors import ConfigError

    args, root = small
    opts = dict(zip(args[2:8:2], args[3:8:2]))
    with pytest.raises(ConfigError) as err:
        BuildConfig(teacher=str(opts["--teacher"]), data=str(opts["--data"]), images=str(opts["--images"]),
                    out=str(root / "lib"), **{field: value})
    assert str(err.value).startswith(words), err.value
