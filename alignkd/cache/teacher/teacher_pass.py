"""The teacher side of a cache build: render, batch, forward once, and cut per-sample records.

Everything here turns a live teacher forward into `SampleRecord`s; it knows nothing of
how they are stored. The same function (`records_from_capture`) is what the tests use
to compare the cache against a live teacher, so there is one definition of "what the
teacher said about a sample".
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
import torch

from alignkd.cache.identity import teacher_identity
from alignkd.errors import ConfigError
from alignkd.hub import resolve_model


@dataclass
class Outcome:
    """One manifest row's result: a record to store, or the reason it was rejected."""

    record: object | None = None
    reject: Exception | None = None


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def records_from_capture(samples, batch, cap, *, logit_mode: str, logit_k: int, logit_samples: int,
                         positions_policy: str, seed: int, store_images: bool,
                         token_inputs: tuple[str, ...] = ()) -> list:
    """Slice a batched teacher capture into one `SampleRecord` per sample.

    The batch is right-padded, so batch positions are also positions in each sample. Each
    record keeps only its own Nv_b vision columns (every image's, in order), and the
    family's `token_inputs`. A text-only sample has no vision tokens and no attention rows.
    """
    from alignkd.cache.teacher.sparse_logits import encode_sampled, encode_topk, teacher_stats
    from alignkd.cache.record import SampleRecord
    from alignkd.targets import sample_seed, select_positions, text_focus

    positions = select_positions(batch["labels"], cap.text_query_mask, batch["attention_mask"],
                                 positions_policy)
    grids = _per_sample_grids(samples, batch)
    records = []
    for b, sample in enumerate(samples):
        nv = int(cap.vision_mask[b].sum())  # this sample's own vision-token count
        # attention rows: text that sees the images; a text-only sample has none
        rows = (cap.text_query_mask[b] & (nv > 0)).nonzero().squeeze(-1)
        attn = cap.attn_text_vision[b][:, rows, :nv].permute(1, 0, 2).float()  # [T, H, Nv_b]
        logit_pos = positions[b].nonzero().squeeze(-1)
        logits = cap.logits[b, logit_pos].float()
        if logit_mode == "topk":
            target = encode_topk(logits, logit_k)
        else:
            gen = torch.Generator().manual_seed(sample_seed(seed, sample.sample_id))
            target = encode_sampled(logits, logit_samples, gen)
        stats = teacher_stats(logits, batch["labels"][b, logit_pos + 1], target)
        ids = sample.input_ids
        records.append(SampleRecord(
            sample_id=sample.sample_id,
            manifest_row=sample.row,
            input_ids=ids.numpy().astype(np.int32),
            label_mask=(sample.labels != -100).numpy(),
            vision_positions=cap.vision_positions[b, :nv].cpu().numpy().astype(np.int32),
            text_positions=rows.cpu().numpy().astype(np.int32),
            attn=_f32(attn),
            vision=_f32(cap.vision_tokens[b, :nv]),
            focus=_f32(text_focus(attn)),
            logit_positions=logit_pos.cpu().numpy().astype(np.int32),
            logit_ids=target.ids.cpu().numpy().astype(np.int64),
            logit_values=_f32(target.values),
            logit_tail=_f32(target.tail),
            teacher_ce=stats.ce, teacher_entropy=stats.entropy, teacher_tail_mass=stats.tail,
            image_paths=tuple(img.name or "" for img in sample.images),
            image_sha256=tuple(img.sha256 for img in sample.images),
            image_bytes=tuple(img.data for img in sample.images) if store_images else None,
            image_n_vision=_vision_counts(sample, nv),
            image_grid_thw=grids[b],
            **{k: v.numpy().astype(np.int32) for k, v in sample.token_inputs.items() if k in token_inputs},
        ))
    return records


def batch_samples(batch: dict, cap) -> list:
    """Minimal stand-ins for the rendered samples of a batch that came from elsewhere (a cached
    batch re-run through a live teacher, a synthetic one): each sample's vision tokens count as
    one image, with no name, hash or bytes. Enough for `records_from_capture(store_images=False)`."""
    from types import SimpleNamespace

    lengths = batch["attention_mask"].sum(1).tolist()
    counts = cap.vision_mask.sum(1).tolist()
    blank = SimpleNamespace(name="", sha256="", data=b"")
    return [SimpleNamespace(sample_id=f"b{b}", row=b, input_ids=batch["input_ids"][b, :n].cpu(),
                            labels=batch["labels"][b, :n].cpu(), images=(blank,) if nv else (),
                            image_token_counts=(nv,) if nv else (), token_inputs={})
            for b, (n, nv) in enumerate(zip(lengths, counts))]


def _vision_counts(sample, nv: int) -> np.ndarray:
    """Each image's share of the sample's nv vision tokens (the renderer counted them)."""
    counts = np.asarray(getattr(sample, "image_token_counts", ()) or (), np.int32)
    if len(counts) != len(sample.images) or int(counts.sum()) != nv:
        raise RuntimeError(f"sample {sample.sample_id}: per-image token counts {counts.tolist()} do not add up to "
                           f"the {nv} vision tokens the teacher consumed")
    return counts


def _per_sample_grids(samples, batch) -> list[np.ndarray]:
    """Each sample's rows of `image_grid_thw` (Qwen-VL: one row per image, in batch order), flattened."""
    grid = batch.get("image_grid_thw")
    if grid is None:
        return [np.zeros(0, np.int32)] * len(samples)
    grid = grid.cpu().numpy().astype(np.int32).reshape(-1, 3)
    ends = np.cumsum([len(s.images) for s in samples])
    return [grid[end - len(s.images):end].reshape(-1) for s, end in zip(samples, ends)]


