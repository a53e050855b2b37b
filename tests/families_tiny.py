"""Tiny real VLMs of every supported family, built from config objects, for the family tests.

`build_family(name, out_dir, role)` writes a loadable model directory: weights, a
word-level tokenizer holding the family's special tokens, the family's image processor
(`*Pil`, no torchvision) and a LLaVA-style chat template that prints the family's image
placeholder. The "teacher" has more heads and a wider LM than the "student"; both share
the tokenizer and the image processor, as real teacher/student pairs do.

Processor files are written the way published checkpoints lay them out: Qwen-VL's as
preprocessor_config.json + chat_template.json with no video config, so loading them
exercises alignkd's processor assembly without a video slot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from alignkd.models.processors import without_video

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
WORDS = ("USER ASSISTANT : what is the colour shape of this image a yes no left right red green blue "
         "circle square how many 0 1 2 3 ? . ,").split()


@dataclass(frozen=True)
class Role:
    """LM sizes of one side of a pair: the teacher is wider and has more heads."""

    hidden: int
    heads: int
    kv_heads: int
    layers: int = 2

    @property
    def intermediate(self) -> int:
        return 2 * self.hidden


ROLES = {"teacher": Role(hidden=64, heads=4, kv_heads=2), "student": Role(hidden=32, heads=2, kv_heads=1)}


def chat_template(image: str) -> str:
    """LLaVA-1.5-style turns; an image item prints `image` (the family's placeholder)."""
    return (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}USER : "
        "{% for item in message['content'] %}{% if item['type'] == 'image' %}" + image +
        "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %} "
        "{% elif message['role'] == 'system' %}{% for item in message['content'] %}{{ item['text'] }}{% endfor %} "
        "{% else %}ASSISTANT : {% for item in message['content'] %}{% if item['type'] == 'text' %}"
        "{{ item['text'] }}{% endif %}{% endfor %}{{ eos_token }} {% endif %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT : {% endif %}"
    )


def word_tokenizer(specials: list[str], extra: dict[str, str] | None = None):
    """A word-level fast tokenizer over WORDS plus `specials`; `extra` names family tokens
    (e.g. boi_token) as tokenizer attributes, as the published tokenizers do."""
    from transformers import PreTrainedTokenizerFast

    base = [PAD, BOS, EOS, UNK]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(base + specials + WORDS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.decoder = decoders.WordPiece(prefix="##")
    kwargs = {"extra_special_tokens": extra} if extra else {}
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, additional_special_tokens=specials, **kwargs)


def ids(tokenizer, *tokens: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def _text_kwargs(tok, role: Role, **extra) -> dict:
    return dict(vocab_size=len(tok), hidden_size=role.hidden, intermediate_size=role.intermediate,
                num_hidden_layers=role.layers, num_attention_heads=role.heads, num_key_value_heads=role.kv_heads,
                head_dim=16, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **extra)


# ---------------------------------------------------------------- Qwen2/2.5/3-VL
QWEN_SPECIALS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
MROPE = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}


def _qwen_image_processor(patch: int):
    from transformers import Qwen2VLImageProcessorPil

    # min/max pixels keep a 40-64 px image at its own (rounded) size: Nv varies per image
    return Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                    size={"shortest_edge": 16 * 16, "longest_edge": 96 * 96})


def _qwen(kind: str):
    def build(role: Role):
        import transformers as tf

        tok = word_tokenizer(QWEN_SPECIALS)
        start, pad, end, video = ids(tok, *QWEN_SPECIALS)
        text = _text_kwargs(tok, role, rope_parameters=dict(MROPE))
        if kind == "qwen2_vl":
            vision = dict(depth=1, embed_dim=32, hidden_size=role.hidden, num_heads=2, patch_size=8)
            config_cls, model_cls, patch = tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration, 8
        elif kind == "qwen2_5_vl":
            vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8,
                          out_hidden_size=role.hidden, window_size=32, fullatt_block_indexes=[1])
            config_cls, model_cls, patch = tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration, 8
        else:
            text["rope_parameters"]["mrope_interleaved"] = True
            vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8,
                          out_hidden_size=role.hidden, num_position_embeddings=64, deepstack_visual_indexes=[1])
            config_cls, model_cls, patch = tf.Qwen3VLConfig, tf.Qwen3VLForConditionalGeneration, 8
        config = config_cls(text_config=text, vision_config=vision, image_token_id=pad, video_token_id=video,
                            vision_start_token_id=start, vision_end_token_id=end)
        return model_cls(config), tok, _qwen_image_processor(patch), None, QWEN_IMAGE
    return build


