"""Tiny real LLaVA models and tokenizers, built from config objects.

Both the tests and the embedded demo need VLMs that load through the ordinary
transformers path (`AutoModelForImageTextToText`, `AutoProcessor`) yet build in a
second on two CPU cores without any download. This module writes such a model
directory: a CLIP vision tower, a Llama language model, a word-level tokenizer made
with `tokenizers`, and a LLaVA-1.5-style chat template.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IMAGE_TOKEN = "<image>"
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IMAGE_TOKEN, "<unk>"]

# LLaVA-1.5 style: "USER: <image>\n... ASSISTANT: answer</s>". The template reads the
# structured content list that processors use, so an image item becomes the placeholder.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %} "
    "{% elif message['role'] == 'system' %}"  # printed bare before the first turn, as LLaVA-1.5's template does
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: "
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{{ eos_token }} "
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT: {% endif %}"
)

BASE_WORDS = (
    "USER ASSISTANT : what is the colour shape of this image a an yes no left right above below "
    "red green blue yellow circle square triangle cross there how many where at row column "
    "0 1 2 3 4 5 6 7 8 9 ? . , describe picture"
).split()


@dataclass(frozen=True)
class TinyLlavaSpec:
    """Sizes of a tiny LLaVA; the defaults build in well under a second."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None
    intermediate_size: int = 128
    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def build_word_tokenizer(words: list[str] | None = None):
    """A word-level fast tokenizer over `words` plus the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(dict.fromkeys(words or BASE_WORDS))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token="<unk>",
        additional_special_tokens=[IMAGE_TOKEN],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_processor(tokenizer, spec: TinyLlavaSpec):
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by "default"
        chat_template=CHAT_TEMPLATE,
    )


def build_llava_config(tokenizer, spec: TinyLlavaSpec):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 2,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads or spec.num_heads,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )


def build_tiny_llava(out_dir: str | Path, spec: TinyLlavaSpec = TinyLlavaSpec(), seed: int = 0,
                     words: list[str] | None = None, vision_tower_state: dict | None = None) -> Path:
    """Write a loadable LLaVA model directory (safetensors + processor) to `out_dir`."""
    import torch
    from transformers import LlavaForConditionalGeneration

    out = Path(out_dir)
    tokenizer = build_word_tokenizer(words)
    config = build_llava_config(tokenizer, spec)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    if vision_tower_state is not None:
        model.model.vision_tower.load_state_dict(vision_tower_state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    build_processor(tokenizer, spec).save_pretrained(out)
    return out