def model_inputs_of(batch: dict, family) -> dict:
    """What the forward takes: the batch minus labels and the per-token inputs the family
    does not use (a tokenizer may emit token_type_ids that e.g. LLaVA would refuse)."""
    from alignkd.storage_schemas import TOKEN_INPUT_COLUMNS

    drop = {"labels", *(k for k in TOKEN_INPUT_COLUMNS if k not in family.token_inputs)}
    return {k: v for k, v in batch.items() if k not in drop}


class TeacherPass:
    """Loads the teacher once and turns manifest records into outcomes, batch by batch."""

    def __init__(self, cfg, dist) -> None:
        from alignkd.models import load_vlm
        from alignkd.models.placement import check_offload_folder, input_device, placement_counts

        self.cfg = cfg
        # one GPU per torchrun rank: a bare "cuda" becomes this rank's device
        self.device = f"cuda:{dist.local_rank}" if cfg.device == "cuda" else cfg.device
        if self.device != cfg.device and dist.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"--device cuda gives local rank {dist.local_rank} cuda:{dist.local_rank}, but this "
                              f"machine has {torch.cuda.device_count()} GPU(s); start at most that many processes "
                              "per node.")
        self.show_progress = cfg.progress and dist.is_main
        source = resolve_model(cfg.teacher, "--teacher", trust_remote_code=cfg.trust_remote_code)
        placement = cfg.placement()
        if placement is not None and placement.offload_folder is not None:
            check_offload_folder(placement.offload_folder)
        if placement is not None and placement.offload_folder is None:
            # what goes to "disk" and is not read in place from the safetensors; removed with the pass
            self._offload = tempfile.TemporaryDirectory(prefix="alignkd-offload-")
            placement = replace(placement, offload_folder=self._offload.name)
        self.vlm = load_vlm(source.path, dtype=cfg.dtype, device=self.device,
                            trust_remote_code=cfg.trust_remote_code, placement=placement)
        self.placement = {}
        if placement is not None:  # the node's devices, as accelerate dispatched the teacher over them
            self.device = input_device(self.vlm.model)
            self.placement = placement_counts(self.vlm.model)
        self.identity = teacher_identity(source.path, repo_id=source.repo_id, revision=source.revision)
        # --attn-store layer0: the kit, and the kit rebuilt from its bytes that the first batch with
        # images checks against the live capture
        self.layer0_kit, self._kit_check = self._layer0_kit() if cfg.attn_store == "layer0" else (None, None)
        text = self.vlm.model.config.get_text_config()
        self.shapes = {
            "num_heads": int(text.num_attention_heads),
            "hidden_size": int(text.hidden_size),
            "vocab_size": int(text.vocab_size),
            "model_type": self.vlm.model.config.model_type,
        }

    def _layer0_kit(self):
        """(the teacher's layer-0 kit, refusing a family it cannot cut; the kit rebuilt from its bytes)"""
        from alignkd.models.layer0_kit import Layer0Kit, extract_kit

        kit = extract_kit(self.vlm.model)
        return kit, Layer0Kit(kit, self.device)

    def run(self, records, total: int, initial_rejects: int = 0) -> Iterator[Outcome]:
        """Outcomes of `records` (an iterable of `total` ManifestRecords, streamed), batch by batch."""
        from itertools import islice

        from tqdm import tqdm

        from alignkd.data import SampleError, render_sample

        cfg = self.cfg
        processor = self.vlm.processor
        pad_id = processor.tokenizer.pad_token_id
        rules = self.vlm.family.render_rules(self.vlm.model.config)
        bar = tqdm(total=total, unit="sample", disable=not self.show_progress, desc="cache build")
        n_rejects = initial_rejects
        records = iter(records)
        while chunk := list(islice(records, cfg.batch_size)):
            rendered = []
            for rec in chunk:
                try:
                    rendered.append(render_sample(rec, processor, rec.images_root or cfg.images, cfg.max_length,
                                                  rules))
                except SampleError as err:
                    n_rejects += 1
                    yield Outcome(reject=err)
            if rendered:
                yield from (Outcome(record=r) for r in self._forward(rendered, pad_id))
            bar.update(len(chunk))
            bar.set_postfix(rejects=n_rejects)
        bar.close()

    def _forward(self, rendered, pad_id) -> list:
        from alignkd.data import collate
        from alignkd.models import capture_forward

        batch = collate(rendered, pad_token_id=pad_id, padding_side="right")
        device = self.device
        on_device = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        if "pixel_values" in on_device:
            on_device["pixel_values"] = on_device["pixel_values"].to(self.vlm.model.dtype)
        model_inputs = model_inputs_of(on_device, self.vlm.family)
        cap = capture_forward(self.vlm.model, model_inputs)
        if self._kit_check is not None:  # until a batch with images: the kit must reproduce the teacher
            from alignkd.cache.layer0_store import check_recompute

            check_recompute(self._kit_check, model_inputs, cap, self.vlm.family.name)
            if cap.vision_mask.any():
                self._kit_check = None
        # Sparse encoding runs where the logits are: copying [B, L, V] logits to the host
        # would cost more than the teacher forward on a GPU.
        return records_from_capture(
            rendered, on_device, cap, logit_mode=self.cfg.logit_mode, logit_k=self.cfg.logit_k,
            logit_samples=self.cfg.logit_samples, positions_policy=self.cfg.logit_positions,
            seed=self.cfg.seed, store_images=self.cfg.store_images, token_inputs=self.vlm.family.token_inputs)
