"""The layer-0 kit: what layer-0 attention is a function of, cut out of a teacher once.

Layer 0's attention probabilities depend on the decoder inputs (token embeddings at text
positions, the projected vision tokens at image positions), the positions and masks the
VLM builds from `input_ids` and its per-token columns, and a handful of weights: the
embedding table, layer 0's input norm and query/key projections (and their norms), the
rotary buffers. `extract_kit` saves exactly those, with the teacher's config cut to one
decoder layer, as two byte strings (a config json and a safetensors file).

`Layer0Kit` rebuilds the teacher's own model class from that config on the meta device,
assigns the kit's tensors (everything else, the vision tower, MLP, lm_head, stays meta
and is never touched) and runs the VLM's own forward without pixels: the family's own
code makes the positions (Qwen's mrope via `get_rope_index` on the stored
`image_grid_thw` and `mm_token_type_ids`) and the masks (Gemma3's bidirectional image
blocks, PaliGemma's prefix-LM, sliding windows, padding). A pre-hook on the decoder puts
the cached vision tokens at the image positions, i.e. the decoder receives exactly the
`inputs_embeds` the capture saw. Layer 0's attention runs the model file's own eager
attention (as the probe does, softcapping included) and stops the forward by raising,
so nothing after the probabilities is computed; the value projection is a stand-in that
returns zeros, since the probabilities never depend on it. When only some query rows are
wanted (`text_vision_rows`), the query projection runs on those rows alone
(`QueryRowsProjection`); keys stay at every position, since each row's softmax reads them all.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import torch
from torch import nn

from alignkd.errors import AlignKDError
from alignkd.models.attention_probe import _eager_of, _run_eager, additive_mask
from alignkd.models.families import VLMFamily, _resolve, get_family

KIT_ATTN_NAME = "alignkd_layer0_kit"
KIT_CONFIG_FILE = "config.json"
KIT_WEIGHTS_FILE = "layer0.safetensors"
KIT_FORMAT = "alignkd-layer0-kit/1"
# attention submodules the probabilities do not depend on (the value path and the output)
_NOT_NEEDED = ("v_proj", "o_proj")


class _Layer0Reached(Exception):
    """Raised by the kit's attention function: layer 0's probabilities are all we need."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__("layer 0 reached")
        self.weights = weights


def kit_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                          **kwargs):
    """The model file's own eager attention (the probe's path), then stop the forward.

    With `module.alignkd_query_rows` ([B, T] positions, -1 = padding) only those query rows
    are computed, [B, H, T, L] instead of [B, H, L, L]: each row's softmax reads its own
    scores and mask row alone, so the rows are exactly the full forward's."""
    rows = getattr(module, "alignkd_query_rows", None)
    if rows is None:
        _, weights = _run_eager(module, query, key, value, attention_mask, 0.0, scaling, is_causal, **kwargs)
        raise _Layer0Reached(weights)
    mask = additive_mask(module, query, key, attention_mask, is_causal)  # built for the full query length
    index = rows.clamp(min=0)[:, None, :, None]
    query = query.gather(2, index.expand(-1, query.shape[1], -1, query.shape[3]))
    if mask is not None:
        mask = mask.expand(query.shape[0], -1, -1, -1)
        mask = mask.gather(2, index.expand(-1, mask.shape[1], -1, mask.shape[3]))
    _, weights = _eager_of(module)(module, query, key, value, mask, scaling=scaling, dropout=0.0, **kwargs)
    raise _Layer0Reached(weights)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if KIT_ATTN_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(KIT_ATTN_NAME, kit_attention_forward)
        # without the mask registration the decoder silently drops padding and bidirectional blocks
        AttentionMaskInterface.register(KIT_ATTN_NAME, sdpa_mask)


class ZeroProjection(nn.Module):
    """Stands in for layer 0's value projection: right shape, no weights, zeros."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


class QueryRowsProjection(nn.Module):
    """Layer 0's query projection, computed only at `rows` ([B, T] positions, -1 = padding) when
    they are set: the other positions' queries are zeros. The family's own code after it (the
    per-head q norm, rotary) works per position and still sees [B, L, ...]; the kit's attention
    then keeps exactly these rows, so they are the full projection's rows and nothing else is read."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.linear = linear
        self.rows: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows is None:
            return self.linear(x)
        batch, slot = (self.rows >= 0).nonzero(as_tuple=True)
        position = self.rows[batch, slot]
        picked = self.linear(x[batch, position])                          # [rows, H * head_dim]
        out = picked.new_zeros(*x.shape[:-1], picked.shape[-1])
        out[batch, position] = picked
        return out


