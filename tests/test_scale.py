"""Scaling out (issue 18, docs/scale.md), on CPU with tiny real models:

1. a teacher dispatched by accelerate's device map, with layers on "cpu" and on "disk",
   caches what the undispatched teacher caches, and its layer-0 rows are layer 0's;
2. `distill --fsdp` wiring, and a real FSDP2 run through the Trainer over gloo (see
   tests/fsdp_on_cpu.py for the one accelerate decision the launcher changes);
3. two nodes simulated with two torchrun launches (`--nnodes 2 --node-rank 0/1`, one
   process per node, a device-mapped teacher on each): `cache build` to S3 (moto) with
   node 1 killed mid-build, the rerun equal to a one-process build, then an FSDP distill
   across both nodes equal to a one-process run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from alignkd.cache.reader import open_cache
from alignkd.data import collate, read_manifest, render_sample
from alignkd.errors import ConfigError
from alignkd.models import load_vlm
from alignkd.models.placement import Placement, input_device
from tests.support.world import make_image, write_manifest
from test_cache_build import FP16_RTOL, cli, make_dataset
from test_distributed import _free_port
from test_rank_killed import CONV, PAUSE, REPO, assert_one_sentence, finish, kill_held_rank, torture

FSDP_LAUNCHER = Path(__file__).with_name("fsdp_on_cpu.py")
# layer 0 and the first parameter (the vision tower's) on disk, layer 1 in memory
DEVICE_MAP = {"model.vision_tower": "disk", "model.multi_modal_projector": "cpu",
              "model.language_model.embed_tokens": "disk", "model.language_model.layers.0": "disk",
              "model.language_model.layers.1": "cpu", "model.language_model.norm": "cpu",
              "model.language_model.rotary_emb": "cpu", "lm_head": "disk"}
FP16 = ["--attn-dtype", "float16", "--vision-dtype", "float16"]
GPUS = torch.cuda.device_count()
TENSORS = ("attn", "vision", "focus", "logit_values", "logit_tail")


def write_map(root: Path) -> Path:
    path = root / "device_map.json"
    path.write_text(json.dumps(DEVICE_MAP))
    return path


# ---------------------------------------------------------------- 1. a dispatched teacher
@pytest.fixture(scope="module")
def dispatched(tmp_path_factory, tiny_llava_dir):
    """The same six records cached by the teacher whole, with DEVICE_MAP, and with
    --device-map auto under a CPU limit that sends the rest to disk."""
    root = tmp_path_factory.mktemp("dispatched")
    data, images = make_dataset(root, 6)
    base = ["cache", "build", "--teacher", tiny_llava_dir, "--data", data, "--images", images,
            "--batch-size", "3", "--no-progress", *FP16]
    outputs = {}
    for name, extra in {"whole": [], "map": ["--device-map", write_map(root)],
                        "auto": ["--device-map", "auto", "--max-memory", "cpu=300KB"]}.items():
        result = cli(*base, "--out", root / name, *extra)
        assert result.exit_code == 0, result.output
        outputs[name] = result.output
    return {"root": root, "data": data, "images": images, "outputs": outputs}


def test_dispatched_teacher_caches_what_the_whole_teacher_caches(dispatched):
    root = dispatched["root"]
    assert "teacher placed by --device-map: 4 on cpu, 4 on disk (modules)" in dispatched["outputs"]["map"]
    auto = dispatched["outputs"]["auto"]  # accelerate's own placement under the limit: both kinds
    assert "on cpu" in auto and "on disk" in auto, auto
    whole = open_cache(root / "whole")
    for name in ("map", "auto"):
        got = open_cache(root / name)
        assert sorted(got.sample_ids) == sorted(whole.sample_ids) and len(whole) == 6
        for sid in whole.sample_ids:
            x, y = whole[whole.index_of(sid)], got[got.index_of(sid)]
            for key in ("input_ids", "vision_positions", "text_positions", "logit_positions", "logit_ids"):
                np.testing.assert_array_equal(getattr(y, key), getattr(x, key), err_msg=f"{name} {sid} {key}")
            for key in TENSORS:  # within the stored dtype (fp16)
                np.testing.assert_allclose(getattr(y, key), getattr(x, key), rtol=FP16_RTOL, atol=1e-7,
                                           err_msg=f"{name} {sid} {key}")


def test_dispatched_cache_holds_layer0_of_a_full_eager_forward(dispatched, tiny_llava_dir):
    """The cached rows are layer 0's softmax (a probe on layer 1 would fail here), read where
    the map put layer 0: on disk, behind accelerate's hooks."""
    from transformers import AutoModelForImageTextToText

    root = dispatched["root"]
    vlm = load_vlm(tiny_llava_dir)
    rendered = [render_sample(r, vlm.processor, dispatched["images"], 2048) for r in read_manifest(dispatched["data"])]
    batch = collate(rendered, pad_token_id=vlm.processor.tokenizer.pad_token_id, padding_side="right")
    eager = AutoModelForImageTextToText.from_pretrained(tiny_llava_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        layers = eager(**{k: v for k, v in batch.items() if k != "labels"}, output_attentions=True).attentions
    cache = open_cache(root / "map")
    gap_to_layer1 = 0.0
    for b, r in enumerate(rendered):
        got = cache[cache.index_of(r.sample_id)]
        rows, cols = (torch.from_numpy(np.array(p, np.int64)) for p in (got.text_positions, got.vision_positions))
        expect = [layer[b][:, rows][:, :, cols].permute(1, 0, 2).numpy() for layer in layers[:2]]  # [T, H, Nv]
        np.testing.assert_allclose(got.attn, expect[0], rtol=FP16_RTOL, atol=1e-7, err_msg=r.sample_id)
        gap_to_layer1 = max(gap_to_layer1, float(np.max(np.abs(got.attn - expect[1]) / expect[1])))
    assert gap_to_layer1 > 0.05  # layer 1's rows are far outside fp16 rounding of layer 0's


def test_dispatched_teacher_takes_its_inputs_where_its_embeddings_run(dispatched, tiny_llava_dir):
    """`model.device` is the first parameter's: `meta` once the vision tower went to disk. A
    pass that sent the inputs there would have built nothing; `input_device` asks the hooks."""
    vlm = load_vlm(tiny_llava_dir, placement=Placement(DEVICE_MAP, offload_folder=str(dispatched["root"] / "off")))
    model = vlm.model
    assert model.hf_device_map["model.language_model.layers.0"] == "disk"
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.device.type == "meta"
    assert model.device.type == "meta"
    assert input_device(model) == torch.device("cpu")


def test_device_map_files_are_checked_against_the_model(tmp_path, tiny_llava_dir):
    from alignkd.models.placement import parse_device_map, parse_max_memory

    # plain bytes go to accelerate, so it never reads a unit itself (it takes "70gb" as gigabits)
    assert parse_max_memory("0=70GiB, 1=70GB,cpu=1.5MiB,disk=1000000") == {
        0: 70 * 2**30, 1: 70 * 10**9, "cpu": 1_572_864, "disk": 1000000}
    cases = {
        "unknown": ({**DEVICE_MAP, "model.nope": "cpu"}, "names 'model.nope', which is not a module of"),
        "partial": ({"model.vision_tower": "cpu"}, "places no device for model.multi_modal_projector"),
        "gpu": ({"": GPUS + 3}, f"--device-map names GPU {GPUS + 3}, but this machine has {GPUS} GPU(s)"),
        "bad device": ({"": "tpu"}, "module '' is placed on 'tpu'"),
    }
    for name, (mapping, message) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(mapping))
        with pytest.raises(ConfigError) as err:
            load_vlm(tiny_llava_dir, placement=Placement(parse_device_map(str(path)), offload_folder=str(tmp_path)))
        assert message in str(err.value), (name, str(err.value))


