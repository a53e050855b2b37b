"""`cache show` draws each family's real vision-token layout (alignkd/cache/inspection/vision_layout.py).

Each layout is fed a known pattern (all the mass on one token) and must put it on the right
image cell. Where the order comes from a processor or a model function, the test takes the
token order from the real thing, not from a copy of its logic: Qwen's image processor
(which merged cell a bright patch lands in), the Pixtral stand-in and the Idefics3/SmolVLM
and InternVL processors (how many tokens, in which runs, named how), and LLaVA-NeXT /
OneVision's own `pack_image_features` (where every tile token and every image_newline ends
up). One end-to-end run builds a tiny Qwen2-VL cache, deletes the teacher, and draws a
non-square sample through the CLI.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from alignkd.cache.inspection.vision_layout import ImageGrid, image_grids, layout_image, read_settings
from families_tiny import BUILDERS, ROLES


def one_hot(n: int, i: int) -> np.ndarray:
    values = np.zeros(n)
    values[i] = 1.0
    return values


def image(height: int, width: int, bright: tuple[int, int, int, int] | None = None):
    """A grey PIL image; `bright` = (top, left, bottom, right) in pixels is painted white."""
    from PIL import Image

    pixels = np.full((height, width, 3), 60, np.uint8)
    if bright is not None:
        top, left, bottom, right = bright
        pixels[top:bottom, left:right] = 255
    return Image.fromarray(pixels)


def tiny(name: str, **processor_options):
    """(model, processor, image processor, tokenizer, placeholder) of a tiny family from families_tiny."""
    model, tok, image_processor, processor_cls, placeholder = BUILDERS[name](ROLES["student"])
    processor = None
    if processor_cls is not None:
        processor = processor_cls(image_processor=image_processor, tokenizer=tok, chat_template=None,
                                  **processor_options)
    return model, processor, image_processor, tok, placeholder


def grid_of(processor, tok, placeholder: str, img, family: str, tmp_path) -> ImageGrid:
    """The image's ImageGrid as `cache show` builds it: token ids from the real processor,
    settings from the files the processor saves."""
    ids = processor(text=[placeholder], images=[img], return_tensors="pt")["input_ids"][0].numpy()
    processor.save_pretrained(tmp_path / "saved")
    positions = np.flatnonzero(ids == processor.image_token_id)
    sample = SimpleNamespace(input_ids=ids, vision_positions=positions, image_grid_thw=np.zeros(0, np.int32),
                             vision_ranges=lambda: [(0, len(positions))])
    (grid,) = image_grids(sample, family, token_name=tok.convert_ids_to_tokens,
                          image_sizes=[(img.height, img.width)], settings=read_settings(tmp_path / "saved"))
    return grid


def plain_grid(n: int, **kw) -> ImageGrid:
    return ImageGrid(start=0, end=n, positions=np.arange(10, 10 + n), **kw)


def assert_only(picture: np.ndarray, cells: dict[tuple[int, int], float]) -> None:
    expected = np.zeros_like(picture)
    for cell, value in cells.items():
        expected[cell] = value
    np.testing.assert_allclose(picture, expected, atol=1e-12)


# ---------------------------------------------------------------- square: LLaVA, Gemma3, PaliGemma
@pytest.mark.parametrize("family", ["llava", "gemma3", "paligemma"])
def test_square_grid_puts_a_token_on_its_patch(family):
    layout = layout_image(one_hot(16, 6), plain_grid(16), family)
    assert_only(layout.picture, {(1, 2): 1.0})
    assert not layout.not_picture.any() and layout.region == (0.0, 0.0, 1.0, 1.0)


def test_llava_grid_spans_the_centre_crop_or_the_padded_square():
    """CLIP's resize-shortest-edge + centre crop sees the middle of a wide image; LLaVA's
    do_pad sees the image padded to a square."""
    crop = {"do_center_crop": True, "size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}
    wide = plain_grid(16, image_hw=(40, 80), settings={"image_processor": crop})
    assert layout_image(one_hot(16, 0), wide, "llava").region == pytest.approx((0.0, 0.25, 1.0, 0.75))
    padded = plain_grid(16, image_hw=(40, 80), settings={"image_processor": {**crop, "do_pad": True}})
    assert layout_image(one_hot(16, 0), padded, "llava").region == pytest.approx((-0.5, 0.0, 1.5, 1.0))
    assert layout_image(one_hot(16, 0), wide, "gemma3").region == (0.0, 0.0, 1.0, 1.0)  # resized, not cropped


# ---------------------------------------------------------------- merged patch grid: Qwen-VL
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_merged_grid_matches_the_image_processor_order(family):
    """A bright 16 px square (one merged cell of 2x2 8-px patches) at merged row 1, column 2 of a
    32 x 64 image: the token the image processor puts it in lands on picture cell (1, 2)."""
    _, _, image_processor, _, _ = tiny(family)
    out = image_processor(images=[image(32, 64, bright=(16, 32, 32, 48))], return_tensors="np")
    thw = tuple(int(x) for x in out["image_grid_thw"][0])
    brightness = out["pixel_values"].mean(axis=1).reshape(-1, 4).mean(axis=1)  # 4 patches per merged token
    token = int(brightness.argmax())
    layout = layout_image(one_hot(len(brightness), token), plain_grid(len(brightness), thw=thw), family)
    assert thw == (1, 4, 8) and layout.picture.shape == (2, 4)
    assert_only(layout.picture, {(1, 2): 1.0})
    assert "2x4 merged patches (merge 2)" in layout.note


def test_qwen_merge_size_must_agree_with_the_counts():
    layout = layout_image(np.ones(7), plain_grid(7, thw=(1, 4, 8)), "qwen2_vl")
    assert layout.note.startswith("tokens in sequence order (image_grid_thw (1, 4, 8) does not make 7")


# ---------------------------------------------------------------- rows: Mistral3 / Pixtral
def test_pixtral_rows_come_from_runs_between_img_breaks(tmp_path):
    """48 x 64 px at 16 px per merged patch: 3 rows of 4 [IMG], with [IMG_BREAK]/[IMG_END]
    between and after them, which are not vision tokens."""
    _, processor, _, tok, placeholder = tiny("mistral3")
    grid = grid_of(processor, tok, placeholder, image(48, 64), "mistral3", tmp_path)
    assert grid.end == 12 and list(np.diff(grid.positions)) == [1, 1, 1, 2, 1, 1, 1, 2, 1, 1, 1]
    layout = layout_image(one_hot(12, 6), grid, "mistral3")
    assert_only(layout.picture, {(1, 2): 1.0})
    assert not layout.not_picture.any() and layout.note == "3 rows of 4 merged patches"


# ---------------------------------------------------------------- tiles + global view
@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_idefics_tiles_are_placed_by_their_row_col_tokens(family, tmp_path):
    """A 32 x 64 image in 32 px tiles: <row_1_col_1>, <row_1_col_2> (2x2 tokens each), then
    the <global-img> view, which covers the whole image and is spread over it."""
    _, processor, _, tok, placeholder = tiny(family)
    grid = grid_of(processor, tok, placeholder, image(32, 64), family, tmp_path)
    assert grid.run_labels == ("<row_1_col_1>", "<row_1_col_2>", "<global-img>") and grid.end == 12
    last_of_second_tile = layout_image(one_hot(12, 7), grid, family)
    assert_only(last_of_second_tile.picture, {(1, 3): 1.0})
    assert last_of_second_tile.note == "1x2 tiles + global view"
    global_top_left = layout_image(one_hot(12, 8), grid, family)  # global 2x2 cell (0, 0): half the image's top-left
    assert_only(global_top_left.picture, {(0, 0): 0.5, (0, 1): 0.5})


def test_internvl_tiles_follow_the_processor_grid_and_thumbnail(tmp_path):
    """A 32 x 64 image: GotOcr2 picks 1 row x 2 columns of 32 px tiles (2x2 tokens each) and adds
    a thumbnail, all in one run of <IMG_CONTEXT>."""
    _, processor, _, tok, placeholder = tiny("internvl")
    grid = grid_of(processor, tok, placeholder, image(32, 64), "internvl", tmp_path)
    assert grid.end == 12 and set(np.diff(grid.positions)) == {1}
    second_tile = layout_image(one_hot(12, 6), grid, "internvl")  # tile 2, its row 1 column 0
    assert_only(second_tile.picture, {(1, 2): 1.0})
    assert second_tile.note == "1x2 tiles + thumbnail"
    thumbnail = layout_image(one_hot(12, 9), grid, "internvl")  # thumbnail cell (0, 1): the top-right quarter
    assert_only(thumbnail.picture, {(0, 2): 0.5, (0, 3): 0.5})
    tall = grid_of(processor, tok, placeholder, image(64, 32), "internvl", tmp_path / "tall")
    assert layout_image(one_hot(12, 6), tall, "internvl").picture.shape == (4, 2)


@pytest.mark.parametrize("family,options,height,width", [
    ("llava_next", {}, 64, 40),                                        # narrower than its 64x64 canvas: columns cut
    ("llava_next", {}, 40, 64),                                        # wider than its 64x64 canvas: rows cut
    ("llava_onevision", {}, 24, 64),                                   # fills its 32x64 canvas
    ("llava_onevision", {"vision_aspect_ratio": "anyres_max_1"}, 64, 64),  # canvas shrunk to fit 1 base view
])
def test_anyres_layout_matches_pack_image_features(family, options, height, width, tmp_path):
    """Every token of the model's own packing (base view, unpadded tile canvas, image_newline)
    is laid out where pack_image_features put it: canvas tokens on their cell, newlines left
    out, base-view tokens spread over the cells they cover."""
    model, processor, _, tok, placeholder = tiny(family, **options)
    img = image(height, width)
    grid = grid_of(processor, tok, placeholder, img, family, tmp_path)
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    sizes = torch.tensor([[height, width]])
    rows_of_tiles, cols_of_tiles = get_anyres_image_grid_shape(sizes[0], model.config.image_grid_pinpoints,
                                                               vision.image_size)
    # feature = (kind, row, col): kind 0 base view, 1 tile canvas; the newline is (2, -1, -1)
    base = torch.tensor([[0.0, r, c] for r in range(side) for c in range(side)])
    tiles = [torch.tensor([[1.0, tr * side + r, tc * side + c] for r in range(side) for c in range(side)])
             for tr in range(rows_of_tiles) for tc in range(cols_of_tiles)]
    features = torch.stack([base, *tiles])
    pack = dict(image_sizes=sizes, image_newline=torch.tensor([2.0, -1.0, -1.0]))
    if family == "llava_next":
        pack["vision_feature_select_strategy"] = "default"
    else:
        pack["vision_aspect_ratio"] = options.get("vision_aspect_ratio", "anyres_max_9")
    (packed,), _ = model.model.pack_image_features([features], **pack)
    packed = packed.numpy()
    assert grid.end == len(packed)  # the processor's token count is the model's
    newline = packed[:, 0] == 2
    canvas = packed[:, 0] == 1
    first = layout_image(one_hot(len(packed), 0), grid, family)
    assert not first.note.startswith("tokens in sequence order"), first.note
    np.testing.assert_array_equal(first.not_picture, newline)
    rows, cols = first.picture.shape
    assert rows == newline.sum() and rows * cols == canvas.sum()
    shrunk = options.get("vision_aspect_ratio") == "anyres_max_1"
    top, left = packed[canvas, 1].min(), packed[canvas, 2].min()
    for token in np.flatnonzero(canvas)[:: 7 if shrunk else 1]:
        picture = layout_image(one_hot(len(packed), token), grid, family).picture
        if shrunk:  # the shrink blends coordinates: only the canvas shape and the newlines are exact
            assert picture.sum() == pytest.approx(1.0)
            continue
        assert_only(picture, {(int(packed[token, 1] - top), int(packed[token, 2] - left)): 1.0})
    for token in np.flatnonzero(newline):
        assert layout_image(one_hot(len(packed), token), grid, family).picture.sum() == 0.0
    spread = layout_image(one_hot(len(packed), 0), grid, family).picture  # base cell (0, 0)
    assert spread.sum() == pytest.approx(1.0) and spread[0, 0] > 0 and spread[-1, -1] == 0


# ---------------------------------------------------------------- what the cache cannot say
def test_missing_setting_falls_back_to_token_order_and_says_why():
    layout = layout_image(np.arange(10.0), plain_grid(10), "internvl")
    assert layout.note == "tokens in sequence order (the processor's image_seq_length is not in the cache)"
    assert layout.picture.shape == (3, 4)
    np.testing.assert_array_equal(layout.picture.ravel()[:10], np.arange(10.0))
    assert np.isnan(layout.picture.ravel()[10:]).all()
    assert layout_image(np.arange(10.0), plain_grid(10), "llava").note.startswith("tokens in sequence order (10 tokens")
    assert "model type 'blip'" in layout_image(np.arange(4.0), plain_grid(4), "blip").note
    crops = ImageGrid(start=0, end=8, positions=np.r_[10:14, 20:24])  # Gemma3 pan-and-scan: two runs
    assert "several runs" in layout_image(np.arange(8.0), crops, "gemma3").note


def test_read_settings_takes_published_and_nested_layouts(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"merge_size": 2}))
    assert read_settings(tmp_path) == {"processor": {}, "image_processor": {"merge_size": 2}}
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_seq_length": 4, "image_processor": {"a": 1}}))
    assert read_settings(tmp_path) == {"processor": {"image_seq_length": 4}, "image_processor": {"a": 1}}
    assert read_settings(tmp_path / "nowhere") == {}


# ---------------------------------------------------------------- end to end through the CLI
def byte_level_tokenizer(directory) -> None:
    """Rewrite a word-level tokenizer.json as Qwen's byte-level BPE spells its pieces: the same
    ids, each word stored as "Ġword" and decoded by the ByteLevel decoder to " word"."""
    path = directory / "tokenizer.json"
    doc = json.loads(path.read_text())
    special = {t["content"] for t in doc["added_tokens"]}
    doc["model"]["vocab"] = {(w if w in special else "\u0120" + w): i for w, i in doc["model"]["vocab"].items()}
    doc["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    path.write_text(json.dumps(doc))


def test_show_draws_qwen_grid_from_the_cache_alone(tmp_path):
    from PIL import Image

    from alignkd.cache.reader import open_cache
    from alignkd.cache.inspection.show import sample_figure
    from families_tiny import build_family
    from test_cache_build import cli
    from test_families import _data

    teacher = build_family("qwen2_vl", tmp_path / "teacher", "teacher")
    data, images = _data(tmp_path)
    cache = tmp_path / "cache"
    built = cli("cache", "build", "--teacher", teacher, "--data", data, "--images", images, "--out", cache,
                "--no-progress", "--logit-k", "4")
    assert built.exit_code == 0, built.output
    assert (cache / "tokenizer" / "preprocessor_config.json").read_bytes() == \
        (teacher / "preprocessor_config.json").read_bytes()
    shutil.rmtree(teacher)  # show needs only the cache
    byte_level_tokenizer(cache / "tokenizer")

    png = tmp_path / "f1.png"
    shown = cli("cache", "show", cache, "f1", "--out", png)  # f1 is 32 x 64 px
    assert shown.exit_code == 0 and shown.output.strip() == f"wrote {png}", shown.output
    with Image.open(png) as drawn:
        assert drawn.format == "PNG" and drawn.width > 3 * drawn.height / 2

    sample = open_cache(cache)[open_cache(cache).index_of("f1")]
    assert list(sample.image_grid_thw) == [1, 4, 8]
    fig = sample_figure(str(cache), "f1")
    focus_panel, *answer_panels = fig.axes
    np.testing.assert_allclose(focus_panel.images[-1].get_array(), sample.focus.reshape(2, 4), rtol=1e-6)
    assert focus_panel.get_title() == "f1: text focus\n2x4 merged patches (merge 2)"
    assert [ax.get_title() for ax in answer_panels] == \
        ["answer token blue", "answer token circle", "answer token </s>"]
    head_mean = sample.attn.mean(axis=1)
    row = list(sample.text_positions).index(int(np.flatnonzero(sample.label_mask)[0]))
    np.testing.assert_allclose(answer_panels[0].images[-1].get_array(), head_mean[row].reshape(2, 4), rtol=1e-6)
