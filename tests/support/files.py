"""A directory's exact contents, and the files a user keeps beside a cache, for the
"touches nothing it did not write" checks."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

USER_FILES = {"thesis.txt": b"four years of work\n", "src/m.py": b"x = 1\n", ".notes": b"hidden, still the user's\n"}


def snapshot(root: Path) -> dict[str, str]:
    """Every file and link under root (links not followed): relative path -> sha256 of its bytes,
    or the link's target."""
    found = {}
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(parent) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                found[rel] = "link:" + os.readlink(path)
            elif path.is_file():
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def plant_user_files(root: Path, extra: tuple[str, ...] = ()) -> None:
    """What a user keeps in a directory they point alignkd at (and `extra` paths, each holding its own name)."""
    for rel, data in {**USER_FILES, **{rel: rel.encode() for rel in extra}}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