# ---------------------------------------------------------------- 2. FSDP wiring
def test_fsdp_options_become_the_trainers_fsdp2_plugin(tiny_student_dir):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import TrainingArguments

    from alignkd.distill.sharding import fsdp_arguments, parse_fsdp, wrap_classes

    student = load_vlm(tiny_student_dir).model
    # the student's own _no_split_modules that it really holds (no CLIPTextEmbeddings in a VLM)
    assert wrap_classes(student, ()) == ["CLIPEncoderLayer", "CLIPVisionEmbeddings", "LlamaDecoderLayer"]
    assert wrap_classes(student, ("LlamaDecoderLayer",)) == ["LlamaDecoderLayer"]
    with pytest.raises(ConfigError, match="--fsdp-wrap-class MistralDecoderLayer: the student has no module of "
                                          "that class .its layer classes: .*LlamaDecoderLayer"):
        wrap_classes(student, ("MistralDecoderLayer",))
    with pytest.raises(ConfigError, match="--fsdp needs --fsdp-wrap-class here: Linear declares no layer class"):
        wrap_classes(torch.nn.Linear(2, 2), ())
    kwargs = fsdp_arguments(parse_fsdp("full_shard auto_wrap offload"), ["LlamaDecoderLayer"])
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to=[], **kwargs)
    assert args.fsdp_plugin_args == {
        "fsdp_version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "cpu_offload": True,
        "transformer_cls_names_to_wrap": "LlamaDecoderLayer", "cpu_ram_efficient_loading": False,
        "state_dict_type": "SHARDED_STATE_DICT", "reshard_after_forward": True}
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)  # what the Trainer builds from them
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert fsdp_arguments(parse_fsdp("shard_grad_op"), ["X"])["fsdp_config"]["reshard_after_forward"] is False
    assert fsdp_arguments((), []) == {}


