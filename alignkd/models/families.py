"""Per-family facts, keyed by `config.model_type`.

The capture code never names a model class. It asks this table where the text config
lives, which module receives `inputs_embeds` (the decoder), where layer 0's attention
module sits, which token id marks an image, and which of a family's quirks apply; `cache
show` asks it how the family lays out an image's vision tokens. A new family is a new row
here (docs/design.md, "How to add a family"), not an edit to the stages. This module is
plain data (no torch), so the cache side reads it too.

Quirks a row can declare:
- `token_inputs`: per-token model inputs the processor makes besides `input_ids` and
  `attention_mask` that change the forward (Qwen-VL's `mm_token_type_ids` feed its 3-D
  rope positions; Gemma3's and PaliGemma's `token_type_ids` make the image block, or the
  prefix, bidirectional). The cache stores them so the student replays exactly the
  teacher's inputs; each is one of the cache's columns `TOKEN_INPUT_COLUMNS`
  (alignkd/storage_schemas), and a new one is a new column there (a format change).
- `vision_layout`: where each vision token sits in its image, for `cache show`: one of
  `alignkd.cache.inspection.vision_layout.LAYOUT_KINDS` ("square", "merged", "rows", "named_tiles",
  "thumbnail_tiles", "anyres"; that module describes each).
- `prompt_format`: how a LLaVA-style record becomes text. "chat_template" (the
  processor's own template) for every family except PaliGemma, whose checkpoints ship
  no template and which is trained as a prefix-LM: "prefix_lm" renders the prompt as a
  bidirectional prefix and the answer as a causal suffix (`alignkd.data.prefix_lm`).
- `eager_text_models`: text-model types whose attention sdpa cannot run (Gemma2's logit
  softcapping, which PaliGemma2 uses): such a model loads with eager attention and the
  probe runs eager in every layer, not just layer 0.
- `multi_image`: whether alignkd takes records with several images for the family. It is
  True where a two-image record's cache equals the live teacher (tests/test_families.py,
  tests/test_records.py); PaliGemma, a prefix-LM with its image first, takes one, and a
  record with several is a reject naming the family.
Everything else (several image runs per image, LLaVA-NeXT's image_newline rows, a
per-sample vision-token count) needs no row field: the capture reads image positions
from `input_ids`, whatever their number and layout.
"""

from __future__ import annotations

from dataclasses import dataclass

from alignkd.errors import AlignKDError


@dataclass(frozen=True)
class VLMFamily:
    """Where one VLM family keeps the pieces the capture needs (dotted attribute paths)."""

    name: str
    decoder: str = "model.language_model"  # on the *ForConditionalGeneration model; takes inputs_embeds
    text_config: str = "text_config"  # on the top-level config
    layers: str = "layers"  # on the decoder
    attention: str = "self_attn"  # on each decoder layer
    image_token_id: str = "image_token_id"  # on the top-level config
    vision_tower: str = "model.vision_tower"  # what `distill --freeze vision_tower` freezes
    token_inputs: tuple[str, ...] = ()
    prompt_format: str = "chat_template"  # or "prefix_lm"
    eager_text_models: tuple[str, ...] = ()
    multi_image: bool = False
    vision_layout: str = "square"

    def render_rules(self, config):
        """The facts the data layer's renderer needs (it does not import this module)."""
        from alignkd.data.render import RenderRules

        return RenderRules(family=self.name, prompt_format=self.prompt_format, multi_image=self.multi_image,
                           image_token_id=self.get_image_token_id(config))

    def get_text_config(self, config):
        return _resolve(config, self.text_config)

    def get_decoder(self, model):
        return _resolve(model, self.decoder)

    def get_vision_tower(self, model):
        return _resolve(model, self.vision_tower)

    def get_attention_modules(self, model) -> list:
        """Every decoder layer's attention module, in layer order."""
        layers = _resolve(self.get_decoder(model), self.layers)
        return [_resolve(layer, self.attention) for layer in layers]

    def get_image_token_id(self, config) -> int:
        return int(_resolve(config, self.image_token_id))

    def get_attn_implementation(self, config) -> str:
        """What the model loads with and what the probe runs outside layer 0: sdpa, or
        eager where the text model's attention has something sdpa lacks (softcapping)."""
        text_type = getattr(self.get_text_config(config), "model_type", None)
        return "eager" if text_type in self.eager_text_models else "sdpa"


_QWEN = {"token_inputs": ("mm_token_type_ids",), "vision_tower": "model.visual", "multi_image": True,
         "vision_layout": "merged"}
_IDEFICS = {"decoder": "model.text_model", "vision_tower": "model.vision_model", "multi_image": True,
            "vision_layout": "named_tiles"}

FAMILIES: dict[str, VLMFamily] = {
    "llava": VLMFamily("llava", multi_image=True),
    "llava_next": VLMFamily("llava_next", multi_image=True, vision_layout="anyres"),
    "llava_onevision": VLMFamily("llava_onevision", multi_image=True, vision_layout="anyres"),
    "qwen2_vl": VLMFamily("qwen2_vl", **_QWEN),
    "qwen2_5_vl": VLMFamily("qwen2_5_vl", **_QWEN),
    "qwen3_vl": VLMFamily("qwen3_vl", **_QWEN),
    "gemma3": VLMFamily("gemma3", token_inputs=("token_type_ids",), multi_image=True),
    "idefics3": VLMFamily("idefics3", **_IDEFICS),
    "smolvlm": VLMFamily("smolvlm", **_IDEFICS),
    "internvl": VLMFamily("internvl", multi_image=True, vision_layout="thumbnail_tiles"),
    "mistral3": VLMFamily("mistral3", multi_image=True, vision_layout="rows"),
    # PaliGemma (Gemma LM) and PaliGemma2 (Gemma2 LM) share the model_type
    "paligemma": VLMFamily("paligemma", token_inputs=("token_type_ids",), prompt_format="prefix_lm",
                           eager_text_models=("gemma2",)),
}

# Families known not to fit the layer-0 capture, with the reason shown to the user.
UNSUPPORTED: dict[str, str] = {
    "llama4": "its chunked local attention and interleaved no-rope layers are not handled by the layer-0 probe yet",
    "mllama": "its images enter through cross-attention layers, so layer 0 has no text-to-vision attention",
    "gemma3n": "its per-layer inputs and audio tower are not handled by the capture yet",
}


def get_family(config) -> VLMFamily:
    """The family row for `config.model_type`, or a one-sentence refusal naming the family."""
    model_type = getattr(config, "model_type", None)
    if model_type in UNSUPPORTED:
        raise AlignKDError(f"model family {model_type!r} is not supported by alignkd: {UNSUPPORTED[model_type]}.")
    if model_type not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        raise AlignKDError(
            f"model family {model_type!r} is not supported by alignkd's capture layer (supported: {supported})."
        )
    return FAMILIES[model_type]


def _resolve(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
