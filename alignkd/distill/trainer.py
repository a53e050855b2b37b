"""The Hugging Face Trainer, taught to log each Align-KD term and to checkpoint tied weights.

Per-term losses come back from the objective's forward; we average them over the
logging window exactly as the Trainer averages its own `loss`, so the JSONL, the
TensorBoard scalars and the progress bar all show the same numbers.

A nan/inf loss term, or a parameter the optimizer step left non-finite, stops the run
(alignkd.distill.finite) before any checkpoint or export can hold it. Checkpoints are
written under a staging name and renamed whole (alignkd.distill.saving).
"""

from __future__ import annotations

import json
import os
import shutil
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
    def __init__(self, *args, grad_share_steps: int = 0, train_order=None, align_fade: float = 0.0,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.align_fade = align_fade  # alignkd.distill.terms.faded, applied at each step
        self._base_weights = None
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
        self._staging: str | None = None  # set while a checkpoint is being written
        self.add_callback(FiniteParameters())

    def _get_train_sampler(self, train_dataset=None):
        from alignkd.distill.sampling import make_sampler

        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.train_order is None or not hasattr(dataset, "shard_of"):
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return make_sampler(self.train_order, dataset.shard_of, seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        objective = self.accelerator.unwrap_model(model)
        if self.align_fade > 0 and model.training:
            self._fade_weights(objective)
        every = self.grad_share_steps
        objective.measure_grad_shares = bool(every) and self.state.global_step % every == 0
        outputs = model(**inputs)
        if model.training:
            from alignkd.distill.finite import check_loss_terms

            check_loss_terms(self.state.global_step + 1, outputs["loss"],
                             {k.removeprefix("loss_"): v for k, v in outputs.items() if k.startswith("loss_")})
            for key, value in outputs.items():
                if key.startswith("loss_"):
                    self._term_sums[key] += float(value)
                elif key.startswith("gshare_"):
                    self._share_sums[key].append(float(value))
            self._term_count += 1
        loss = outputs["loss"]
        return (loss, outputs) if return_outputs else loss

    def _fade_weights(self, objective) -> None:
        """The objective's weights at this step of `--align-fade`: a function of the step alone, so a
        resumed run picks the schedule up where it stopped."""
        from alignkd.distill.terms import faded

        if self._base_weights is None:
            self._base_weights = objective.weights
        progress = self.state.global_step / max(self.state.max_steps, 1)
        objective.weights = faded(self._base_weights, progress, self.align_fade)

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

    def _run_epoch(self, *args, **kwargs):
        # Resumed from the final checkpoint in mid-epoch (a run killed while exporting), the
        # Trainer (5.x) would run one step past max_steps before its end-of-step check.
        if self.state.global_step >= self.state.max_steps > 0:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _get_output_dir(self, trial) -> str:
        return self._staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written whole under checkpoints/.tmp-checkpoint/ and then
        renamed: a full disk or a kill mid-save leaves no checkpoint-N to resume from."""
        from alignkd.distill.saving import STAGING, checkpoint_bytes, is_write_failure, publish_checkpoint, \
            write_failure

        root = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        staging = root / STAGING
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # a save cut off earlier
        self.accelerator.wait_for_everyone()  # every rank writes its RNG state into the staged checkpoint
        self._staging = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        except Exception as err:
            if not is_write_failure(err):
                raise
            shutil.rmtree(staging, ignore_errors=True)
            raise write_failure("a checkpoint", root / name,
                                err, checkpoint_bytes(self.accelerator.unwrap_model(model), self.optimizer)) from None
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish_checkpoint(staging / name, root / name)
            shutil.rmtree(staging, ignore_errors=True)

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


class FiniteParameters(TrainerCallback):
    """After each optimizer step (before any log or checkpoint), stop if a trainable
    parameter holds nan or inf. One fused reduction per device, see alignkd.distill.finite."""

    def __init__(self) -> None:
        self._named: list | None = None

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        from alignkd.distill.finite import check_parameters

        if self._named is None:  # after the Trainer wrapped the model (FSDP swaps the parameters)
            self._named = [(name.removeprefix("student."), p) for name, p in model.named_parameters()
                           if p.requires_grad]
        check_parameters(state.global_step + 1, self._named)


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
    from alignkd.distill.outdir import write_text_atomically

    write_text_atomically(path, "".join(kept))


def build_callbacks(out: Path) -> list[TrainerCallback]:
    return [JsonlMetrics(Path(out) / "metrics.jsonl")]