# ---------------------------------------------------------------- Idefics3 / SmolVLM
IDEFICS_SPECIALS = (["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]
                    + [f"<row_{i}_col_{j}>" for i in range(1, 4) for j in range(1, 4)])


def _idefics(kind: str):
    def build(role: Role):
        import transformers as tf

        tok = word_tokenizer(IDEFICS_SPECIALS)
        text = {"model_type": "llama", **_text_kwargs(tok, role)}
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=32, patch_size=8)
        # 32 px tiles of a <=64 px image: 2x2 tiles + the global view, 4 tokens each, in 5 runs
        ip_kwargs = dict(do_image_splitting=True, size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
        if kind == "idefics3":
            config_cls, model_cls = tf.Idefics3Config, tf.Idefics3ForConditionalGeneration
            image_processor, proc = tf.Idefics3ImageProcessorPil(**ip_kwargs), tf.Idefics3Processor
        else:
            config_cls, model_cls = tf.SmolVLMConfig, tf.SmolVLMForConditionalGeneration
            image_processor = tf.SmolVLMImageProcessorPil(**ip_kwargs)
            proc = _with(without_video(tf.SmolVLMProcessor), video_processor=None)
        config = config_cls(text_config=text, vision_config=vision, scale_factor=2,
                            image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id)
        return model_cls(config), tok, image_processor, _with(proc, image_seq_len=4), "<image>"
    return build


# ---------------------------------------------------------------- Gemma3
GEMMA_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}


def _gemma3(role: Role):
    import transformers as tf

    tok = word_tokenizer(list(GEMMA_TOKENS.values()), extra=dict(GEMMA_TOKENS))
    boi, eoi, soft = ids(tok, *GEMMA_TOKENS.values())
    # layer 0 slides over 8 keys, so the window cuts rows off the image within the prompt
    text = _text_kwargs(tok, role, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=8)
    config = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                             boi_token_index=boi, eoi_token_index=eoi, image_token_index=soft)
    image_processor = tf.Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, do_pan_and_scan=False)
    processor = _with(tf.Gemma3Processor, image_seq_length=4)
    return tf.Gemma3ForConditionalGeneration(config), tok, image_processor, processor, GEMMA_TOKENS["boi_token"]


# ---------------------------------------------------------------- InternVL
INTERNVL_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                   "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}


def _internvl(role: Role):
    import transformers as tf

    tok = word_tokenizer(list(INTERNVL_TOKENS.values()), extra=dict(INTERNVL_TOKENS))
    text = {"model_type": "qwen2", **_text_kwargs(tok, role)}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=[32, 32], patch_size=[8, 8])
    # 16 patches per 32 px tile, pixel-shuffled by 0.5 to 4 tokens; up to 4 tiles + a thumbnail
    config = tf.InternVLConfig(text_config=text, vision_config=vision, image_seq_length=4, downsample_ratio=0.5,
                               image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"))
    image_processor = tf.GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True,
                                                  min_patches=1, max_patches=4)
    # saved with processor_config.json (image_seq_length) but, like published InternVL, no video config
    processor = _with(without_video(tf.InternVLProcessor), image_seq_length=4)
    return tf.InternVLForConditionalGeneration(config), tok, image_processor, processor, "<IMG_CONTEXT>"


# ---------------------------------------------------------------- LLaVA-NeXT / OneVision
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]


def _llava_next(role: Role):
    import transformers as tf

    tok = word_tokenizer(["<image>"])
    text = {"model_type": "llama", **_text_kwargs(tok, role)}
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32)
    config = tf.LlavaNextConfig(text_config=text, vision_config=vision, image_grid_pinpoints=PINPOINTS,
                                vision_feature_select_strategy="default", vision_feature_layer=-1,
                                image_token_index=tok.convert_tokens_to_ids("<image>"))
    image_processor = tf.LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                    image_grid_pinpoints=PINPOINTS)
    processor = _with(tf.LlavaNextProcessor, patch_size=8, vision_feature_select_strategy="default",
                      num_additional_image_tokens=1)
    return tf.LlavaNextForConditionalGeneration(config), tok, image_processor, processor, "<image>"


def _llava_onevision(role: Role):
    import transformers as tf

    tok = word_tokenizer(["<image>", "<video>"])
    text = {"model_type": "qwen2", **_text_kwargs(tok, role)}
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=32, patch_size=8)
    config = tf.LlavaOnevisionConfig(text_config=text, vision_config=vision, image_grid_pinpoints=PINPOINTS,
                                     vision_feature_select_strategy="full", vision_feature_layer=-1,
                                     image_token_index=tok.convert_tokens_to_ids("<image>"),
                                     video_token_index=tok.convert_tokens_to_ids("<video>"))
    image_processor = tf.LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32},
                                                         image_grid_pinpoints=PINPOINTS)
    processor = _with(without_video(tf.LlavaOnevisionProcessor), num_image_tokens=16,
                      vision_feature_select_strategy="full")
    return tf.LlavaOnevisionForConditionalGeneration(config), tok, image_processor, processor, "<image>"


