"""VLM capture shared by the cache and distill stages.

`load_vlm` loads a local model directory; `capture_forward` runs one padded batch and
returns logits, layer-0 text→vision attention and projected vision tokens.

Names are imported lazily: the family table (`families.py`, plain data) is read by the
torch-free cache side (`cache show`'s vision layouts), so importing it must not load torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ATTN_NAME": "attention_probe", "ProbeState": "attention_probe", "install_probe": "attention_probe",
    "probe_state": "attention_probe", "remove_probe": "attention_probe",
    "CaptureOutput": "capture", "capture_forward": "capture", "check_gradient_checkpointing": "capture",
    "FAMILIES": "families", "VLMFamily": "families", "get_family": "families",
    "LoadedVLM": "loading", "load_vlm": "loading",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"alignkd.models.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'alignkd.models' has no attribute {name!r}")
