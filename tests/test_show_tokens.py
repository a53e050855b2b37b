"""`cache show` (issue 25, "Smaller"): every answer token is drawn, on pages of eight, each
page saying which tokens it holds; a token that is a piece of an emoji is titled by that
character and which piece it is (never "�"), and LLaVA's lone "▁" by the space it stands for
(never '')."""

from __future__ import annotations


import pytest
from PIL import Image

from alignkd.cache.inspection.show import sample_figure, token_texts
from tests.support.world import make_image, write_manifest
from test_cache_build import cli

ANSWER = "red green blue yellow circle square triangle cross above below left right"  # 12 tokens


def _byte_level_tokenizer():
    """GPT-2-style byte-level BPE over single bytes only: an emoji is four tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core)


def _sentencepiece_like_tokenizer():
    """Llama's decoding of a lone "▁": the space it stands for is dropped when decoded alone."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "▁": 1, "▁red": 2, "▁▁": 3}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")


def test_emoji_pieces_are_titled_by_their_character_and_part():
    tok = _byte_level_tokenizer()
    ids = tok.encode("ok \U0001F600", add_special_tokens=False)
    assert len(ids) == 7  # o, k, " ", and the emoji's four bytes
    titles = token_texts(tok, ids[3:], context=ids, positions=list(range(3, 7)))
    assert titles == [f"U+1F600 part {k}/4" for k in (1, 2, 3, 4)]
    assert token_texts(tok, ids[:2]) == ["o", "k"]


def test_a_lone_sentencepiece_space_is_titled_as_a_space():
    tok = _sentencepiece_like_tokenizer()
    assert tok.decode([1]) == ""  # what cache show used to title ''
    assert token_texts(tok, [2, 1, 3]) == ["red", "' ' (space)", "'  ' (space)"]


@pytest.fixture(scope="module")
def long_answer_cache(tmp_path_factory, tiny_llava_dir):
    root = tmp_path_factory.mktemp("show-pages")
    make_image(root / "images" / "a.png")
    turns = [{"from": "human", "value": "<image>\ndescribe the picture ?"}, {"from": "gpt", "value": "red"}]
    data = write_manifest(root / "data.json", [
        {"id": "long", "image": "a.png", "conversations": [turns[0], {"from": "gpt", "value": ANSWER}]},
        # "dup" three times, the first a missing_image reject: the two kept are dup#2 and dup#3
        {"id": "dup", "image": "gone.png", "conversations": turns},
        {"id": "dup", "image": "a.png", "conversations": turns}, {"id": "dup", "image": "a.png", "conversations": turns}])
    built = cli("cache", "build", "--teacher", tiny_llava_dir, "--data", data, "--images", root / "images",
                "--out", root / "cache", "--no-progress", "--logit-k", "4")
    assert built.exit_code == 0, built.output
    return root


def test_every_answer_token_is_drawn_on_pages_that_say_which(long_answer_cache):
    root = long_answer_cache
    png = root / "long.png"
    shown = cli("cache", "show", root / "cache", "long", "--out", png)
    page2 = root / "long-p2.png"
    assert shown.exit_code == 0 and shown.output.strip() == f"wrote {png}, {page2}: 8 answer tokens a page", \
        shown.output
    for path in (png, page2):
        with Image.open(path) as drawn:
            assert drawn.format == "PNG"
    words = ANSWER.split() + ["</s>"]  # the template's end of turn is an answer token too
    first, second = sample_figure(str(root / "cache"), "long"), sample_figure(str(root / "cache"), "long", page=1)
    focus, *tokens = first.axes
    assert [ax.get_title() for ax in tokens] == [f"answer token {w}" for w in words[:8]]
    assert focus.get_title().endswith(f"\nanswer tokens 1-8 of {len(words)} (page 1 of 2)")
    focus, *tokens = second.axes
    assert [ax.get_title() for ax in tokens] == [f"answer token {w}" for w in words[8:]]
    assert focus.get_title().endswith(f"\nanswer tokens 9-{len(words)} of {len(words)} (page 2 of 2)")


def test_show_takes_a_key_or_an_id_and_names_the_keys_an_id_shares(long_answer_cache):
    root = long_answer_cache
    shared = cli("cache", "show", root / "cache", "dup", "--out", root / "dup.png")
    assert shared.exit_code == 1 and shared.output.strip() == (
        f"error: id dup names 2 samples of cache {root / 'cache'} (dup#2, dup#3); give one of their sample ids.")
    shown = cli("cache", "show", root / "cache", "dup#3", "--out", root / "dup3.png")
    assert shown.exit_code == 0 and (root / "dup3.png").is_file(), shown.output
