"""The data layer: LLaVA manifests, conversation rendering, label masks, image loading.

    records = read_manifest("train.jsonl")
    records, duplicates = split_duplicates(records)
    sample = render_sample(records[0], processor, "images/", max_length=2048)
    batch = collate([sample], pad_token_id=processor.tokenizer.pad_token_id)
"""

from alignkd.data.collate import collate, concat_padded
from alignkd.data.errors import REASONS, ManifestError, ProcessorError, SampleError
from alignkd.data.images import image_encoding_from_bytes, image_inputs_from_bytes
from alignkd.data.manifest import ManifestRecord, read_manifest, split_duplicates
from alignkd.data.render import IGNORE_INDEX, RenderedSample, render_sample

__all__ = [
    "IGNORE_INDEX", "REASONS", "ManifestError", "ManifestRecord", "ProcessorError", "RenderedSample",
    "SampleError", "collate", "concat_padded", "image_encoding_from_bytes", "image_inputs_from_bytes", "read_manifest", "render_sample", "split_duplicates",
]
