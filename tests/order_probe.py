"""The training order as the Hugging Face Trainer really draws it, on one process or under
torchrun: AlignKDTrainer trains a one-parameter model over a dataset of N indices (shards of
SHARD samples) for EPOCHS epochs and writes, per rank, every index its forward saw, in order.

    python tests/order_probe.py OUT ORDER[,ORDER...] SEED     (also under torchrun --nproc-per-node 2)

writes OUT/ORDER-rRANK.json for each order (":" in the name becomes "-").
"""

import json
import os
import sys

import numpy as np
import torch
from torch import nn
from transformers import TrainingArguments

from alignkd.distill.trainer import AlignKDTrainer
from alignkd.distill.sampling import parse_order

N, SHARD, BATCH, EPOCHS = 48, 8, 4, 3


class Indices(torch.utils.data.Dataset):
    shard_of = np.arange(N) // SHARD

    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"index": torch.tensor(i)}


class Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.seen = []

    def forward(self, index):
        self.seen.extend(index.tolist())
        return {"loss": self.w * index.float().mean()}


def probe(out: str, order: str, seed: int) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = TrainingArguments(output_dir=os.path.join(out, "trainer"), per_device_train_batch_size=BATCH,
                             num_train_epochs=EPOCHS, seed=seed, data_seed=seed, save_strategy="no", report_to=[],
                             remove_unused_columns=False, use_cpu=True, disable_tqdm=True, learning_rate=0.0,
                             ddp_backend="gloo" if world > 1 else None, dataloader_num_workers=0)
    model = Recorder()
    trainer = AlignKDTrainer(model=model, args=args, train_dataset=Indices(), train_order=parse_order(order))
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(out, f"{order.replace(':', '-')}-r{rank}.json"), "w") as fh:
        json.dump(model.seen, fh)


if __name__ == "__main__":
    for name in sys.argv[2].split(","):
        probe(sys.argv[1], name, int(sys.argv[3]))
