"""Records holding media alignkd does not read are rejects that name the field, never text (issue 25).

LLaVA-Video and OneVision manifests mix in `{"video": "clips/v1.mp4", ... "<video>\\n..."}`
records; read as text-only samples they would train on prompts about clips nobody sees.
"""

from __future__ import annotations

import json

from click.testing import CliRunner

from alignkd.cache.catalog import run_sql
from alignkd.cli import main
from tests.support.world import make_image

Q = "what is the colour of this image ?"


def _llava(sid, value, **extra):
    return {"id": sid, "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": "red"}],
            **extra}


RECORDS = [
    _llava("kept", f"<image>\n{Q}", image="a.png"),
    _llava("text", "how many ?"),
    _llava("video", f"<video>\n{Q}", video="clips/v1.mp4"),
    _llava("videos", Q, videos=["clips/v1.mp4", "clips/v2.mp4"]),
    _llava("placeholder", f"<video>\n{Q}"),
    _llava("audio", Q, audio="speech/a.wav"),
    {"id": "item", "messages": [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": Q}]},
                                {"role": "assistant", "content": "red"}]},
]
EXPECTED = {"video": ("video_unsupported", "'video' field"), "videos": ("video_unsupported", "'videos' field"),
            "placeholder": ("video_unsupported", "<video> placeholder"),
            "audio": ("media_unsupported", "'audio' field"), "item": ("video_unsupported", "video item")}


def test_video_and_other_media_are_rejects_naming_the_field(tiny_llava_dir, tmp_path):
    make_image(tmp_path / "images" / "a.png")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out = tmp_path / "cache"
    result = CliRunner().invoke(main, ["cache", "build", "--teacher", str(tiny_llava_dir), "--data", str(data),
                                       "--images", str(tmp_path / "images"), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    kept = run_sql(out, "SELECT sample_id FROM samples ORDER BY sample_id").column(0).to_pylist()
    assert kept == ["kept", "text"]
    rows = run_sql(out, "SELECT sample_id, reason, message FROM rejects").to_pylist()
    got = {r["sample_id"]: (r["reason"], r["message"]) for r in rows}
    assert set(got) == set(EXPECTED)
    for sid, (reason, words) in EXPECTED.items():
        assert got[sid][0] == reason and words in got[sid][1], got[sid]