@dataclass
class KitBytes:
    """A kit as the files it is stored as."""

    config: bytes
    weights: bytes

    def files(self) -> dict[str, bytes]:
        return {KIT_CONFIG_FILE: self.config, KIT_WEIGHTS_FILE: self.weights}


def cut_config(config, family: VLMFamily):
    """The teacher's config with its decoder cut to layer 0 (layer types cut alike)."""
    config = copy.deepcopy(config)
    text = family.get_text_config(config)
    text.num_hidden_layers = 1
    if getattr(text, "layer_types", None):
        text.layer_types = list(text.layer_types[:1])
    return config


def _meta_model(config):
    import transformers

    cls = getattr(transformers, (config.architectures or [""])[0], None)
    if cls is None:
        raise AlignKDError(f"model family {config.model_type!r}: its config names no transformers class "
                           f"({config.architectures}), so the layer-0 kit cannot rebuild it.")
    with torch.device("meta"):
        return cls(config)


def needed_names(model, family: VLMFamily) -> list[str]:
    """The parameters and buffers layer 0's probabilities depend on, by their full names."""
    decoder = family.get_decoder(model)
    layer0 = _resolve(decoder, family.layers)[0]
    attention = family.get_attention_modules(model)[0]
    norm = getattr(layer0, "input_layernorm", None)
    if norm is None:
        raise AlignKDError(f"model family {family.name!r}: layer 0 has no input_layernorm, so --attn-store layer0 "
                           "cannot rebuild its attention; build with --attn-store maps.")
    prefix = {id(m): n for n, m in model.named_modules()}
    wanted: list[str] = []

    def take(module, skip=()):
        base = prefix[id(module)]
        for name, _ in [*module.named_parameters(), *module.named_buffers()]:
            if name.split(".")[0] not in skip:
                wanted.append(f"{base}.{name}")

    take(decoder.get_input_embeddings())
    take(norm)
    take(attention, skip=_NOT_NEEDED)
    layers_name = family.layers.split(".")[0]
    for name, _ in decoder.named_buffers():  # rotary tables and the like, outside the layers
        if name.split(".")[0] != layers_name and f"{prefix[id(decoder)]}.{name}" not in wanted:
            wanted.append(f"{prefix[id(decoder)]}.{name}")
    return wanted


def extract_kit(model) -> KitBytes:
    """Cut the layer-0 kit out of a loaded teacher (refusing a family it cannot recompute)."""
    from safetensors.torch import save

    family = get_family(model.config)
    config = cut_config(model.config, family)
    config.architectures = [type(model).__name__]
    names = needed_names(_meta_model(config), family)
    teacher = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}
    missing = [n for n in names if n not in teacher]
    if missing:
        raise AlignKDError(f"model family {family.name!r}: the teacher has no {missing[0]}, which its layer-0 "
                           "attention needs; build with --attn-store maps.")
    offloaded = [n for n in names if teacher[n].is_meta]
    if offloaded:  # --device-map put part of the input side on disk: its weights are not in memory
        raise AlignKDError(f"--attn-store layer0 needs the teacher's embeddings and layer-0 query/key in memory, "
                           f"but --device-map offloaded {offloaded[0]}; give them a device in the map.")
    tensors = {n: teacher[n].detach().to("cpu").contiguous().clone() for n in names}
    meta = {"format": KIT_FORMAT, "family": family.name}
    return KitBytes(config=config.to_json_string(use_diff=False).encode(), weights=save(tensors, metadata=meta))


