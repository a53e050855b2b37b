"""Record turns to chat messages with structured content.

Two spellings reach us:
- LLaVA: `{"from": "human", "value": "<image>\\nWhat is this?"}`;
- the Hugging Face chat format: `{"role": "user", "content": "..."}`, where `content` is a
  string or a list of `{"type": "image"}` / `{"type": "text", "text": ...}` items.

Processors' chat templates take `{"role": "user", "content": [{"type": "image"}, {"type":
"text", ...}]}` and print their own image token, so an `<image>` placeholder in text becomes
an image item at the same position. Whitespace touching the placeholder is dropped (the
"\\n" after "<image>" is LLaVA's separator, and each template brings its own); all other
text is passed through untouched.

Roles: "human"/"user", "gpt"/"assistant" and "system" (both spellings occur in public
dumps). A system turn may only come first; it goes to the chat template, which decides
what to do with it (`render` refuses a template that drops it). After it, turns must
alternate user/assistant, start with the user and end with the assistant, because only
assistant turns carry labels and a trailing question teaches nothing. Images sit in user
turns only, one placeholder per image of the record, in order.
"""

from __future__ import annotations

from alignkd.data.errors import SampleError
from alignkd.data.manifest import ManifestRecord

PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

_PROBLEM_DETAILS = {
    "missing_id": "has no usable 'id' field (a non-empty string or integer)",
    "bad_record": ("is not a record alignkd can read ('image' must be a non-empty string or a list of them, and "
                   "exactly one of 'conversations' and 'messages' must be a list)"),
}


def to_messages(record: ManifestRecord, image_token: str | None = None) -> list[dict]:
    """Validate `record` and return chat messages; raise SampleError on bad input.

    `image_token` is the processor's own image token: if it appears in user text the
    processor would count it as an image, so such text is refused.
    """
    sid, row = record.sample_id, record.row
    if record.problem is not None:
        raise SampleError(sid, row, record.problem, record.problem_detail or _PROBLEM_DETAILS[record.problem])
    read = _llava_turn if record.chat_format == "conversations" else _chat_turn
    messages = [read(sid, row, i, turn) for i, turn in enumerate(record.turns)]
    _check_no_video(sid, row, messages)
    _check_order(sid, row, [m["role"] for m in messages])
    _check_images(record, messages, image_token)
    return messages


def _llava_turn(sid: str, row: int, i: int, turn: object) -> dict:
    if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
        raise SampleError(sid, row, "bad_conversation", f"has turn {i} without 'from' and 'value'")
    role = _role(sid, row, i, turn["from"])
    value = turn["value"]
    if not isinstance(value, str) or not value.strip():
        raise SampleError(sid, row, "bad_conversation", f"has turn {i} whose value is not a non-empty string")
    return {"role": role, "content": _split_placeholders(value)}


def _chat_turn(sid: str, row: int, i: int, turn: object) -> dict:
    if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
        raise SampleError(sid, row, "bad_conversation", f"has message {i} without 'role' and 'content'")
    role = _role(sid, row, i, turn["role"])
    content = turn["content"]
    if isinstance(content, str):
        items = _split_placeholders(content)
    elif isinstance(content, list) and content:
        items = [_chat_item(sid, row, i, item) for item in content]
    else:
        raise SampleError(sid, row, "bad_conversation", f"has message {i} whose content is not a string or a list")
    has_text = any(it["type"] == "text" and it["text"].strip() for it in items)
    if not has_text and (role != "user" or not any(it["type"] == "image" for it in items)):
        raise SampleError(sid, row, "bad_conversation", f"has message {i} with no text")
    if role == "assistant":  # one text item, as the label-span search expects
        text = "".join(it["text"] for it in items if it["type"] == "text")
        items = [{"type": "text", "text": text}] + [it for it in items if it["type"] == "image"]
    return {"role": role, "content": items}


def _chat_item(sid: str, row: int, i: int, item: object) -> dict:
    kind = item.get("type") if isinstance(item, dict) else None
    if kind == "image":
        return {"type": "image"}
    if kind == "video":
        raise SampleError(sid, row, "video_unsupported", f"has message {i} with a video item; alignkd distils "
                          "images and text only, so the record is not kept")
    if kind == "text" and isinstance(item.get("text"), str):
        return {"type": "text", "text": item["text"]}
    raise SampleError(sid, row, "bad_conversation",
                      f"has message {i} with a content item that is neither {{'type': 'image'}} nor "
                      "{'type': 'text', 'text': ...}")


def _check_no_video(sid: str, row: int, messages: list[dict]) -> None:
    for i, msg in enumerate(messages):
        if any(item["type"] == "text" and VIDEO_PLACEHOLDER in item["text"] for item in msg["content"]):
            raise SampleError(sid, row, "video_unsupported", f"has a {VIDEO_PLACEHOLDER} placeholder in turn {i}; "
                              "alignkd distils images and text only, so the record is not kept")


def _role(sid: str, row: int, i: int, name: object) -> str:
    role = ROLES.get(name) if isinstance(name, str) else None
    if role is None:
        raise SampleError(sid, row, "unknown_role",
                          f"has turn {i} from {name!r}; expected system, human/user or gpt/assistant")
    return role


def _check_order(sid: str, row: int, roles: list[str]) -> None:
    body = roles[1:] if roles[:1] == ["system"] else roles
    if not body:
        raise SampleError(sid, row, "bad_conversation", "has no conversation turns")
    offset = len(roles) - len(body)
    for i, role in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            where = "after the first turn" if role == "system" else f"at position {i + offset}"
            raise SampleError(sid, row, "bad_conversation", f"has a {role} turn {where} where a {expected} "
                              "turn belongs" + (" (a system turn may only come first)" if role == "system" else ""))
    if body[-1] != "assistant":
        raise SampleError(sid, row, "bad_conversation", "ends with a user turn that has no answer")


def _check_images(record: ManifestRecord, messages: list[dict], image_token: str | None) -> None:
    sid, row = record.sample_id, record.row
    count = 0
    for i, msg in enumerate(messages):
        n = sum(item["type"] == "image" for item in msg["content"])
        if n and msg["role"] != "user":
            raise SampleError(sid, row, "bad_conversation", f"has an image in {msg['role']} turn {i}")
        if image_token and image_token != PLACEHOLDER and any(
                item["type"] == "text" and image_token in item["text"] for item in msg["content"]):
            raise SampleError(sid, row, "bad_conversation",
                              f"has the processor's image token {image_token!r} as literal text in turn {i}")
        count += n
    images = len(record.images)
    if images > count:
        raise SampleError(sid, row, "image_without_placeholder",
                          f"names {images} image(s) but its turns hold {count} {PLACEHOLDER} placeholder(s)")
    if count > images:
        raise SampleError(sid, row, "placeholder_without_image",
                          f"has {count} {PLACEHOLDER} placeholder(s) but names {images} image(s)")


def _split_placeholders(value: str) -> list[dict]:
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