# ---------------------------------------------------------------- 3. two nodes on one machine
CLI = Path(shutil.which("alignkd", path=os.path.dirname(sys.executable)))  # imports this tree: PYTHONPATH


def launch_node(node: int, port: int, args, cwd: Path, script: Path = CLI, **env) -> subprocess.Popen:
    """One node of two: its own torchrun with one process (rank = node), rendezvous on 127.0.0.1."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ALIGNKD_PAUSE_MARKER": str(cwd / "held.pid"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **env}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                             "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
                             str(script), *map(str, args)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def same_cache(ref, got) -> None:
    """Sample ids, every tensor byte for byte, the samples and rejects tables row for row (placement
    aside): bench/torture.py's comparison without its verify pass, which a resumed build passes in
    tests/test_rank_killed.py and an S3 cache in tests/test_s3.py, and which costs seconds on moto."""
    a, b = open_cache(ref), open_cache(got)
    assert sorted(a.sample_ids) == sorted(b.sample_ids) and len(set(b.sample_ids)) == len(b.sample_ids)
    for sid in a.sample_ids:
        x, y = a[a.index_of(sid)], b[b.index_of(sid)]
        for name in torture.TENSORS:
            u, v = np.asarray(getattr(x, name)), np.asarray(getattr(y, name))
            assert u.dtype == v.dtype and u.shape == v.shape and u.tobytes() == v.tobytes(), f"{sid} {name}"
    for name, drop in (("samples", torture.PLACEMENT), ("rejects", ())):
        assert torture.table(ref, name, drop) == torture.table(got, name, drop), name


def run_two_nodes(args, cwd: Path, script: Path = CLI) -> list[tuple[int, str, str]]:
    port = _free_port()
    nodes = [launch_node(n, port, args, cwd, script) for n in (0, 1)]
    return [finish(p) for p in nodes]


@pytest.fixture
def quiet_moto():
    """moto's server logs every request at INFO, thousands of them here, each formatted by pytest."""
    log = logging.getLogger("werkzeug")
    level = log.level
    log.setLevel(logging.WARNING)
    yield
    log.setLevel(level)


