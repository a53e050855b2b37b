"""A family is one row of alignkd/models/families.py: its vision layout and its per-token
inputs are fields there, checked against the tables they name (the layout kinds `cache show`
draws, the cache's replayed columns), and the row is plain data that the torch-free cache
side reads without loading torch. docs/design.md, "How to add a family", says what a row takes.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np

from alignkd.cache.record import SampleRecord
from alignkd.cache.inspection.vision_layout import LAYOUT_KINDS, ImageGrid, layout_image
from alignkd.models.families import FAMILIES, VLMFamily
from alignkd.storage_schemas import REPLAYED_COLUMNS, SAMPLE_SCHEMA, TOKEN_INPUT_COLUMNS


def test_every_row_names_a_known_layout_and_cached_token_inputs():
    for name, row in FAMILIES.items():
        assert row.vision_layout in LAYOUT_KINDS, name
        assert set(row.token_inputs) <= set(TOKEN_INPUT_COLUMNS), name
    # each replayed column is a Parquet column and a record field, so the writer and reader carry it
    fields = {f.name for f in dataclasses.fields(SampleRecord)}
    for column in REPLAYED_COLUMNS:
        assert column in fields and SAMPLE_SCHEMA.field(column).type.value_type.bit_width == 32


def test_the_layouts_are_those_the_rows_declare():
    kinds = {name: row.vision_layout for name, row in FAMILIES.items()}
    assert kinds == {
        "qwen2_vl": "merged", "qwen2_5_vl": "merged", "qwen3_vl": "merged", "mistral3": "rows",
        "idefics3": "named_tiles", "smolvlm": "named_tiles", "internvl": "thumbnail_tiles",
        "llava_next": "anyres", "llava_onevision": "anyres", "llava": "square", "gemma3": "square",
        "paligemma": "square"}


def test_a_new_row_is_drawn_by_the_layout_it_names(monkeypatch):
    """What adding a family takes for `cache show`: the row, nothing in vision_layout.py."""
    positions = np.r_[np.arange(10, 13), np.arange(14, 17)]  # two runs of 3: two rows
    grid = ImageGrid(start=0, end=6, positions=positions)
    assert layout_image(np.arange(6.0), grid, "newvlm").note.startswith("tokens in sequence order (no layout")
    monkeypatch.setitem(FAMILIES, "newvlm", VLMFamily("newvlm", vision_layout="rows"))
    layout = layout_image(np.arange(6.0), grid, "newvlm")
    assert layout.note == "2 rows of 3 merged patches"
    np.testing.assert_array_equal(layout.picture, [[0, 1, 2], [3, 4, 5]])


def test_the_family_table_and_vision_layouts_load_without_torch():
    code = ("import sys\n"
            "import numpy as np\n"
            "from alignkd.cache.inspection.vision_layout import ImageGrid, layout_image\n"
            "from alignkd.models.families import FAMILIES\n"
            "layout_image(np.ones(4), ImageGrid(0, 4, np.arange(4)), 'llava')\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
