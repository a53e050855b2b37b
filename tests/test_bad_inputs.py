"""No traceback on any input: a table of bad invocations, each one sentence and exit 1.

Every row names the thing that is wrong; the test checks the exit code, that no
exception escaped the CLI (no traceback), and that the message names that thing.
The cases run in-process through click's runner against tiny real models.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from alignkd.cli import main
from tests.support.world import make_image, write_manifest

CONV = [{"from": "human", "value": "<image>\nwhat is the colour of this image ?"},
        {"from": "gpt", "value": "red"}]
GPUS = __import__("torch").cuda.device_count()
SYS_DIR = Path("/sys")  # not writable even by root: where "permission denied" comes from here


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llava_dir, tiny_student_dir):
    root = tmp_path_factory.mktemp("bad")
    images = root / "images"
    make_image(images / "a.png")
    data = write_manifest(root / "data.json", [{"id": "s0", "image": "a.png", "conversations": CONV}])
    write_manifest(root / "missing-image.json", [{"id": "b0", "image": "gone.png", "conversations": CONV}])
    (root / "empty-list.json").write_text("[]")
    (root / "blank.json").write_text("")
    (root / "fake.parquet").write_bytes(b"PAR1 this is not parquet")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"id": ["a"], "text": ["hello"]}), root / "noturns.parquet")
    (root / "object.json").write_text('{"records": 1}')
    (root / "file.txt").write_text("x")
    (root / "gpu64.json").write_text('{"": 64}')
    (root / "emptydir").mkdir()
    (root / "junkdir").mkdir()
    (root / "junkdir" / "notes.txt").write_text("mine")
    for name, damage in {"badweights": lambda d: (d / "model.safetensors").write_bytes(b"garbage"),
                         "badconfig": lambda d: (d / "config.json").write_text("{not json"),
                         "badtok": lambda d: (d / "tokenizer.json").write_text('{"model": '),
                         "noweights": lambda d: (d / "model.safetensors").unlink()}.items():
        shutil.copytree(tiny_llava_dir, root / name)
        damage(root / name)
    for out, manifest in (("cache", data), ("cache0", root / "missing-image.json")):
        result = invoke(["cache", "build", "--teacher", tiny_llava_dir, "--data", manifest, "--images", images,
                         "--out", root / out, "--no-progress"])
        assert result.exit_code == 0, result.output
    return {"root": root, "teacher": tiny_llava_dir, "student": tiny_student_dir, "data": data,
            "images": images}


def invoke(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def build_args(w, **kw):
    opts = {"teacher": w["teacher"], "data": w["data"], "images": w["images"], "out": w["root"] / "o", **kw}
    return ["cache", "build", *sum(([f"--{k}", v] for k, v in opts.items()), []), "--no-progress"]


def distill_args(w, **kw):
    opts = {"student": w["student"], "cache": w["root"] / "cache", "out": w["root"] / "run", "max-steps": 1, **kw}
    return ["distill", *sum(([f"--{k}", v] for k, v in opts.items()), []), "--no-progress"]


def eval_args(w, **kw):
    opts = {"model": w["student"], "data": w["data"], "images": w["images"], **kw}
    return ["eval", *sum(([f"--{k}", v] for k, v in opts.items()), []), "--no-progress"]


# name -> (arguments from the fixture's world, the text the message must contain)
CASES = {
    "build: teacher dir missing": (lambda w, r: build_args(w, teacher=r / "nope"), "{root}/nope"),
    "build: teacher is a file": (lambda w, r: build_args(w, teacher=r / "file.txt"), "file.txt is not a directory"),
    "build: teacher dir empty": (lambda w, r: build_args(w, teacher=r / "emptydir"), "has no config.json"),
    "build: teacher without weights": (lambda w, r: build_args(w, teacher=r / "noweights"), "no .safetensors"),
    "build: teacher weights corrupt": (lambda w, r: build_args(w, teacher=r / "badweights"), "badweights: the weights"),
    "build: teacher config corrupt": (lambda w, r: build_args(w, teacher=r / "badconfig"), "badconfig: the config.json"),
    "build: teacher tokenizer corrupt": (lambda w, r: build_args(w, teacher=r / "badtok", out=r / "o-tok"),
                                         "{root}/badtok"),
    "build: manifest missing": (lambda w, r: build_args(w, data=r / "nope.json"), "nope.json does not exist"),
    "build: data dir without parquet": (lambda w, r: build_args(w, data=r / "emptydir"),
                                        "emptydir holds no .parquet files"),
    "build: parquet not parquet": (lambda w, r: build_args(w, data=r / "fake.parquet"),
                                   "fake.parquet is not a readable Parquet file"),
    "build: parquet without turns": (lambda w, r: build_args(w, data=r / "noturns.parquet"),
                                     "noturns.parquet needs exactly one of the columns conversations, messages"),
    "build: manifest blank": (lambda w, r: build_args(w, data=r / "blank.json"), "blank.json is empty"),
    "build: manifest not JSON": (lambda w, r: build_args(w, data=r / "file.txt"), "file.txt line 1"),
    "build: manifest an object": (lambda w, r: build_args(w, data=r / "object.json"), "object.json holds a JSON object"),
    "build: manifest empty list": (lambda w, r: build_args(w, data=r / "empty-list.json", out=r / "o-empty"),
                                   "empty-list.json holds no records"),
    "build: images missing": (lambda w, r: build_args(w, images=r / "nope"), "{root}/nope does not exist"),
    "build: images is a file": (lambda w, r: build_args(w, images=r / "file.txt"), "file.txt is not a directory"),
    "build: out is a file": (lambda w, r: build_args(w, out=r / "file.txt"), "file.txt is an existing file"),
    "build: out under a file": (lambda w, r: build_args(w, out=r / "file.txt" / "c"), "file.txt is an existing file"),
    "build: out not a cache": (lambda w, r: build_args(w, out=r / "junkdir"), "junkdir exists and is not an alignkd"),
    "build: out not writable": (lambda w, r: build_args(w, out=SYS_DIR / "alignkd-c"), "/sys/alignkd-c"),
    "build: batch size 0": (lambda w, r: build_args(w, **{"batch-size": 0}), "--batch-size"),
    "build: limit 0": (lambda w, r: build_args(w, limit=0), "--limit"),
    "build: batch size negative": (lambda w, r: build_args(w, **{"batch-size": -1}), "--batch-size must be at least 1"),
    "build: batch size not an integer": (lambda w, r: build_args(w, **{"batch-size": "1e23"}),
                                         "Invalid value for '--batch-size': '1e23' is not a valid integer; see `"),
    "build: batch size beyond int32": (lambda w, r: build_args(w, **{"batch-size": 10**23}),
                                       "--batch-size 100000000000000000000000 is more than 2,147,483,647"),
    "build: shard size 0": (lambda w, r: build_args(w, **{"shard-size": 0}), "--shard-size must be at least 1"),
    "build: max length 0": (lambda w, r: build_args(w, **{"max-length": 0}), "--max-length must be at least 1"),
    "build: device banana": (lambda w, r: build_args(w, device="banana"), "--device 'banana' is not a device"),
    "build: device past the GPUs": (lambda w, r: build_args(w, device=f"cuda:{GPUS + 7}"),
                                    f"--device cuda:{GPUS + 7}: this machine has "),
    "build: device cuda:0 without a GPU": (lambda w, r: build_args(w, device="cuda:0" if not GPUS else "cuda:99"),
                                           "this machine has "),
    "build: timeout 0": (lambda w, r: build_args(w, timeout=0), "--timeout must be a positive number of minutes"),
    "build: offload folder not writable": (lambda w, r: build_args(w, **{"device-map": "auto",
                                                                        "offload-folder": SYS_DIR / "alignkd-off"}),
                                           "--offload-folder /sys/alignkd-off cannot be created or written"),
    "build: max memory in bits": (lambda w, r: build_args(w, **{"device-map": "auto", "max-memory": "0=70gb"}),
                                  "'70gb' ends in a lowercase b, which accelerate may read as bits; write 70GB "
                                  "or 70GiB"),
    "build: attn topk negative": (lambda w, r: build_args(w, **{"attn-topk": -1}), "--attn-topk must be 0"),
    "build: attn topk on packed attention": (lambda w, r: build_args(w, **{"attn-topk": 4, "attn-dtype": "uint4-log"}),
                                             "--attn-dtype uint4-log packs two per byte"),
    "build: other options on resume": (lambda w, r: build_args(w, out=r / "cache", **{"logit-k": 3}), "--logit-k"),
    "build: device map not a strategy or file": (lambda w, r: build_args(w, **{"device-map": "fastest"}),
                                                 "'fastest' is neither"),
    "build: device map file not JSON": (lambda w, r: build_args(w, **{"device-map": r / "file.txt"}),
                                        "file.txt: the file is not readable JSON"),
    "build: device map on a GPU not here": (lambda w, r: build_args(w, **{"device-map": r / "gpu64.json"}),
                                            "--device-map names GPU 64, but this machine has"),
    "build: device map with --device": (lambda w, r: build_args(w, **{"device-map": "auto", "device": "cuda"}),
                                        "--device cuda and --device-map auto both say where the teacher goes"),
    "build: max memory malformed": (lambda w, r: build_args(w, **{"device-map": "auto", "max-memory": "0:70GiB"}),
                                    "each entry must read DEVICE=SIZE"),
    "build: max memory bad size": (lambda w, r: build_args(w, **{"device-map": "auto", "max-memory": "cpu=lots"}),
                                   "'lots' is not a size"),
    "build: max memory bad device": (lambda w, r: build_args(w, **{"device-map": "auto", "max-memory": "gpu0=1GB"}),
                                     "'gpu0' is not a device"),
    "build: max memory without device map": (lambda w, r: build_args(w, **{"max-memory": "cpu=1GB"}),
                                             "--max-memory only applies with --device-map"),
    "stats: missing": (lambda w, r: ["cache", "stats", r / "nope"], "{root}/nope is not an alignkd cache"),
    "stats: a file": (lambda w, r: ["cache", "stats", r / "file.txt"], "file.txt/cache.json cannot be read"),
    "stats: empty dir": (lambda w, r: ["cache", "stats", r / "emptydir"], "emptydir is not an alignkd cache"),
    "sql: not a cache": (lambda w, r: ["cache", "sql", r / "emptydir", "SELECT 1"], "emptydir is not an alignkd"),
    "sql: bad column": (lambda w, r: ["cache", "sql", r / "cache", "SELECT nope FROM samples"], '"nope" not found'),
    "verify: missing": (lambda w, r: ["cache", "verify", r / "nope"], "{root}/nope is not an alignkd cache"),
    "show: unknown sample": (lambda w, r: ["cache", "show", r / "cache", "zzz", "--out", r / "x.png"], "'zzz'"),
    "show: out not writable": (lambda w, r: ["cache", "show", r / "cache", "s0", "--out", SYS_DIR / "x.png"],
                               "/sys/x.png"),
    "distill: student missing": (lambda w, r: distill_args(w, student=r / "nope"), "{root}/nope does not exist"),
    "distill: student weights corrupt": (lambda w, r: distill_args(w, student=r / "badweights"),
                                         "badweights: the weights"),
    "distill: cache missing": (lambda w, r: distill_args(w, cache=r / "nope"), "cache {root}/nope does not exist"),
    "distill: cache is a file": (lambda w, r: distill_args(w, cache=r / "file.txt"), "file.txt is not a directory"),
    "distill: cache not a cache": (lambda w, r: distill_args(w, cache=r / "emptydir"), "emptydir is not an alignkd"),
    "distill: cache with 0 samples": (lambda w, r: distill_args(w, cache=r / "cache0"), "cache0 holds no samples"),
    "distill: out is a file": (lambda w, r: distill_args(w, out=r / "file.txt"), "file.txt is an existing file"),
    "distill: out not writable": (lambda w, r: distill_args(w, out=SYS_DIR / "alignkd-run"), "/sys/alignkd-run"),
    "distill: resume without checkpoint": (lambda w, r: distill_args(w, out=r / "fresh") + ["--resume"],
                                           "no complete checkpoint found under {root}/fresh"),
    "distill: negative lr": (lambda w, r: distill_args(w, lr=-1), "--lr"),
    "distill: fsdp in one process": (lambda w, r: distill_args(w, fsdp="full_shard auto_wrap"),
                                     "run distill under torchrun"),
    "distill: fsdp unknown word": (lambda w, r: distill_args(w, fsdp="full_shard turbo"), "'turbo' is not one of"),
    "distill: fsdp1 strategy": (lambda w, r: distill_args(w, fsdp="hybrid_shard"), "hybrid_shard is an FSDP1"),
    "distill: wrap class without fsdp": (lambda w, r: distill_args(w, **{"fsdp-wrap-class": "LlamaDecoderLayer"}),
                                         "--fsdp-wrap-class only applies with --fsdp"),
    "eval: model missing": (lambda w, r: eval_args(w, model=r / "nope"), "{root}/nope does not exist"),
    "eval: tokenizer corrupt": (lambda w, r: eval_args(w, model=r / "badtok"), "{root}/badtok"),
    "eval: manifest missing": (lambda w, r: eval_args(w, data=r / "nope.json"), "nope.json does not exist"),
    "eval: manifest empty list": (lambda w, r: eval_args(w, data=r / "empty-list.json"), "holds no records"),
    "demo: teacher missing": (lambda w, r: ["demo", "--quick", "--teacher", r / "nope", "--out", r / "demo"],
                              "{root}/nope does not exist"),
}


def test_table_is_big_enough():
    assert len(CASES) >= 25


@pytest.mark.parametrize("name", list(CASES))
def test_bad_invocation_is_one_sentence(world, name):
    make_args, named = CASES[name]
    root = world["root"]
    result = invoke(make_args(world, root))
    assert isinstance(result.exception, SystemExit), f"{name} escaped: {result.exception!r}"
    assert result.exit_code != 0
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert "Traceback" not in result.output, result.output
    if name.startswith("verify"):  # verify lists problems, then a count line
        lines = lines[:-1]
        assert result.output.splitlines()[-1].startswith("1 problem(s) found")
    else:
        assert lines[0].startswith("error: ")
    assert len(lines) == 1 and lines[0].rstrip().endswith("."), result.output
    assert named.format(root=root) in lines[0], lines[0]


def test_no_progress_hides_transformers_bars(world):
    root = world["root"]
    result = invoke(build_args(world, out=root / "quiet"))
    assert result.exit_code == 0, result.output
    assert "Loading weights" not in result.output and "it/s" not in result.output
    assert result.output.startswith("cached 1 samples")


def test_all_rejected_build_says_so_without_a_size(world):
    root = world["root"]
    result = invoke(build_args(world, data=root / "missing-image.json", out=root / "rejected"))
    assert result.exit_code == 0, result.output
    assert "cached 0 samples" in result.output and "1 missing_image" in result.output
    assert "holds no samples" in result.output and "kB/sample" not in result.output
