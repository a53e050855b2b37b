"""VLM capture shared by the cache and distill stages.

`load_vlm` loads a local model directory; `capture_forward` runs one padded batch and
returns logits, layer-0 text→vision attention and projected vision tokens.
"""

from alignkd.models.attention_probe import ATTN_NAME, ProbeState, install_probe, probe_state, remove_probe
from alignkd.models.capture import CaptureOutput, capture_forward, check_gradient_checkpointing
from alignkd.models.families import FAMILIES, VLMFamily, get_family
from alignkd.models.loading import LoadedVLM, load_vlm

__all__ = [
    "ATTN_NAME",
    "FAMILIES",
    "CaptureOutput",
    "LoadedVLM",
    "ProbeState",
    "VLMFamily",
    "capture_forward",
    "check_gradient_checkpointing",
    "get_family",
    "install_probe",
    "load_vlm",
    "probe_state",
    "remove_probe",
]
