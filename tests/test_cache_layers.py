"""The cache package's dependency line: reading, checking, querying and inspecting a cache
never imports the teacher side (alignkd.cache.teacher) nor torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

READ_SIDE = ["alignkd.cache", "alignkd.cache.reader", "alignkd.cache.verify", "alignkd.cache.catalog",
             "alignkd.cache.writer", "alignkd.cache.inspection.stats", "alignkd.cache.inspection.show",
             "alignkd.cache.inspection.tables", "alignkd.cache.inspection.vision_layout"]


def test_the_read_side_of_the_cache_loads_no_teacher_code_and_no_torch():
    probe = ("import importlib, sys\n"
             f"for name in {READ_SIDE!r}: importlib.import_module(name)\n"
             "print(sorted(m for m in sys.modules if m.startswith('alignkd.cache.teacher') "
             "or m.split('.')[0] in ('torch', 'transformers')))\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_no_module_of_the_format_layer_names_the_teacher_side():
    layer = [p for p in (REPO / "alignkd" / "cache").rglob("*.py")
             if "teacher" not in p.relative_to(REPO / "alignkd" / "cache").parts]
    assert layer
    for path in layer:
        imports = [line.strip() for line in path.read_text().splitlines()
                   if line.strip().startswith(("from alignkd.cache.teacher", "import alignkd.cache.teacher"))]
        assert not imports, (path, imports)