# ---------------------------------------------------------------- PaliGemma 1 / 2
def _paligemma(text_type: str):
    def build(role: Role):
        import transformers as tf
        from transformers.models.paligemma.processing_paligemma import EXTRA_TOKENS

        # the published tokenizer already holds <image> and the <locNNNN>/<segNNN> tokens the
        # processor adds; adding them first keeps the vocabulary equal to the tokenizer
        tok = word_tokenizer(["<image>"], extra={"image_token": "<image>"})
        tok.add_tokens(EXTRA_TOKENS)
        text = {"model_type": text_type, **_text_kwargs(tok, role)}
        if text_type == "gemma2":  # softcapping on (its defaults); layer 0 slides over 8 keys
            text.update(sliding_window=8, layer_types=["sliding_attention", "full_attention"])
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=32, patch_size=8)
        config = tf.PaliGemmaConfig(text_config=text, vision_config=vision, projection_dim=role.hidden,
                                    hidden_size=role.hidden, vocab_size=len(tok),
                                    image_token_index=tok.convert_tokens_to_ids("<image>"))
        image_processor = tf.SiglipImageProcessorPil(size={"height": 32, "width": 32}, image_seq_length=16)
        # no chat template, like the published checkpoints: alignkd renders prefix + suffix itself
        return tf.PaliGemmaForConditionalGeneration(config), tok, image_processor, tf.PaliGemmaProcessor, None
    return build


# ---------------------------------------------------------------- Mistral3
PIXTRAL_SPECIALS = ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]


def _mistral3(role: Role):
    import transformers as tf

    from alignkd.models.pixtral_processor import PixtralProcessor  # the stock one needs torchvision

    tok = word_tokenizer(PIXTRAL_SPECIALS)
    text = {"model_type": "mistral", **_text_kwargs(tok, role)}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=64, patch_size=8, head_dim=16)
    config = tf.Mistral3Config(text_config=text, vision_config=vision, spatial_merge_size=2, vision_feature_layer=-1,
                               image_token_index=tok.convert_tokens_to_ids("[IMG]"))
    # images resized to whole 16 px merged patches, at most 64 px: one [IMG] per 16 px, a row per 16 px of height
    image_processor = tf.PixtralImageProcessorPil(size={"longest_edge": 64}, patch_size=8)
    processor = _with(PixtralProcessor, patch_size=8, spatial_merge_size=2)
    return tf.Mistral3ForConditionalGeneration(config), tok, image_processor, processor, "[IMG]"


def _with(processor_cls, **kwargs):
    """A processor constructor with family options bound (image_seq_len, ...)."""
    return lambda **kw: processor_cls(**kw, **kwargs)


def _save_published_layout(out: Path, tok, image_processor, template: str) -> None:
    """tokenizer files + preprocessor_config.json + chat_template.json, no video config."""
    tok.save_pretrained(out)
    image_processor.save_pretrained(out)
    (out / "chat_template.json").write_text(json.dumps({"chat_template": template}))


BUILDERS = {
    "qwen2_vl": _qwen("qwen2_vl"),
    "qwen2_5_vl": _qwen("qwen2_5_vl"),
    "qwen3_vl": _qwen("qwen3_vl"),
    "idefics3": _idefics("idefics3"),
    "smolvlm": _idefics("smolvlm"),
    "gemma3": _gemma3,
    "internvl": _internvl,
    "llava_next": _llava_next,
    "llava_onevision": _llava_onevision,
    "paligemma": _paligemma("gemma"),
    "paligemma2": _paligemma("gemma2"),
    "mistral3": _mistral3,
}
FAMILY_NAMES = tuple(BUILDERS)
MODEL_TYPES = {"paligemma2": "paligemma"}  # builder name -> config.model_type, where they differ
# families whose tiny processors give the three test images three different vision-token counts
RAGGED = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "smolvlm", "internvl", "llava_next", "llava_onevision",
          "mistral3"}


def build_family(name: str, out_dir, role: str = "teacher", seed: int = 0, vocab_padding: int = 0) -> Path:
    """Write a loadable `name` model directory for `role` ("teacher" or "student").

    `vocab_padding` adds embedding rows past the tokenizer, as Qwen2.5-VL-7B pads to 152,064.
    """
    import torch

    out = Path(out_dir)
    torch.manual_seed(seed)
    model, tok, image_processor, processor_cls, image = BUILDERS[name](ROLES[role])
    if vocab_padding:
        model.resize_token_embeddings(len(tok) + vocab_padding)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    template = None if image is None else chat_template(image)  # None: the family ships no template
    if processor_cls is None:
        _save_published_layout(out, tok, image_processor, template)
    else:
        processor_cls(image_processor=image_processor, tokenizer=tok, chat_template=template).save_pretrained(out)
    return out
