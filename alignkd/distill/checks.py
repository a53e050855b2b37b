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


def check_vocabulary(student_vocab: int, teacher_vocab: int, tokenizer_size: int) -> None:
    """Equal widths, or widths that differ only in padding rows past the shared tokenizer.

    Called after the token-id check, so the tokenizers are known to agree; the logit
    targets are then restricted to the shared ids (`alignkd.distill.vocab`).
    """
    if student_vocab != teacher_vocab and tokenizer_size > min(student_vocab, teacher_vocab):
        raise AlignKDError(
            f"the student's vocabulary has {student_vocab} entries but the cache's teacher has "
            f"{teacher_vocab}, and their tokenizer has {tokenizer_size} tokens, more than the smaller head; "
            "sparse logit ids would point past the student's head."
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
    from transformers import AutoTokenizer

    with reader.store.local_copy(TOKENIZER_DIR) as teacher_dir:  # copied down from object storage
        if teacher_dir is None:
            raise AlignKDError(f"cache {reader.path} has no {TOKENIZER_DIR}/ directory to check the student "
                               "tokenizer against; rebuild it with this version of alignkd.")
        teacher = AutoTokenizer.from_pretrained(teacher_dir)
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


def check_cache_integrity(cache) -> None:
    """Run `cache verify` before training, so a corrupt shard is named before step one."""
    from alignkd.cache.verify import verify_cache

    problems = verify_cache(cache)
    if problems:
        raise AlignKDError(f"cache {cache} failed verification ({len(problems)} problem(s), first: "
                           f"{problems[0]}); run `alignkd cache verify {cache}` for the full list.")


def check_student_fits_cache(vlm, reader) -> None:
    """Same tokenizer (widths may differ by padding rows) and the teacher's model family.

    Whether the student's processor gives each image the teacher's vision tokens is
    checked per sample by the dataset (`check_images_fit`), since Nv varies per image.
    """
    shapes = reader.meta["teacher_shapes"]
    student_vocab = int(vlm.model.config.get_text_config().vocab_size)
    teacher_vocab = int(shapes["vocab_size"])
    try:
        check_token_ids(vlm.processor.tokenizer, reader, str(vlm.path))
    except AlignKDError as err:
        if student_vocab == teacher_vocab:
            raise
        raise AlignKDError(
            f"the student's vocabulary has {student_vocab} entries and the cache's teacher has {teacher_vocab}, "
            f"and the tokenizers differ ({str(err).rstrip('.')})."
        ) from None
    check_vocabulary(student_vocab, teacher_vocab, len(vlm.processor.tokenizer))
    check_family(vlm.model.config.model_type, shapes.get("model_type"))


def check_family(student_type: str, teacher_type: str | None) -> None:
    """The student must take the per-token inputs the cache replays (mm_token_type_ids,
    token_type_ids) with the same meaning: families that differ there cannot share a cache.
    Gemma3's and PaliGemma's token_type_ids share a name but mark the image and the answer
    respectively, so the prompt format is compared too."""
    from alignkd.models.families import FAMILIES

    if teacher_type not in FAMILIES or student_type not in FAMILIES:
        return
    teacher, student = FAMILIES[teacher_type], FAMILIES[student_type]
    if (teacher.token_inputs, teacher.prompt_format) != (student.token_inputs, student.prompt_format):
        raise AlignKDError(f"the cache was built by a {teacher_type} teacher but the student is a "
                           f"{student_type} model, which takes other per-token inputs; use a student "
                           "of the teacher's family.")


# what each optional target holds, for the sentences below
TARGET_WORDS = {"attn": "attention rows", "vision": "vision tokens"}


def terms_reading(target: str) -> tuple[str, ...]:
    """The loss terms that read target `target` (the target-kind table's `term` column)."""
    from alignkd.storage_schemas.kinds import TARGET_KINDS

    return tuple(dict.fromkeys(k.term for k in TARGET_KINDS if k.target == target and k.term))


def weights_for_cache(cfg, skipped: tuple[str, ...]):
    """The run's loss weights on a cache built with `cache build --skip`, and one note per term
    turned off. A term whose target the cache lacks is off when only the default preset turned it
    on; asked for by its weight option or by another preset, it is refused."""
    from alignkd.distill.terms import DEFAULT_PRESET, LOSS_TERMS, LossWeights
    from alignkd.errors import ConfigError

    weights, notes = cfg.loss_weights().as_dict(), []
    for target in skipped:
        for term in terms_reading(target):
            option = LOSS_TERMS[term].option
            if weights[term] <= 0:
                continue
            if option in cfg.given_weights or cfg.preset != DEFAULT_PRESET:
                asked = (f"--{option.replace('_', '-')} {weights[term]:g}" if option in cfg.given_weights
                         else f"--preset {cfg.preset}")
                raise ConfigError(f"cache {cfg.cache} was built with --skip {target} and holds no "
                                  f"{TARGET_WORDS[target]}, which {asked} needs; set --{option.replace('_', '-')} 0 "
                                  f"or rebuild the cache without --skip {target}.")
            weights[term] = 0.0
            notes.append(f"{term} term off: the cache holds no {TARGET_WORDS[target]} (--skip {target})")
    if not any(w > 0 for w in weights.values()):
        raise ConfigError(f"cache {cfg.cache} holds no targets for any loss term this run enables; "
                          "enable --w-ce or --w-logit.")
    return LossWeights(**weights), notes