class Layer0Kit:
    """A teacher's layer 0, rebuilt from its kit, turning cached inputs into attention rows."""

    def __init__(self, kit: KitBytes, device: str | torch.device = "cpu") -> None:
        from safetensors.torch import load
        from transformers import CONFIG_MAPPING

        doc = json.loads(kit.config)
        config = CONFIG_MAPPING[doc["model_type"]].from_dict(doc)
        self.family = get_family(config)
        self.config = config
        tensors = load(kit.weights)
        self.model = _meta_model(config)
        for name, tensor in tensors.items():
            _assign(self.model, name, tensor.to(device))
        lacking = [n for n in needed_names(self.model, self.family) if n not in tensors]
        if lacking:
            raise AlignKDError(f"the layer-0 kit holds no {lacking[0]}, which layer 0's attention needs.")
        attention = self.family.get_attention_modules(self.model)[0]
        attention.v_proj = ZeroProjection(attention.v_proj.out_features)
        attention.q_proj = QueryRowsProjection(attention.q_proj)
        # False projects q at every position (what the kit did before; bench/distill_step.py compares)
        self.project_query_rows = True
        _register()
        self.model.set_attn_implementation({self.family.text_config: KIT_ATTN_NAME})
        self.model.eval()
        self.device = torch.device(device)
        self.dtype = self.model.get_input_embeddings().weight.dtype  # the teacher's compute dtype
        _pin_device(self.model, self.device, self.dtype)
        self.image_token_id = self.family.get_image_token_id(config)
        self.num_heads = int(self.family.get_text_config(config).num_attention_heads)

    def vision_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, Nv] image-token positions, -1 past each sample's own count (as the capture orders them)."""
        from alignkd.models.capture import vision_positions

        return vision_positions(input_ids.to(self.device) == self.image_token_id)

    def layer0_weights(self, inputs: dict, vision: torch.Tensor, query_rows: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """[B, H, L, L] layer-0 probabilities for a right-padded batch: `inputs` holds input_ids,
        attention_mask and the family's replayed columns (token_type_ids, mm_token_type_ids,
        image_grid_thw); `vision` [B, Nv, D] the cached vision tokens in image-position order
        (rows past a sample's own count ignored). With `query_rows` [B, T] (-1 = padding) only
        those rows: [B, H, T, L]."""
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        positions = self.vision_positions(inputs["input_ids"])
        vision = vision[:, : positions.shape[1]].to(self.device, self.dtype)

        def place_vision(_module, args, kwargs):
            embeds = kwargs["inputs_embeds"].clone()
            rows, slots = (positions >= 0).nonzero(as_tuple=True)
            embeds[rows, positions[rows, slots]] = vision[rows, slots]
            kwargs["inputs_embeds"] = embeds
            return args, kwargs

        handle = self.family.get_decoder(self.model).register_forward_pre_hook(place_vision, with_kwargs=True)
        attention = self.family.get_attention_modules(self.model)[0]
        attention.alignkd_query_rows = None if query_rows is None else query_rows.to(self.device)
        if self.project_query_rows:
            attention.q_proj.rows = attention.alignkd_query_rows
        try:  # the kit's own dtype, as at build time, whatever autocast the training step runs under
            with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
                self.model(**inputs, use_cache=False, return_dict=True)
        except _Layer0Reached as reached:
            return reached.weights
        finally:
            handle.remove()
            attention.alignkd_query_rows = attention.q_proj.rows = None
        raise RuntimeError("the layer-0 kit's forward never reached layer 0's attention")

    def text_vision_rows(self, inputs: dict, vision: torch.Tensor, text_positions: torch.Tensor) -> torch.Tensor:
        """[B, T, H, Nv] rows (0 at padded rows and columns): the probabilities of each sample's
        text positions (`text_positions` [B, T], -1 = padding) over its own vision tokens, in
        the order the cache stores them."""
        tpos = text_positions.to(self.device)
        rows = self.layer0_weights(inputs, vision, query_rows=tpos)           # [B, H, T, L]
        vpos = self.vision_positions(inputs["input_ids"])
        B, H, T = rows.shape[:3]
        cols = rows.gather(3, vpos.clamp(min=0)[:, None, None, :].expand(B, H, T, -1))
        valid = (tpos >= 0)[:, None, :, None] & (vpos >= 0)[:, None, None, :]
        return torch.where(valid, cols, 0.0).permute(0, 2, 1, 3).float()


def _pin_device(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Make every PreTrainedModel inside report the kit's device and dtype: some families move
    the text embeddings to `self.device` (Idefics3), which is its first parameter's, a meta
    tensor of the vision tower here."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            cls = type(module)
            module.__class__ = type(cls.__name__, (cls,), {"device": property(lambda self: device),
                                                           "dtype": property(lambda self: dtype)})


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put a kit tensor in place of the meta one of the same name."""
    path, _, leaf = name.rpartition(".")
    module = model.get_submodule(path)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = tensor
    else:
        raise AlignKDError(f"the layer-0 kit holds {name}, which its rebuilt model has no place for.")
