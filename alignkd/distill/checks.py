"""Refusals before any training step: does this student fit this cache?

Training on cached token ids is only meaningful when the student would have produced
the same ids, has the same vocabulary (the sparse logit ids index it), and sees the
same number of vision tokens (the attention and vision targets have that width).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from alignkd.cache.identity import tokenizer_fingerprint
from alignkd.errors import AlignKDError
from alignkd.storage_schemas import TOKENIZER_DIR

ROWS_TO_CHECK = 16


def student_vision_tokens(processor) -> int:
    """How many image tokens the student's processor emits for one image."""
    from PIL import Image

    image = Image.new("RGB", (64, 64))
    token = processor.image_token
    enc = processor(text=[token], images=[image], return_tensors="pt")
    return int((enc["input_ids"] == processor.image_token_id).sum())


def check_vocabulary(student_vocab: int, teacher_vocab: int) -> None:
    if student_vocab != teacher_vocab:
        raise AlignKDError(
            f"the student's vocabulary has {student_vocab} entries but the cache's teacher has "
            f"{teacher_vocab}; sparse logit ids would point at different tokens."
        )


def check_token_ids(tokenizer, reader, student_dir: str) -> None:
    """Would the student tokenizer produce the cached ids? Checked on a sample of rows.

    Each row's cached ids are decoded with the teacher's tokenizer (kept in the cache),
    and the text is encoded by both tokenizers; comparing the two encodings, rather than
    re-encoding with the student alone, cannot be fooled by a student that round-trips
    its own ids, and does not refuse tokenizers whose decode is not exactly invertible.
    """
    if tokenizer_fingerprint(Path(student_dir)) == reader.meta["teacher"].get("tokenizer_fingerprint"):
        return
    teacher_dir = reader.path / TOKENIZER_DIR
    if not teacher_dir.is_dir():
        raise AlignKDError(f"cache {reader.path} has no {TOKENIZER_DIR}/ directory to check the student "
                           "tokenizer against; rebuild it with this version of alignkd.")
    teacher = _load_tokenizer(teacher_dir)
    rng = np.random.default_rng(0)
    rows = rng.choice(len(reader), size=min(ROWS_TO_CHECK, len(reader)), replace=False)
    for index in sorted(int(i) for i in rows):
        sample = reader[index]
        text = teacher.decode([int(t) for t in sample.input_ids], skip_special_tokens=False)
        if tokenizer(text, add_special_tokens=False)["input_ids"] != teacher(text, add_special_tokens=False)["input_ids"]:
            raise AlignKDError(
                f"the student tokenizer does not map the cached text of sample {sample.sample_id} "
                "to the teacher's token ids; teacher and student must tokenise identically."
            )


def _load_tokenizer(path):
    """AutoTokenizer from a cache's tokenizer/ directory (copied down first on object storage)."""
    import tempfile

    from transformers import AutoTokenizer

    from alignkd.cache.location import filesystem, is_remote

    if not is_remote(path):
        return AutoTokenizer.from_pretrained(path)
    with tempfile.TemporaryDirectory() as tmp:
        filesystem(path).get(path.path + "/", tmp, recursive=True)
        return AutoTokenizer.from_pretrained(tmp)


def check_cache_integrity(cache: str) -> None:
    """Run `cache verify` before training, so a corrupt shard is named before step one."""
    from alignkd.cache.verify import verify_cache

    problems = verify_cache(cache)
    if problems:
        raise AlignKDError(f"cache {cache} failed verification ({len(problems)} problem(s), first: "
                           f"{problems[0]}); run `alignkd cache verify {cache}` for the full list.")


def check_student_fits_cache(vlm, reader) -> None:
    shapes = reader.meta["teacher_shapes"]
    text = vlm.model.config.get_text_config()
    check_vocabulary(int(text.vocab_size), int(shapes["vocab_size"]))
    check_token_ids(vlm.processor.tokenizer, reader, str(vlm.path))
    if len(reader):
        cached_nv = len(reader[0].vision_positions)
        student_nv = student_vision_tokens(vlm.processor)
        if cached_nv != student_nv:
            raise AlignKDError(
                f"the student sees {student_nv} vision tokens per image but the cache holds {cached_nv}; "
                "use a student with the teacher's image grid."
            )