def test_two_nodes_build_to_s3_resume_after_a_killed_node_and_distill_with_fsdp(s3, quiet_moto, tmp_path,
                                                                              tiny_llava_dir, tiny_student_dir):
    from click.testing import CliRunner
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from alignkd.cli import main

    # one conversation for all (images differ): every rank's batch has the same token counts, so two
    # ranks x 2 samples average to exactly what one process takes from 4
    images = tmp_path / "images"
    for i in range(8):
        make_image(images / f"{i}.png", seed=i)
    data = write_manifest(tmp_path / "train.json",
                          [{"id": f"n{i}", "image": f"{i}.png", "conversations": CONV} for i in range(8)])
    common = ["--teacher", tiny_llava_dir, "--data", data, "--images", images, "--shard-size", "2",
              "--batch-size", "1", "--no-progress"]
    reference = tmp_path / "reference"  # one process, the teacher whole
    result = CliRunner().invoke(main, list(map(str, ["cache", "build", *common, "--out", reference])))
    assert result.exit_code == 0, result.output
    url = s3["url"]("two-nodes")
    build = ["cache", "build", *common, "--device-map", write_map(tmp_path), "--out", url]

    port = _free_port()  # node 1 (rank 1) is held after its first committed shard, then SIGKILLed
    node0 = launch_node(0, port, build, tmp_path)
    node1 = launch_node(1, port, build, tmp_path, PAUSE, ALIGNKD_PAUSE_RANK="1")
    kill_held_rank(node1, tmp_path, ready=lambda: True)
    (code0, _, err0), (code1, _, _) = finish(node0), finish(node1)
    assert code0 != 0 and code1 != 0
    assert_one_sentence(err0, "rank 1 (on another node) stopped during `alignkd cache build`, so rank 0 stopped "
                              "too; the shards committed so far are kept: rerun the same command to resume.")
    assert 0 < len(open_cache(url)) < 8

    rerun = run_two_nodes(build, tmp_path)  # the same command on both nodes resumes
    for code, _, err in rerun:
        assert code == 0, err[-3000:]
    done = int(rerun[0][1].split("samples (")[1].split(" rows already done")[0])
    assert 0 < done < 8, rerun[0][1]
    same_cache(reference, url)

    steps = ["--max-steps", "3", "--logging-steps", "1", "--workers", "0", "--no-progress", "--no-verify"]
    nodes = run_two_nodes(["distill", "--student", tiny_student_dir, "--cache", url, "--out", tmp_path / "run",
                           "--batch-size", "2", "--fsdp", "full_shard auto_wrap", *steps], tmp_path, FSDP_LAUNCHER)
    for code, out, err in nodes:
        assert code == 0, err[-3000:]
    assert nodes[0][1].strip().splitlines()[-1].startswith("distilled 3 steps")
    # one process, batch 4 = two ranks x 2 (the same samples per step, the same mean)
    single = CliRunner().invoke(main, list(map(str, ["distill", "--student", tiny_student_dir, "--cache", url,
                                                     "--out", tmp_path / "single", "--batch-size", "4", *steps])))
    assert single.exit_code == 0, single.output
    start = load_file(tiny_student_dir / "model.safetensors")
    for name in ("model.safetensors", "adapters.safetensors"):
        got, want = load_file(tmp_path / "run" / name), load_file(tmp_path / "single" / name)
        assert sorted(got) == sorted(want)
        for key in want:  # full tensors, not shards
            assert got[key].shape == want[key].shape, key
            torch.testing.assert_close(got[key], want[key], atol=2e-6, rtol=1e-5, msg=lambda m: f"{key}: {m}")
    trained = load_file(tmp_path / "run" / "model.safetensors")
    assert max(float((trained[k] - start[k]).abs().max()) for k in start) > 1e-4  # it trained
    AutoModelForImageTextToText.from_pretrained(tmp_path / "run")
