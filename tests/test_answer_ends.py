"""Every assistant turn's labels end with the token the model stops on (issue 25).

A template that closes a turn itself (the tiny families' `...{{ eos_token }}`) is left as it
wrote it; a template that does not (llava-1.5-7b-hf's, copied below in its published form)
gets the tokenizer's EOS after each answer, labelled, so the student learns to stop.
"""

from __future__ import annotations

import copy

import pytest

from alignkd.data import read_manifest, render_sample
from alignkd.data.sample import IGNORE_INDEX
from alignkd.models import load_vlm
from tests.support.world import make_image, write_manifest

# llava-hf/llava-1.5-7b-hf's chat_template.json (2024), whitespace as published: no </s> after
# an assistant turn, so its labels used to end in the answer's last word.
LLAVA_15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@pytest.fixture
def two_turn_record(tmp_path):
    make_image(tmp_path / "images" / "a.png")
    conv = [{"from": "human", "value": "<image>\nwhat is the colour of this image ?"},
            {"from": "gpt", "value": "red"},
            {"from": "human", "value": "how many ?"},
            {"from": "gpt", "value": "3"}]
    data = write_manifest(tmp_path / "data.json", [{"id": "a", "image": "a.png", "conversations": conv}])
    return read_manifest(data)[0], tmp_path / "images"


def _turn_ends(sample) -> list[int]:
    """The last labelled id of each run of labelled positions (one run per assistant turn)."""
    labelled = (sample.labels != IGNORE_INDEX).tolist()
    return [int(sample.input_ids[i]) for i, on in enumerate(labelled)
            if on and (i + 1 == len(labelled) or not labelled[i + 1])]


def test_a_template_without_eos_gets_it_after_every_answer(tiny_llava_dir, two_turn_record):
    vlm = load_vlm(tiny_llava_dir)
    processor = copy.deepcopy(vlm.processor)
    processor.chat_template = LLAVA_15_TEMPLATE
    record, images = two_turn_record
    sample = render_sample(record, processor, images, 512)
    eos = processor.tokenizer.eos_token_id
    assert _turn_ends(sample) == [eos, eos]
    assert int((sample.input_ids == eos).sum()) == 2  # once per answer, nowhere else
    answers = processor.tokenizer.convert_tokens_to_ids(["red", "3"])
    labelled = sample.input_ids[sample.labels != IGNORE_INDEX].tolist()
    assert [t for t in labelled if t != eos] == answers  # the answers themselves, untouched


def test_a_template_that_closes_its_turns_is_left_as_written(tiny_llava_dir, two_turn_record):
    vlm = load_vlm(tiny_llava_dir)
    record, images = two_turn_record
    sample = render_sample(record, vlm.processor, images, 512)
    eos = vlm.processor.tokenizer.eos_token_id
    assert _turn_ends(sample) == [eos, eos]
    assert int((sample.input_ids == eos).sum()) == 2  # the template's own, none added
