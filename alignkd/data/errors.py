"""Errors of the data layer.

A bad manifest file stops everything (`ManifestError`); a bad sample is recorded as a
reject and the cache build carries on (`SampleError`). `reason` is a short code that
lands in the `rejects` table, so the codes below are part of the cache's contract:
add new ones, never rename them.
"""

from __future__ import annotations

from alignkd.errors import AlignKDError

REASONS = frozenset({
    "missing_id",                 # the record has no usable "id"
    "bad_record",                 # "image" is not a string or "conversations" not a list
    "duplicate_id",               # a later record repeats an earlier id
    "bad_conversation",           # empty, wrong order, empty values, misplaced <image>
    "unknown_role",               # a role other than system, human/user, gpt/assistant
    "image_without_placeholder",  # more images than <image> placeholders (or image items)
    "placeholder_without_image",  # more <image> placeholders (or image items) than images
    "image_outside_root",         # absolute path, ../ or a symlink leaving the images root
    "missing_image",              # the image file does not exist
    "unreadable_image",           # the image exists but cannot be read (permission denied, I/O error)
    "corrupt_image",              # PIL cannot decode the image
    "bad_image",                  # decoded, but the processor refuses it (Qwen-VL: aspect ratio over 200)
    "template_rejected",          # the processor's chat template raised on this sample
    "image_tokens_truncated",     # max_length would cut through the image tokens
    "no_answer_tokens",           # no assistant token survives truncation
    "no_image",                   # a text-only record for a family that needs an image (PaliGemma)
    "system_unsupported",         # the family's chat template refuses or drops a system turn
    "multi_image_unsupported",    # several images for a family alignkd takes one image per sample from
    "video_unsupported",          # a video (a "video"/"videos" key, a <video> placeholder, a video item)
    "media_unsupported",          # another media key alignkd does not read ("audio", ...): never dropped
})


class ManifestError(AlignKDError):
    """The manifest file as a whole cannot be read."""


class ProcessorError(AlignKDError):
    """The processor or its chat template cannot be used to build label masks."""


class SampleError(AlignKDError):
    """One sample is unusable; the cache stage records it as a reject and carries on."""

    def __init__(self, sample_id: str, row: int | None, reason: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"unknown SampleError reason {reason!r}")
        self.sample_id, self.row, self.reason, self.detail = sample_id, row, reason, detail
        where = "" if row is None else f" (manifest row {row})"
        super().__init__(f"Sample {sample_id!r}{where} {detail}.")

    def __reduce__(self):  # keep the attributes when sent between processes
        return (type(self), (self.sample_id, self.row, self.reason, self.detail))
