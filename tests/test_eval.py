"""`alignkd eval` against a per-sample reference: the same answers and the same CE."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from alignkd.cli import main
from alignkd.data import read_manifest, render_sample
from alignkd.distill.evaluate import EvalConfig, evaluate, normalise_answer
from alignkd.models import load_vlm


def _reference(model_dir, manifest, images):
    """One sample at a time, unbatched: greedy answer of the last turn and summed answer CE."""
    vlm = load_vlm(model_dir)
    tok = vlm.processor.tokenizer
    hits, ce_sum, n_tokens = [], 0.0, 0
    for rec in read_manifest(manifest):
        s = render_sample(rec, vlm.processor, images, 2048)
        ids = s.input_ids[None]
        with torch.no_grad():
            out = vlm.model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=s.labels[None],
                            **s.image_inputs)
        n = int((s.labels[1:] != -100).sum())
        ce_sum, n_tokens = ce_sum + float(out.loss) * n, n_tokens + n
        answer = (s.labels != -100).nonzero().squeeze(-1)
        start = int(answer[-1])
        while start - 1 in answer.tolist():
            start -= 1
        with torch.no_grad():
            gen = vlm.model.generate(input_ids=ids[:, :start], attention_mask=torch.ones_like(ids[:, :start]),
                                     do_sample=False, max_new_tokens=5, **s.image_inputs)
        predicted = tok.decode(gen[0, start:], skip_special_tokens=True)
        reference = tok.decode(s.input_ids[start:int(answer[-1]) + 1], skip_special_tokens=True)
        hits.append(int(normalise_answer(predicted) == normalise_answer(reference)))
    return hits, ce_sum / n_tokens


def test_batched_eval_equals_per_sample_reference(tiny_llava_dir, small_dataset):
    manifest, images = small_dataset
    hits, ce = _reference(tiny_llava_dir, manifest, images)
    result = evaluate(EvalConfig(model=str(tiny_llava_dir), data=str(manifest), images=str(images),
                                 batch_size=4, max_new_tokens=5, progress=False))
    assert result.samples == len(hits) == 6
    assert abs(result.accuracy - sum(hits) / len(hits)) < 1e-9
    assert abs(result.answer_ce - ce) < 1e-4


def test_eval_counts_a_right_answer_and_breaks_down_by_qtype(tiny_llava_dir, tmp_path, small_dataset):
    """Make the references equal to what the model generates: accuracy must then be 1."""
    manifest, images = small_dataset
    vlm = load_vlm(tiny_llava_dir)
    records = json.loads(manifest.read_text())
    for rec in records:
        rec["conversations"] = rec["conversations"][:2]
        prompt = vlm.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is the colour of this image ?"}]}],
            add_generation_prompt=True)
        from PIL import Image

        inputs = vlm.processor(text=[prompt], images=[Image.open(images / rec["image"]).convert("RGB")],
                               return_tensors="pt")
        gen = vlm.model.generate(**inputs, do_sample=False, max_new_tokens=3)
        words = [w for w in vlm.processor.tokenizer.decode(gen[0, inputs["input_ids"].shape[1]:],
                                                            skip_special_tokens=True).split() if w.isalnum()]
        assert words, "the tiny model generated no word to use as a reference"
        rec["conversations"][1]["value"] = " ".join(words)
        rec["qtype"] = "colour"
    (tmp_path / "m.json").write_text(json.dumps(records))
    result = CliRunner().invoke(main, ["eval", "--model", str(tiny_llava_dir), "--data", str(tmp_path / "m.json"),
                                       "--images", str(images), "--max-new-tokens", "3", "--json", "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["samples"] == 6 and set(report["by_type"]) == {"colour"}
    assert report["accuracy"] == 1.0 and report["by_type"]["colour"] == 1.0


def test_predictions_file_holds_each_records_greedy_answer(tiny_llava_dir, small_dataset, tmp_path):
    manifest, images = small_dataset
    hits, _ = _reference(tiny_llava_dir, manifest, images)
    out = tmp_path / "p.jsonl"
    result = CliRunner().invoke(main, ["eval", "--model", str(tiny_llava_dir), "--data", str(manifest), "--images",
                                       str(images), "--max-new-tokens", "5", "--predictions", str(out),
                                       "--no-progress"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    records = json.loads(manifest.read_text())
    assert [r["id"] for r in rows] == [rec["id"] for rec in records]
    assert [int(r["correct"]) for r in rows] == hits  # the per-sample reference's own greedy hits
    for row, rec in zip(rows, records):
        assert normalise_answer(row["answer"]) == normalise_answer(rec["conversations"][-1]["value"])
        assert row["correct"] == (normalise_answer(row["prediction"]) == normalise_answer(row["answer"]))
    assert not list(tmp_path.glob("*.tmp"))


def _one_sentence(result) -> str:
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_bad_eval_options_are_one_sentence(tiny_llava_dir, small_dataset):
    manifest, images = small_dataset
    base = ["eval", "--model", str(tiny_llava_dir), "--data", str(manifest), "--images", str(images), "--no-progress"]
    for extra, message in [(["--max-new-tokens", "0"], "--max-new-tokens must be at least 1."),
                           (["--max-new-tokens", "-1"], "--max-new-tokens must be at least 1."),
                           (["--limit", "0"], "--limit must be at least 1, not 0."),
                           (["--limit", "-1"], "--limit must be at least 1, not -1."),  # used to drop the last row
                           (["--max-length", "0"], "--max-length must be at least 1."),
                           (["--predictions", "/no/such/dir/p.jsonl"],
                            "--predictions /no/such/dir/p.jsonl: its directory does not exist.")]:
        assert _one_sentence(CliRunner().invoke(main, base + extra)) == f"error: {message}", extra


def test_eval_refuses_a_non_finite_answer_ce(tiny_llava_dir, small_dataset, tmp_path):
    """Finite weights can still overflow: a head scaled to 1e38 gives inf logits and CE nan."""
    import shutil

    from safetensors.torch import load_file, save_file

    manifest, images = small_dataset
    model = tmp_path / "overflowing"
    shutil.copytree(tiny_llava_dir, model)
    weights = load_file(model / "model.safetensors")
    head = next(k for k in weights if "lm_head" in k or "embed_tokens" in k)
    weights[head] = weights[head].sign() * 1e38 + 1e38 * (weights[head] == 0)
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    line = _one_sentence(CliRunner().invoke(main, ["eval", "--model", str(model), "--data", str(manifest),
                                                   "--images", str(images), "--no-progress"]))
    assert line.startswith(f"error: model {model} gives a non-finite answer CE (") and "cannot be scored" in line


def test_records_eval_cannot_score_are_counted_by_reason(tiny_llava_dir, small_dataset, tmp_path):
    """Skipped records are listed by reject reason, as `rejects` lists them (issue 25)."""
    manifest, images = small_dataset
    records = json.loads(manifest.read_text())
    records[0]["image"] = "nope.png"                                  # missing_image
    records[1]["conversations"] = records[1]["conversations"][:1]     # bad_conversation (no answer)
    records[2]["image"] = "nope.png"
    (tmp_path / "m.json").write_text(json.dumps(records))
    args = ["eval", "--model", str(tiny_llava_dir), "--data", str(tmp_path / "m.json"), "--images", str(images),
            "--max-new-tokens", "2", "--no-progress"]
    line = CliRunner().invoke(main, args).output.splitlines()[0]
    assert line.endswith("over 3 samples, answer CE " + line.split("answer CE ")[1].split(",")[0]
                         + ", 3 skipped (1 bad_conversation, 2 missing_image)"), line
    report = json.loads(CliRunner().invoke(main, args + ["--json"]).output)
    assert report["skipped"] == 3 and report["skipped_by_reason"] == {"bad_conversation": 1, "missing_image": 2}
