"""The data layer on the tiny LLaVA processor: manifests, label masks, refusals, collate."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from tests.support.world import make_image, write_manifest

from alignkd.data import (
    IGNORE_INDEX,
    ImageRef,
    ManifestError,
    ManifestRecord,
    ProcessorError,
    SampleError,
    collate,
    image_inputs_from_bytes,
    read_manifest,
    render_sample,
    assign_keys,
    open_source,
)
from alignkd.demo.tiny_models import TinyLlavaSpec

N_IMAGE_TOKENS = TinyLlavaSpec().num_image_tokens  # 16
QUESTION = "<image>\nwhat is the colour of this image ?"


@pytest.fixture(scope="module")
def processor(tiny_llava_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_llava_dir)


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "images"
    make_image(root / "a.png", seed=1)
    make_image(root / "b.png", seed=2)
    return root


def record(conv, image="a.png", sample_id="x", row=0) -> ManifestRecord:
    images = () if image is None else tuple(ImageRef(path=p) for p in ([image] if isinstance(image, str) else image))
    return ManifestRecord(row=row, sample_id=sample_id, images=images, turns=conv)


def turns(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def labelled_tokens(processor, sample) -> list[str]:
    return processor.tokenizer.convert_ids_to_tokens(sample.input_ids[sample.labels != IGNORE_INDEX])


# --- manifests -------------------------------------------------------------------------

def test_read_json_and_jsonl_give_the_same_records(small_dataset, tmp_path):
    manifest, _ = small_dataset
    records = read_manifest(manifest)
    assert [(r.row, r.sample_id, r.images) for r in records] == \
        [(i, f"s{i}", (ImageRef(path=f"img{i}.png"),)) for i in range(6)]
    assert records[2].turns[2] == {"from": "human", "value": "how many ?"}
    raw = json.loads(manifest.read_text())
    assert read_manifest(write_manifest(tmp_path / "d.jsonl", raw, jsonl=True)) == records
    # JSONL content under a .json name is detected by content
    assert read_manifest(write_manifest(tmp_path / "d2.json", raw, jsonl=True)) == records


def test_invalid_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"id": "a", "conversations": []}\n\n{"id": "b", "conversations": [}\n')
    with pytest.raises(ManifestError, match=r"data\.jsonl line 3 is not valid JSON: "):
        read_manifest(path)


def test_invalid_json_list_names_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"id": "a"},\n  {"id": "b",,}\n]\n')
    with pytest.raises(ManifestError, match=r"data\.json line 3 is not valid JSON"):
        read_manifest(path)


@pytest.mark.parametrize("text, message", [
    ('{"records": []}', "holds a JSON object, not a list of records"),
    ('"hello"', "not a list of records"),
    ('[1, {"id": "a"}]', "record 0 is a JSON number, not an object"),
    ('{"id": "a"}\n[1]\n', "line 2 is a JSON list, not an object"),
    ("  \n", "is empty"),
])
def test_manifest_shape_errors(tmp_path, text, message):
    path = tmp_path / "m.json"
    path.write_text(text)
    with pytest.raises(ManifestError, match=message):
        read_manifest(path)


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "nope.json")


def test_repeated_ids_are_all_kept_with_unique_keys(tmp_path):
    source = open_source(write_manifest(tmp_path / "m.json", [
        {"id": "a", "conversations": []}, {"id": "b", "conversations": []},
        {"id": "a", "conversations": []}, {"conversations": []}, {"id": "a#3", "conversations": []},
        {"id": "a", "conversations": []},
    ]))
    rows = assign_keys(source.index())
    # the 3rd "a" cannot be "a#3" (a record is called that): it gets one more "#"
    assert [(r.row, r.sample_id, r.record_id, r.problem) for r in rows] == [
        (0, "a", "a", None), (1, "b", "b", None), (2, "a#2", "a", None), (3, "row3", None, "missing_id"),
        (4, "a#3", "a#3", None), (5, "a#3#", "a", None)]


# --- label masks -----------------------------------------------------------------------

def test_single_turn_labels_are_answer_plus_eos(processor, images):
    sample = render_sample(record(turns(QUESTION, "blue circle")), processor, images, 128)
    tokens = processor.tokenizer.convert_ids_to_tokens(sample.input_ids)
    assert tokens[:3] == ["<s>", "USER", ":"] and tokens.count("<s>") == 1
    assert tokens.count("<image>") == N_IMAGE_TOKENS
    assert labelled_tokens(processor, sample) == ["blue", "circle", "</s>"]
    assert tokens[-3:] == ["blue", "circle", "</s>"]
    assert (sample.labels[-3:] == sample.input_ids[-3:]).all() and (sample.labels[:-3] == IGNORE_INDEX).all()
    assert sample.attention_mask.tolist() == [1] * len(tokens)
    assert sample.image_inputs["pixel_values"].shape == (1, 3, 32, 32)
    [img] = sample.images
    assert img.data == (images / "a.png").read_bytes() and len(img.sha256) == 64 and img.name == "a.png"
    assert sample.image_token_counts == (N_IMAGE_TOKENS,)
    assert not sample.truncated


def test_multi_turn_labels_every_answer(processor, images):
    conv = turns(QUESTION, "red", "how many ?", "2", "where ?", "left of the square")
    sample = render_sample(record(conv), processor, images, 128)
    assert labelled_tokens(processor, sample) == ["red", "</s>", "2", "</s>", "left", "of", "the", "square", "</s>"]
    ids = sample.input_ids[sample.labels != IGNORE_INDEX]
    decoded = processor.tokenizer.decode(ids)
    assert decoded == "red </s> 2 </s> left of the square </s>"


def test_image_in_a_later_turn_and_aliases(processor, images):
    conv = [{"from": "user", "value": "describe ?"}, {"from": "assistant", "value": "no"},
            {"from": "human", "value": "what is the colour ? <image>"}, {"from": "gpt", "value": "red"}]
    sample = render_sample(record(conv), processor, images, 128)
    tokens = processor.tokenizer.convert_ids_to_tokens(sample.input_ids)
    assert tokens.index("<image>") > tokens.index("no")
    assert labelled_tokens(processor, sample) == ["no", "</s>", "red", "</s>"]


def test_labels_follow_another_template(processor, images):
    """Nothing is specific to the LLaVA-1.5 template: a ChatML-like one with the image
    after the text and " ." ending each turn labels that ending, and since " ." is no token
    the model stops on, the tokenizer's </s> is put after each answer and labelled too."""
    other = copy.copy(processor)
    other.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %} .\n{% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}")
    conv = turns("what is the colour ?\n<image>", "red", "how many ?", "2")
    sample = render_sample(record(conv), other, images, 128)
    assert labelled_tokens(processor, sample) == ["red", "</s>", ".", "2", "</s>", "."]
    assert (sample.input_ids == processor.image_token_id).sum() == N_IMAGE_TOKENS


