"""The data layer: record sources (JSON/JSONL, Parquet), conversation rendering, label masks, images.

    source = open_source("train.jsonl")            # or a .parquet file / directory
    rows = assign_keys(source.index())             # every record, a unique key each ("ID#2" for a repeat)
    records = list(source.records({r.row for r in rows}))
    sample = render_sample(records[0], processor, "images/", max_length=2048)
    batch = collate([sample], pad_token_id=processor.tokenizer.pad_token_id)
"""

from alignkd.data.collate import collate, concat_padded
from alignkd.data.errors import REASONS, ManifestError, ProcessorError, SampleError
from alignkd.data.images import image_encoding_from_bytes, image_inputs_from_bytes
from alignkd.data.manifest import ImageRef, ManifestRecord, read_manifest
from alignkd.data.mixture import MixedSource, assign_keys, source_specs
from alignkd.data.render import RenderRules, render_sample
from alignkd.data.sample import IGNORE_INDEX, LoadedImage, RenderedSample
from alignkd.data.sources import open_source

__all__ = [
    "IGNORE_INDEX", "REASONS", "ImageRef", "LoadedImage", "ManifestError", "ManifestRecord", "ProcessorError",
    "RenderRules", "RenderedSample", "SampleError", "collate", "concat_padded", "image_encoding_from_bytes",
    "image_inputs_from_bytes", "open_source", "read_manifest", "render_sample", "assign_keys", "MixedSource",
    "source_specs",
]
