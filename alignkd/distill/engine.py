"""The Hugging Face Trainer, taught to log each Align-KD term and to checkpoint tied weights.

Per-term losses come back from the objective's forward; we average them over the
logging window exactly as the Trainer averages its own `loss`, so the JSONL, the
TensorBoard scalars and the progress bar all show the same numbers.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import torch
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback


class QuietProgressCallback(ProgressCallback):
    """The Trainer's progress bar without its `str(logs)` line per logging step: the
    per-step records go to metrics.jsonl (and TensorBoard), the console keeps one bar."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return


class AlignKDTrainer(Trainer):
    def __init__(self, *args, grad_share_steps: int = 0, train_order=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.train_order = train_order  # a sampling.TrainOrder; None: the Trainer's own sampler
        # One bar, no per-step dicts on the console: they go to metrics.jsonl / TensorBoard.
        self.pop_callback(PrinterCallback)
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(QuietProgressCallback)
        self.grad_share_steps = grad_share_steps
        self._term_sums: dict[str, float] = defaultdict(float)
        self._term_count = 0
        self._last_terms: dict[str, float] = {}
        self._share_sums: dict[str, list[float]] = defaultdict(list)

    def _get_train_sampler(self, train_dataset=None):
        from alignkd.distill.sampling import make_sampler

        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.train_order is None or not hasattr(dataset, "shard_of"):
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return make_sampler(self.train_order, dataset.shard_of, seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        objective = self.accelerator.unwrap_model(model)
        every = self.grad_share_steps
        objective.measure_grad_shares = bool(every) and self.state.global_step % every == 0
        outputs = model(**inputs)
        if model.training:
            for key, value in outputs.items():
                if key.startswith("loss_"):
                    self._term_sums[key] += float(value)
                elif key.startswith("gshare_"):
                    self._share_sums[key].append(float(value))
            self._term_count += 1
        loss = outputs["loss"]
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._term_count and "loss" in logs:
            from alignkd.distributed import all_reduce_sum

            # averaged over ranks too, like the Trainer's own `loss`
            keys = sorted(self._term_sums)
            sums = all_reduce_sum([self._term_sums[k] for k in keys] + [self._term_count])
            terms = {k: v / sums[-1] for k, v in zip(keys, sums[:-1])}
            logs.update(terms)  # unrounded: the attention MSE on probabilities is ~1e-6
            logs.update({k: sum(v) / len(v) for k, v in self._share_sums.items()})  # rank 0's measurement
            self._last_terms = terms
            self._term_sums.clear()
            self._share_sums.clear()
            self._term_count = 0
        super().log(logs, start_time)

    def last_terms(self) -> dict[str, float]:
        return dict(self._last_terms)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Tied embeddings share storage, which safetensors' save_file refuses; save_model
        # de-duplicates them and the Trainer's non-strict load restores the tie.
        import safetensors.torch

        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        safetensors.torch.save_model(self.accelerator.unwrap_model(self.model),
                                     os.path.join(output_dir, "model.safetensors"))


class JsonlMetrics(TrainerCallback):
    """Append every logged record (step, lr, each loss term) to metrics.jsonl.

    A run resumed from checkpoint N logs steps N+1... again, so at the start of training
    the file is cut back to the records of steps <= N (and an interrupted run's closing
    summary is dropped): each step appears once, whatever was logged before the kill.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.path.is_file():
            keep_metrics_until(self.path, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as fh:
                fh.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def keep_metrics_until(path: Path, step: int) -> None:
    """Rewrite metrics.jsonl (atomically) with only the per-step records of steps <= `step`."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by the kill
            continue
        if record.get("step", 0) <= step and "train_runtime" not in record:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def build_callbacks(out: Path) -> list[TrainerCallback]:
    return [JsonlMetrics(Path(out) / "metrics.jsonl")]
