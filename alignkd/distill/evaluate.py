"""`alignkd eval`: answer accuracy and answer-token CE of any saved VLM on a held-out manifest.

Accuracy uses greedy generation of the last assistant turn and a normalised exact match
(case, punctuation and whitespace folded). The prompt and the reference come from the
same rendering the cache uses, so a model is scored on exactly the text it was trained on.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkd.distill.eval_config import EvalConfig  # noqa: F401  (the command's settings)
from alignkd.errors import AlignKDError
from alignkd.hub import resolve_model

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalise_answer(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


@dataclass
class EvalResult:
    samples: int
    accuracy: float
    answer_ce: float
    skipped: int = 0
    skipped_by_reason: dict = field(default_factory=dict)  # reject reason -> records not scored, as `rejects` counts them
    by_type: dict = field(default_factory=dict)


def _last_answer_span(labels: torch.Tensor) -> tuple[int, int]:
    """Start and end of the final run of labelled tokens (the last assistant turn)."""
    idx = (labels != -100).nonzero().squeeze(-1).tolist()
    end = idx[-1] + 1
    start = end - 1
    while start - 1 in idx:
        start -= 1
    return start, end


def left_pad(seqs: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts are left-padded so that generation continues every row at the same column."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = s
        mask[i, width - len(s):] = 1
    return ids, mask


def _score_batch(model, tok, samples, max_new_tokens: int) -> tuple[list[int], float, int, list[dict]]:
    """Exact-match hits, summed answer CE, answer-token count and each sample's prediction for one batch."""
    from alignkd.data import collate
    from alignkd.storage_schemas import TOKEN_INPUT_COLUMNS

    batch = collate(samples, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    target = batch["labels"][:, 1:]
    valid = target != -100
    ce = torch.nn.functional.cross_entropy(logits[:, :-1][valid].float(), target[valid], reduction="sum")
    spans = [_last_answer_span(s.labels) for s in samples]
    ids, mask = left_pad([s.input_ids[:start] for s, (start, _) in zip(samples, spans)], tok.pad_token_id)
    images = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels")}
    for key in set(images) & set(TOKEN_INPUT_COLUMNS):  # per-token inputs (Qwen, Gemma3, PaliGemma): the prompt's part
        images[key] = left_pad([s.token_inputs[key][:start] for s, (start, _) in zip(samples, spans)], 0)[0]
    with torch.no_grad():
        gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=tok.pad_token_id, **images)
    predicted = tok.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)
    answers = [tok.decode(s.input_ids[a:b], skip_special_tokens=True) for s, (a, b) in zip(samples, spans)]
    hits = [int(normalise_answer(p) == normalise_answer(a)) for p, a in zip(predicted, answers)]
    rows = [{"id": s.sample_id, "prediction": p.strip(), "answer": a.strip(), "correct": bool(h)}
            for s, p, a, h in zip(samples, predicted, answers, hits)]
    return hits, float(ce), int(valid.sum()), rows


def evaluate(cfg: EvalConfig, model=None, processor=None) -> EvalResult:
    """Score `cfg.model` (or an already loaded `model`/`processor`) on `cfg.data`."""
    from tqdm import tqdm

    from alignkd.data import RenderRules, SampleError, open_source, render_sample
    from alignkd.models.families import FAMILIES

    if model is None:
        from alignkd.models import load_vlm

        vlm = load_vlm(resolve_model(cfg.model, "--model").path)
        model, processor = vlm.model, vlm.processor
        _check_finite_weights(model, cfg.model)
    model.eval()
    family = FAMILIES.get(model.config.model_type)  # any chat-template VLM can be scored, supported or not
    rules = family.render_rules(model.config) if family else RenderRules(family=model.config.model_type)
    records = list(open_source(cfg.data).records())[: cfg.limit]
    qtypes = _question_types(cfg.data)
    hits: list[tuple[str | None, int]] = []
    ce_sum, ce_tokens, skipped = 0.0, 0, Counter()
    predictions: list[dict] = []
    bar = tqdm(total=len(records), desc="eval", unit="sample", disable=not cfg.progress)
    for start in range(0, len(records), cfg.batch_size):
        samples = []
        for rec in records[start:start + cfg.batch_size]:
            try:
                samples.append(render_sample(rec, processor, cfg.images, cfg.max_length, rules))
            except SampleError as err:
                skipped[err.reason] += 1
        if samples:
            batch_hits, ce, n, rows = _score_batch(model, processor.tokenizer, samples, cfg.max_new_tokens)
            predictions += rows
            hits += [(qtypes.get(s.sample_id), h) for s, h in zip(samples, batch_hits)]
            ce_sum, ce_tokens = ce_sum + ce, ce_tokens + n
        bar.update(len(records[start:start + cfg.batch_size]))
    bar.close()
    if ce_tokens and not math.isfinite(ce_sum):
        raise AlignKDError(f"model {cfg.model} gives a non-finite answer CE ({ce_sum / ce_tokens}) on {cfg.data}, "
                           "so it cannot be scored.")
    if cfg.predictions is not None:
        _write_predictions(Path(cfg.predictions), predictions)
    per_type: dict[str, list[int]] = defaultdict(list)
    for qtype, hit in hits:
        if qtype is not None:
            per_type[qtype].append(hit)
    return EvalResult(samples=len(hits), accuracy=sum(h for _, h in hits) / max(len(hits), 1),
                      answer_ce=ce_sum / max(ce_tokens, 1), skipped=sum(skipped.values()),
                      skipped_by_reason=dict(sorted(skipped.items())),
                      by_type={k: sum(v) / len(v) for k, v in sorted(per_type.items())})


def _write_predictions(path: Path, rows: list[dict]) -> None:
    """One JSON line per scored record, written whole or not at all."""
    import json

    from alignkd.distill.outdir import write_text_atomically

    try:
        write_text_atomically(path, "".join(json.dumps(row) + "\n" for row in rows))
    except OSError as err:
        raise AlignKDError(f"--predictions {path}: cannot write it ({err.strerror}).") from None


def _check_finite_weights(model, name: str) -> None:
    """A model whose weights hold nan/inf (a diverged run) is refused, not scored as CE nan."""
    from alignkd.distill.finite import first_non_finite

    bad = first_non_finite(model.named_parameters())
    if bad is not None:
        raise AlignKDError(f"model {name} has non-finite weights (first: {bad}), so it cannot be scored.")


def _question_types(manifest: str) -> dict[str, str]:
    """Optional per-record `qtype` field, used to break accuracy down by question type."""
    import json

    if Path(manifest).is_dir() or Path(manifest).suffix.lower() == ".parquet":
        return {}
    text = Path(manifest).read_text()
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    return {str(r.get("id")): r["qtype"] for r in records if isinstance(r, dict) and "qtype" in r}
