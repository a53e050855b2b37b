"""`alignkd eval`: answer accuracy and answer-token CE of any saved VLM on a held-out manifest.

Accuracy uses greedy generation of the last assistant turn and a normalised exact match
(case, punctuation and whitespace folded). The prompt and the reference come from the
same rendering the cache uses, so a model is scored on exactly the text it was trained on.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkd.errors import ConfigError

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalise_answer(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


@dataclass(frozen=True)
class EvalConfig:
    model: str
    data: str
    images: str
    max_length: int = 2048
    max_new_tokens: int = 16
    batch_size: int = 16
    limit: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if not Path(self.model).is_dir():
            raise ConfigError(f"model directory {self.model} does not exist.")
        if not Path(self.data).is_file():
            raise ConfigError(f"manifest {self.data} does not exist.")
        if not Path(self.images).is_dir():
            raise ConfigError(f"images directory {self.images} does not exist.")


@dataclass
class EvalResult:
    samples: int
    accuracy: float
    answer_ce: float
    skipped: int = 0
    by_type: dict = field(default_factory=dict)


def _last_answer_span(labels: torch.Tensor) -> tuple[int, int]:
    """Start and end of the final run of labelled tokens (the last assistant turn)."""
    idx = (labels != -100).nonzero().squeeze(-1).tolist()
    end = idx[-1] + 1
    start = end - 1
    while start - 1 in idx:
        start -= 1
    return start, end


def evaluate(cfg: EvalConfig) -> EvalResult:
    from tqdm import tqdm

    from alignkd.data import SampleError, read_manifest, render_sample
    from alignkd.models import load_vlm

    vlm = load_vlm(cfg.model)
    model, processor = vlm.model, vlm.processor
    tok = processor.tokenizer
    records = read_manifest(cfg.data)[: cfg.limit]
    qtypes = _question_types(cfg.data)
    correct, total, ce_sum, ce_tokens, skipped = 0, 0, 0.0, 0, 0
    per_type: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for rec in tqdm(records, desc="eval", unit="sample", disable=not cfg.progress):
        try:
            sample = render_sample(rec, processor, cfg.images, cfg.max_length)
        except SampleError:
            skipped += 1
            continue
        ids, labels = sample.input_ids[None], sample.labels[None]
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, **sample.image_inputs)
        n = int((labels[:, 1:] != -100).sum())
        ce_sum += float(out.loss) * n
        ce_tokens += n
        start, end = _last_answer_span(sample.labels)
        prompt = ids[:, :start]
        with torch.no_grad():
            gen = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=cfg.max_new_tokens, pad_token_id=tok.pad_token_id,
                                 **sample.image_inputs)
        predicted = tok.decode(gen[0, start:], skip_special_tokens=True)
        reference = tok.decode(sample.input_ids[start:end], skip_special_tokens=True)
        hit = int(normalise_answer(predicted) == normalise_answer(reference))
        correct += hit
        total += 1
        qtype = qtypes.get(rec.sample_id)
        if qtype is not None:
            per_type[qtype][0] += hit
            per_type[qtype][1] += 1
    by_type = {k: v[0] / v[1] for k, v in sorted(per_type.items())}
    return EvalResult(samples=total, accuracy=correct / max(total, 1), answer_ce=ce_sum / max(ce_tokens, 1),
                      skipped=skipped, by_type=by_type)


def _question_types(manifest: str) -> dict[str, str]:
    """Optional per-record `qtype` field, used to break accuracy down by question type."""
    import json

    text = Path(manifest).read_text()
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    return {str(r.get("id")): r["qtype"] for r in records if isinstance(r, dict) and "qtype" in r}
