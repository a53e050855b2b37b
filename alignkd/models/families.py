"""Per-family facts, keyed by `config.model_type`.

The capture code never names a model class. It asks this table where the text config
lives, which module receives `inputs_embeds` (the decoder), where layer 0's attention
module sits and which token id marks an image. Adding Qwen-VL or Gemma3 later means
adding a row here (plus any mask quirk the family needs), not touching the stages.
"""

from __future__ import annotations

from dataclasses import dataclass

from alignkd.errors import AlignKDError


@dataclass(frozen=True)
class VLMFamily:
    """Where one VLM family keeps the pieces the capture needs (dotted attribute paths)."""

    name: str
    text_config: str  # on the top-level config
    decoder: str  # on the top-level *ForConditionalGeneration model; its forward takes inputs_embeds
    layers: str  # on the decoder
    attention: str  # on each decoder layer
    image_token_id: str  # on the top-level config

    def get_text_config(self, config):
        return _resolve(config, self.text_config)

    def get_decoder(self, model):
        return _resolve(model, self.decoder)

    def get_attention_modules(self, model) -> list:
        """Every decoder layer's attention module, in layer order."""
        layers = _resolve(self.get_decoder(model), self.layers)
        return [_resolve(layer, self.attention) for layer in layers]

    def get_image_token_id(self, config) -> int:
        return int(_resolve(config, self.image_token_id))


FAMILIES: dict[str, VLMFamily] = {
    "llava": VLMFamily(
        name="llava",
        text_config="text_config",
        decoder="model.language_model",
        layers="layers",
        attention="self_attn",
        image_token_id="image_token_id",
    ),
}


def get_family(config) -> VLMFamily:
    """The family row for `config.model_type`, or a one-sentence refusal naming the supported list."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        raise AlignKDError(
            f"model_type {model_type!r} is not supported by alignkd's capture layer (supported: {supported})."
        )
    return FAMILIES[model_type]


def _resolve(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