def test_text_only_record(processor):
    sample = render_sample(record(turns("how many ?", "3"), image=None), processor, None, 64)
    assert labelled_tokens(processor, sample) == ["3", "</s>"]
    assert sample.image_inputs == {} and sample.images == () and sample.image_token_counts == ()


# --- refusals --------------------------------------------------------------------------

def bad_cases(tmp_path, images):
    make_image(tmp_path / "outside.png")
    (images / "link.png").symlink_to(tmp_path / "outside.png")
    (images / "bad.png").write_bytes(b"this is not a png")
    ok = turns(QUESTION, "red")
    return {
        "missing_image": record(ok, image="nope.png"),
        "corrupt_image": record(ok, image="bad.png"),
        "image_without_placeholder": record(turns("what is the colour ?", "red")),
        "placeholder_without_image": record(ok, image=None),
        "unknown_role": record([{"from": "narrator", "value": "be brief"}] + ok),
        "image_outside_root": record(ok, image="../outside.png"),
        "image_outside_root/abs": record(ok, image=str(tmp_path / "outside.png")),
        "image_outside_root/symlink": record(ok, image="link.png"),
        "bad_conversation/empty": record([]),
        "bad_conversation/starts_with_gpt": record(list(reversed(ok))),
        "bad_conversation/ends_with_human": record(ok + turns("how many ?")),
        "bad_conversation/blank_value": record(turns(QUESTION, "  ")),
        "bad_conversation/not_a_string": record(turns(QUESTION, 3)),
        "bad_conversation/no_value": record([{"from": "human"}]),
        "bad_conversation/image_in_answer": record(turns("what ?", "<image> red")),
        "placeholder_without_image/two_for_one": record(turns(QUESTION + " <image>", "red")),
        "image_without_placeholder/two_for_one": record(ok, image=["a.png", "b.png"]),
        "bad_conversation/system_not_first": record(ok + [{"from": "system", "value": "be brief"}] + ok),
        "missing_id": ManifestRecord(0, "row0", (), ok, problem="missing_id"),
        "bad_record": ManifestRecord(0, "x", (), [], problem="bad_record"),
    }


def test_every_bad_input_has_its_reason(processor, images, tmp_path):
    for case, rec in bad_cases(tmp_path, images).items():
        with pytest.raises(SampleError) as info:
            render_sample(rec, processor, images, 128)
        err = info.value
        assert err.reason == case.split("/")[0], case
        assert (err.sample_id, err.row) == (rec.sample_id, rec.row), case
        message = str(err)
        assert message.startswith(f"Sample '{rec.sample_id}' (manifest row 0) ") and message.endswith("."), case
        assert "\n" not in message, case


def test_image_without_images_root_is_a_config_error(processor):
    from alignkd.errors import ConfigError

    with pytest.raises(ConfigError, match="no images directory"):
        render_sample(record(turns(QUESTION, "red")), processor, None, 128)


