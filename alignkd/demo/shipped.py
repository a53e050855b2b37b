"""The demo teacher's shipped weights: where they live and how they become a model directory.

Training a teacher that solves the grid world takes tens of CPU minutes, more than the
demo's budget, so `alignkd demo train-teacher` is run once and its weights ship in the
package (`assets/teacher.safetensors`, with `assets/teacher.json` recording the command,
seed, accuracy and sha256). The tokenizer, processor and config are rebuilt in code from
the same specs, so only the weights travel.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from alignkd.errors import AlignKDError

ASSETS = Path(__file__).parent / "assets"
WEIGHTS = ASSETS / "teacher.safetensors"
RECORD = ASSETS / "teacher.json"


def shipped_teacher_available() -> bool:
    return WEIGHTS.is_file() and RECORD.is_file()


def materialise_shipped_teacher(target: Path) -> Path:
    """Write a loadable LLaVA directory for the shipped teacher at `target`, checking its sha256."""
    from alignkd.demo import world
    from alignkd.demo.teacher import TEACHER_SPEC
    from alignkd.demo.tiny_models import build_llava_config, build_processor, build_word_tokenizer

    record = json.loads(RECORD.read_text())
    digest = hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()
    if digest != record["sha256"]:
        raise AlignKDError(f"shipped teacher weights {WEIGHTS} have sha256 {digest[:12]}…, "
                           f"expected {record['sha256'][:12]}…; reinstall alignkd.")
    from transformers import GenerationConfig

    tokenizer = build_word_tokenizer(world.world_vocabulary())
    tmp = target.parent / f".tmp-{target.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # The weights are save_pretrained's own file (checkpoint key names), so they are
    # copied beside a config and loaded by from_pretrained, never by load_state_dict.
    build_llava_config(tokenizer, TEACHER_SPEC).save_pretrained(tmp)
    shutil.copy(WEIGHTS, tmp / "model.safetensors")
    GenerationConfig(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                     bos_token_id=tokenizer.bos_token_id).save_pretrained(tmp)
    build_processor(tokenizer, TEACHER_SPEC).save_pretrained(tmp)
    tmp.rename(target)
    return target


def export_for_shipping(model_dir: Path, metrics: dict, command: str) -> Path:
    """Copy a trained teacher's weights into assets/ with the record that describes them."""
    ASSETS.mkdir(exist_ok=True)
    shutil.copy(Path(model_dir) / "model.safetensors", WEIGHTS)
    digest = hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()
    RECORD.write_text(json.dumps({"sha256": digest, "command": command, **metrics}, indent=1))
    return WEIGHTS
