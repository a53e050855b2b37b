"""Layer-0 attention probabilities at sdpa cost everywhere else.

Align-KD needs one L×L map per sample: layer 0's softmax attention. `output_attentions`
would force eager attention in every layer, materialising L×L for all of them (the
official code's out-of-memory problem). Instead we register one attention function by
name and give it to the text config only. It runs the model file's own
`eager_attention_forward` for the layer-0 module, so the probabilities are exactly what
a full-eager forward returns, and `sdpa_attention_forward` for every other call, or the
model file's eager attention again where the family row says sdpa cannot run this text
model (Gemma2's softcapping in PaliGemma2: `VLMFamily.eager_text_models`).

The name is also registered in `AttentionMaskInterface` with `sdpa_mask`: the decoder
builds its mask through that table, and an unknown name there silently drops padding.

Per-model state lives in a WeakKeyDictionary keyed by attention module, so a teacher and
a student can be probed in one process and a deleted model frees its entry.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from alignkd.models.families import get_family

ATTN_NAME = "alignkd_layer0_probe"


@dataclass
class ProbeState:
    """One model's probe: whether a capture is listening, what it caught, call counts."""

    previous_impl: str
    eager_elsewhere: bool = False  # every layer eager (sdpa cannot run this text model)
    active: bool = False
    layer0_weights: torch.Tensor | None = None
    eager_calls: int = 0
    sdpa_calls: int = 0


# attention module -> (its model's state, whether it is layer 0). Values never reference
# modules, otherwise the weak keys would be kept alive by their own values.
_MODULES: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[ProbeState, bool]]" = weakref.WeakKeyDictionary()


def probe_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                            is_causal=None, **kwargs):
    """The registered attention function: eager (weights kept) for layer 0, sdpa otherwise
    (eager again where the family row says sdpa cannot run the text model)."""
    entry = _MODULES.get(module)
    if entry is None or not entry[1]:
        if entry is not None and entry[0].eager_elsewhere:
            entry[0].eager_calls += 1
            return _run_eager(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
        if entry is not None:
            entry[0].sdpa_calls += 1
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    state = entry[0]
    state.eager_calls += 1
    output, weights = _run_eager(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    # Only while capture_forward listens: a non-reentrant checkpoint recomputes layer 0
    # during backward, and that replay must not overwrite what the capture returned.
    if state.active:
        state.layer0_weights = weights
    return output, weights


def _run_eager(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs):
    mask = additive_mask(module, query, key, attention_mask, is_causal)
    return _eager_of(module)(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)


def _eager_of(module):
    """The model file's own eager attention, whose weights are what output_attentions returns."""
    return sys.modules[type(module).__module__].eager_attention_forward


def additive_mask(module, query, key, attention_mask, is_causal):
    """The eager (0 / dtype-min) form of the mask sdpa would have used, causal skip included."""
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool:
            return attention_mask
        zero = torch.zeros((), device=query.device, dtype=query.dtype)
        return torch.where(attention_mask, zero, torch.finfo(query.dtype).min)
    # sdpa_mask returns None for an unpadded causal batch and sdpa then sets is_causal;
    # mirror sdpa_attention_forward's rule, including upper-left alignment.
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q_len, kv_len = query.shape[2], key.shape[2]
    if not (q_len > 1 and is_causal):
        return None
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril()
    zero = torch.zeros((), device=query.device, dtype=query.dtype)
    return torch.where(allowed, zero, torch.finfo(query.dtype).min)[None, None]


def _register() -> None:
    # Registration is global and idempotent; done on first install, not at import.
    if ATTN_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_NAME, probe_attention_forward)
        AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def install_probe(model) -> ProbeState:
    """Route `model`'s text attention through the probe (idempotent) and return its state."""
    family = get_family(model.config)
    modules = family.get_attention_modules(model)
    entry = _MODULES.get(modules[0])
    if entry is not None:
        return entry[0]
    _register()
    text_config = family.get_text_config(model.config)
    state = ProbeState(previous_impl=text_config._attn_implementation,
                       eager_elsewhere=family.get_attn_implementation(model.config) == "eager")
    model.set_attn_implementation({family.text_config: ATTN_NAME})
    if text_config._attn_implementation != ATTN_NAME:
        raise RuntimeError(f"could not set {ATTN_NAME} on {type(model).__name__}'s text config")
    for i, module in enumerate(modules):
        _MODULES[module] = (state, i == 0)
    return state


def remove_probe(model) -> None:
    """Restore the text config's previous attention implementation and forget the model."""
    family = get_family(model.config)
    modules = family.get_attention_modules(model)
    entry = _MODULES.get(modules[0])
    if entry is None:
        return
    model.set_attn_implementation({family.text_config: entry[0].previous_impl})
    for module in modules:
        _MODULES.pop(module, None)


def probe_state(model) -> ProbeState | None:
    """The model's probe state, or None when no probe is installed."""
    entry = _MODULES.get(get_family(model.config).get_attention_modules(model)[0])
    return None if entry is None else entry[0]
