"""Fingerprints that tie a cache to the exact teacher and tokenizer that wrote it.

Hashing the full weights of a 7B teacher would read 14 GB before the first sample,
so the weights fingerprint hashes each safetensors file's header (every tensor's
name, dtype, shape and byte offsets) together with the file size. Retraining or
swapping a checkpoint changes the header or the size in practice; a bit flip inside
a tensor would not, which is an accepted gap for a build-time identity check.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "processor_config.json",
    "preprocessor_config.json",
    "chat_template.jinja",
    "chat_template.json",
)


def config_hash(model_dir: Path) -> str:
    """sha256 of config.json in canonical form (sorted keys), so formatting does not matter."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def weights_fingerprint(model_dir: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with path.open("rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            digest.update(path.name.encode())
            digest.update(fh.read(header_len))
        digest.update(str(path.stat().st_size).encode())
    return digest.hexdigest()


def tokenizer_fingerprint(model_dir: Path) -> str:
    """sha256 over the tokenizer and processor files that exist in the model directory."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = Path(model_dir) / name
        if path.exists():
            digest.update(name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def teacher_identity(model_dir: Path, *, repo_id: str | None = None, revision: str | None = None) -> dict:
    """What cache.json records about the teacher. A teacher named by hub id also records the
    id and the commit hash of the snapshot that ran; a local directory records neither."""
    model_dir = Path(model_dir).resolve()
    hub = {"repo_id": repo_id, "revision": revision} if repo_id is not None else {}
    return {
        "path": str(model_dir),
        **hub,
        "config_sha256": config_hash(model_dir),
        "weights_fingerprint": weights_fingerprint(model_dir),
        "tokenizer_fingerprint": tokenizer_fingerprint(model_dir),
    }
