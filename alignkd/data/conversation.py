"""LLaVA conversations to chat messages with structured content.

LLaVA records say `{"from": "human", "value": "<image>\\nWhat is this?"}`. Processors'
chat templates take `{"role": "user", "content": [{"type": "image"}, {"type": "text",
...}]}` and print their own image token, so we turn the `<image>` placeholder into an
image item at the same position. Whitespace touching the placeholder is dropped (the
"\\n" after "<image>" is LLaVA's separator, and each template brings its own); all other
text is passed through untouched.

Roles: "human"/"user" and "gpt"/"assistant" are accepted, since both spellings occur
in public LLaVA-style dumps. System turns are refused: few VLM templates agree on them.
Turns must alternate user/assistant, start with the user and end with the assistant,
because only assistant turns carry labels and a trailing question teaches nothing.
"""

from __future__ import annotations

from alignkd.data.errors import SampleError
from alignkd.data.manifest import ManifestRecord

PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

_PROBLEM_DETAILS = {
    "missing_id": "has no usable 'id' field (a non-empty string or integer)",
    "bad_record": "is not a LLaVA record ('image' must be a non-empty string and 'conversations' a list)",
}


def to_messages(record: ManifestRecord, image_token: str | None = None) -> list[dict]:
    """Validate `record` and return chat messages; raise SampleError on bad input.

    `image_token` is the processor's own image token: if it appears in user text the
    processor would count it as an image, so such text is refused.
    """
    sid, row = record.sample_id, record.row
    if record.problem is not None:
        raise SampleError(sid, row, record.problem, _PROBLEM_DETAILS[record.problem])
    turns = [_check_turn(sid, row, i, turn) for i, turn in enumerate(record.conversations)]
    _check_order(sid, row, [role for role, _ in turns])
    _check_placeholders(record, turns, image_token)
    return [{"role": role, "content": _content(role, value)} for role, value in turns]


def _check_turn(sid: str, row: int, i: int, turn: object) -> tuple[str, str]:
    if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
        raise SampleError(sid, row, "bad_conversation", f"has turn {i} without 'from' and 'value'")
    role = ROLES.get(turn["from"]) if isinstance(turn["from"], str) else None
    if role is None:
        raise SampleError(sid, row, "unknown_role",
                          f"has turn {i} from {turn['from']!r}; expected human/user or gpt/assistant")
    value = turn["value"]
    if not isinstance(value, str) or not value.strip():
        raise SampleError(sid, row, "bad_conversation", f"has turn {i} whose value is not a non-empty string")
    return role, value


def _check_order(sid: str, row: int, roles: list[str]) -> None:
    if not roles:
        raise SampleError(sid, row, "bad_conversation", "has no conversation turns")
    for i, role in enumerate(roles):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise SampleError(sid, row, "bad_conversation",
                              f"has a {role} turn at position {i} where a {expected} turn belongs")
    if roles[-1] != "assistant":
        raise SampleError(sid, row, "bad_conversation", "ends with a user turn that has no answer")


def _check_placeholders(record: ManifestRecord, turns: list[tuple[str, str]], image_token: str | None) -> None:
    sid, row = record.sample_id, record.row
    count = 0
    for i, (role, value) in enumerate(turns):
        n = value.count(PLACEHOLDER)
        if n and role == "assistant":
            raise SampleError(sid, row, "bad_conversation", f"has {PLACEHOLDER} in assistant turn {i}")
        if image_token and image_token != PLACEHOLDER and image_token in value:
            raise SampleError(sid, row, "bad_conversation",
                              f"has the processor's image token {image_token!r} as literal text in turn {i}")
        count += n
    if count > 1:
        raise SampleError(sid, row, "bad_conversation",
                          f"has {count} {PLACEHOLDER} placeholders; one image per sample is supported")
    if record.image is not None and count == 0:
        raise SampleError(sid, row, "image_without_placeholder",
                          f"names image {record.image!r} but no turn has an {PLACEHOLDER} placeholder")
    if record.image is None and count == 1:
        raise SampleError(sid, row, "placeholder_without_image",
                          f"has an {PLACEHOLDER} placeholder but no 'image' field")


def _content(role: str, value: str) -> list[dict]:
    if role == "assistant":
        return [{"type": "text", "text": value}]
    parts = value.split(PLACEHOLDER)
    content = []
    for i, part in enumerate(parts):
        text = part.lstrip() if i > 0 else part
        text = text.rstrip() if i < len(parts) - 1 else text
        if text:
            content.append({"type": "text", "text": text})
        if i < len(parts) - 1:
            content.append({"type": "image"})
    return content