def test_missing_id_from_a_real_manifest(processor, images, tmp_path):
    recs = read_manifest(write_manifest(tmp_path / "m.jsonl", [
        {"id": "ok", "image": "a.png", "conversations": turns(QUESTION, "red")},
        {"image": "a.png", "conversations": turns(QUESTION, "red")},
        {"id": "y", "image": ["a.png", 7], "conversations": turns(QUESTION, "red")},
    ], jsonl=True))
    render_sample(recs[0], processor, images, 128)
    for rec, reason, sid in [(recs[1], "missing_id", "row1"), (recs[2], "bad_record", "y")]:
        with pytest.raises(SampleError, match=f"'{sid}'") as info:
            render_sample(rec, processor, images, 128)
        assert info.value.reason == reason


def test_template_refusals(processor, images):
    raising = copy.copy(processor)
    raising.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(SampleError, match="roles must alternate") as info:
        render_sample(record(turns(QUESTION, "red")), raising, images, 128)
    assert info.value.reason == "template_rejected"
    # a template that drops the answer text: we refuse rather than label the wrong tokens
    lossy = copy.copy(processor)
    lossy.chat_template = "{% for m in messages %}{{ m['role'] }} {% endfor %}"
    with pytest.raises(ProcessorError, match="assistant"):
        render_sample(record(turns("how many ?", "3"), image=None), lossy, None, 128)


def test_sample_error_survives_pickling():
    err = pickle.loads(pickle.dumps(SampleError("s1", 4, "missing_image", "has no image")))
    assert (err.sample_id, err.row, err.reason, str(err)) == ("s1", 4, "missing_image",
                                                            "Sample 's1' (manifest row 4) has no image.")


# --- truncation ------------------------------------------------------------------------

def test_truncation_cuts_the_tail_and_keeps_the_image(processor, images):
    conv = turns(QUESTION, "red", "how many ?", "2 3 4")
    full = render_sample(record(conv), processor, images, None)
    cut = render_sample(record(conv), processor, images, len(full.input_ids) - 2)
    assert cut.truncated and not full.truncated
    assert torch.equal(cut.input_ids, full.input_ids[:-2]) and torch.equal(cut.labels, full.labels[:-2])
    assert labelled_tokens(processor, cut) == ["red", "</s>", "2", "3"]
    assert (cut.input_ids == processor.image_token_id).sum() == N_IMAGE_TOKENS


def test_truncation_refuses_to_cut_the_image_or_every_answer(processor, images):
    rec = record(turns(QUESTION, "red"))
    with pytest.raises(SampleError, match="'x'") as info:
        render_sample(rec, processor, images, 10)
    assert info.value.reason == "image_tokens_truncated"
    first_answer = int((render_sample(rec, processor, images, None).labels != IGNORE_INDEX).nonzero()[0])
    with pytest.raises(SampleError, match="'x'") as info:
        render_sample(rec, processor, images, first_answer)
    assert info.value.reason == "no_answer_tokens"
    assert render_sample(rec, processor, images, first_answer + 1).truncated


# --- images and collate ----------------------------------------------------------------

def test_image_inputs_from_bytes_match_render(processor, images):
    sample = render_sample(record(turns(QUESTION, "red")), processor, images, 128)
    rebuilt = image_inputs_from_bytes(processor, sample.images[0].data)
    assert rebuilt.keys() == sample.image_inputs.keys()
    assert torch.equal(rebuilt["pixel_values"], sample.image_inputs["pixel_values"])
    with pytest.raises(SampleError, match="'s9'") as info:
        image_inputs_from_bytes(processor, b"garbage", sample_id="s9")
    assert info.value.reason == "corrupt_image"


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_pads_and_stacks_images(processor, images, side):
    samples = [
        render_sample(record(turns(QUESTION, "red"), image="a.png"), processor, images, 128),
        render_sample(record(turns("how many ?", "3"), image=None), processor, images, 128),
        render_sample(record(turns(QUESTION, "blue circle"), image="b.png"), processor, images, 128),
    ]
    pad = processor.tokenizer.pad_token_id
    batch = collate(samples, pad_token_id=pad, padding_side=side)
    length = max(len(s.input_ids) for s in samples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, length)
    for i, s in enumerate(samples):
        n, gap = len(s.input_ids), length - len(s.input_ids)
        real = slice(0, n) if side == "right" else slice(gap, length)
        padding = slice(n, length) if side == "right" else slice(0, gap)
        assert torch.equal(batch["input_ids"][i, real], s.input_ids)
        assert torch.equal(batch["labels"][i, real], s.labels)
        assert (batch["input_ids"][i, padding] == pad).all() and (batch["labels"][i, padding] == IGNORE_INDEX).all()
        assert batch["attention_mask"][i].sum() == n and (batch["attention_mask"][i, padding] == 0).all()
    expected = torch.cat([samples[0].image_inputs["pixel_values"], samples[2].image_inputs["pixel_values"]])
    assert torch.equal(batch["pixel_values"], expected)


def test_collate_text_only_has_no_pixels(processor):
    sample = render_sample(record(turns("how many ?", "3"), image=None), processor, None, 64)
    assert set(collate([sample], pad_token_id=0)) == {"input_ids", "attention_mask", "labels"}
    with pytest.raises(ValueError, match="padding_side"):
        collate([sample], pad_token_id=0, padding_side="middle")
