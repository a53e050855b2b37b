"""One forward that returns what Align-KD distils: logits, layer-0 text→vision attention
and the projected vision tokens, for a padded batch (left or right padding).

The vision tokens are read from the decoder's `inputs_embeds` at the image positions (a
forward pre-hook), i.e. exactly what the language model consumed. A hook on the
projector would be wrong for families that reorder or unpad after projecting.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from alignkd.errors import AlignKDError
from alignkd.models.attention_probe import install_probe
from alignkd.models.families import get_family


@dataclass
class CaptureOutput:
    """Tensors from one captured forward. B batch, L sequence, H heads, Nv vision tokens."""

    logits: torch.Tensor  # [B, L, V]
    image_mask: torch.Tensor  # [B, L] bool, image-token positions
    vision_tokens: torch.Tensor  # [B, Nv, d] decoder inputs at the image positions, in order (0 past Nv_b)
    vision_positions: torch.Tensor  # [B, Nv] long, -1 past sample b's own count Nv_b
    vision_mask: torch.Tensor  # [B, Nv] bool, the first Nv_b entries of row b
    text_query_mask: torch.Tensor  # [B, L] bool, valid text positions after the last image token (all: text only)
    attn_text_vision: torch.Tensor  # [B, H, L, Nv] layer-0 probabilities (softmax over all keys; 0 past Nv_b)
    layer0_attn: torch.Tensor | None = None  # [B, H, L, L] only with return_full_layer0=True
    loss: torch.Tensor | None = None  # the model's own loss when the batch has labels
    model_output: Any = None  # the raw transformers output, for anything else


def check_gradient_checkpointing(model) -> None:
    """Refuse reentrant checkpointing: it silently cuts the attention loss's gradient."""
    for module in model.modules():
        if not getattr(module, "gradient_checkpointing", False):
            continue
        func = getattr(module, "_gradient_checkpointing_func", None)
        # transformers 5.x stores the kwargs as a functools.partial over torch's checkpoint.
        if getattr(func, "keywords", {}).get("use_reentrant") is not False:
            raise AlignKDError(
                "Gradient checkpointing must be non-reentrant for the layer-0 attention loss to get a "
                "gradient: enable it with use_reentrant=False (e.g. "
                "model.activation_checkpointing_enable(activation_checkpointing_kwargs={'use_reentrant': False}))."
            )


def capture_forward(model, batch: dict, *, keep_graph: bool = False,
                    return_full_layer0: bool = False) -> CaptureOutput:
    """Run `model` on `batch` (processor output, optionally labels) and capture the Align-KD tensors.

    keep_graph=False runs under no_grad (teacher); keep_graph=True keeps autograd (student).
    """
    family = get_family(model.config)
    if model.training:
        check_gradient_checkpointing(model)
    input_ids = batch["input_ids"]
    image_mask = input_ids == family.get_image_token_id(model.config)
    positions = vision_positions(image_mask)  # refuses before paying for a forward
    out, weights, embeds = _run_listening(model, family, batch, keep_graph)
    # A model dispatched over devices (accelerate's device map) leaves layer 0's weights,
    # the decoder inputs and the logits wherever their modules ran; gather them where the
    # inputs are. A no-op on one device.
    here = input_ids.device
    weights, embeds, logits = weights.to(here), embeds.to(here), out.logits.to(here)

    attention_mask = batch.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None]
    valid = positions >= 0
    safe = positions.clamp(min=0)
    index = safe[:, None, None, :].expand(-1, weights.shape[1], weights.shape[2], -1)
    attn = weights.gather(3, index)
    return CaptureOutput(
        logits=logits,
        image_mask=image_mask,
        vision_tokens=torch.where(valid[..., None], embeds[rows, safe], 0.0),
        vision_positions=positions,
        vision_mask=valid,
        text_query_mask=text_query_mask(image_mask, attention_mask),
        attn_text_vision=torch.where(valid[:, None, None, :], attn, 0.0),
        layer0_attn=weights if return_full_layer0 else None,
        loss=getattr(out, "loss", None),
        model_output=out,
    )


def _run_listening(model, family, batch: dict, keep_graph: bool):
    """Forward with the probe listening; returns (output, layer-0 weights, decoder inputs_embeds)."""
    state = install_probe(model)
    embeds: dict[str, torch.Tensor] = {}

    def grab_inputs_embeds(_module, args, kwargs):
        embeds["x"] = kwargs["inputs_embeds"] if "inputs_embeds" in kwargs else args[0]

    handle = family.get_decoder(model).register_forward_pre_hook(grab_inputs_embeds, with_kwargs=True)
    grad = contextlib.nullcontext() if keep_graph else torch.no_grad()
    state.active, state.layer0_weights = True, None
    try:
        with grad:
            out = model(**batch, use_cache=False, return_dict=True)
    finally:
        state.active = False
        handle.remove()
    weights, state.layer0_weights = state.layer0_weights, None
    if weights is None or "x" not in embeds:
        raise RuntimeError("capture hooks did not fire; is the text attention routed through the probe?")
    return out, weights, embeds["x"]


def vision_positions(image_mask: torch.Tensor) -> torch.Tensor:
    """[B, max Nv_b] image-token positions in sequence order, -1 past each sample's own count.

    Counts may differ per sample (dynamic resolution, any-res tiles, several images, none
    for a text-only sample) and the positions need not be contiguous (tiles, row
    separators, text between images).
    """
    counts = image_mask.sum(dim=1)
    # A stable sort puts the image positions first, each row in increasing order.
    order = torch.argsort((~image_mask).to(torch.int8), dim=1, stable=True)[:, : int(counts.max()) if counts.numel() else 0]
    slot = torch.arange(order.shape[1], device=order.device)
    return torch.where(slot[None] < counts[:, None], order, -1)


def text_query_mask(image_mask: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Valid (attention_mask 1) positions strictly after each sample's last image token: the
    text that sees every image (every valid position of a text-only sample)."""
    length = image_mask.shape[1]
    idx = torch.arange(length, device=image_mask.device).expand_as(image_mask)
    last_image = torch.where(image_mask, idx, torch.full_like(idx, -1)).max(dim=1).values
    return (idx > last_image[:, None]) & attention_mask.bool()
