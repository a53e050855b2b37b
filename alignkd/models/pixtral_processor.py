"""Mistral3's processor for machines without torchvision.

transformers' `PixtralProcessor` is declared to require torchvision (its module imports
the torchvision image processor for a token-count helper alignkd never calls), so it
cannot even be imported here. This class does the same work on top of the directory's
`PixtralImageProcessorPil`: the image is resized to whole merged patches
(`patch_size * spatial_merge_size` pixels), and its `[IMG]` placeholder becomes one run
of `[IMG]` per row of merged patches, rows separated by `[IMG_BREAK]` and the last one
closed by `[IMG_END]`, exactly as transformers 5.24's `PixtralProcessor.replace_image_token`.
It carries the stock class name, so a directory it saves names `PixtralProcessor` and
loads with the stock class wherever torchvision is installed.
"""

from __future__ import annotations

from transformers.processing_utils import ProcessorMixin


class PixtralProcessor(ProcessorMixin):
    text_kwargs = {"return_tensors": "pt"}
    images_kwargs = {"return_tensors": "pt"}

    def __init__(self, image_processor=None, tokenizer=None, patch_size: int = 16, spatial_merge_size: int = 1,
                 chat_template=None, image_token="[IMG]", image_break_token="[IMG_BREAK]",
                 image_end_token="[IMG_END]", **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.patch_size = patch_size
        self.spatial_merge_size = spatial_merge_size
        self.image_token, self.image_break_token, self.image_end_token = image_token, image_break_token, image_end_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.image_break_token_id = tokenizer.convert_tokens_to_ids(image_break_token)
        self.image_end_token_id = tokenizer.convert_tokens_to_ids(image_end_token)

    @property
    def image_token_ids(self) -> list[int]:
        return [self.image_token_id, self.image_break_token_id, self.image_end_token_id]

    def _process_images(self, images, **images_kwargs):
        images_kwargs["patch_size"] = self.patch_size * self.spatial_merge_size
        return super()._process_images(images, **images_kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        merged = self.patch_size * self.spatial_merge_size
        height, width = (int(x) for x in image_inputs["image_sizes"][image_idx])
        row = self.image_token * (width // merged) + self.image_break_token
        text = row * (height // merged)
        return text[: -len(self.image_break_token)] + self.image_end_token

    @property
    def model_input_names(self):
        return self.tokenizer.model_input_names + self.image_processor.model_input_names + ["image_sizes"]
