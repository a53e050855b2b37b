"""The alignkd CLI as torchrun starts it, with one rank held at a known moment so that a test
can SIGKILL it there: ALIGNKD_PAUSE_RANK=N (or "0,1") holds rank N, after its first committed
shard (`cache build`) or after its first checkpoint (`distill`), having written its PID to
ALIGNKD_PAUSE_MARKER plus "-rN". ALIGNKD_START_STEP=FILE records the step training starts from
(rank 0).
Nothing of alignkd is replaced: the real code runs up to the moment, then the process waits.
"""

import os
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from alignkd.cache import shard_commit
from alignkd.distill import trainer as hf_trainer


def hold() -> None:
    marker = Path(f"{os.environ['ALIGNKD_PAUSE_MARKER']}-r{os.environ['RANK']}")
    marker.with_suffix(".tmp").write_text(str(os.getpid()))
    marker.with_suffix(".tmp").rename(marker)
    time.sleep(600)


class Hold(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        hold()


class RecordStart(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            Path(os.environ["ALIGNKD_START_STEP"]).write_text(str(state.global_step))


def arm() -> None:
    extra = []
    if os.environ.get("RANK") in os.environ.get("ALIGNKD_PAUSE_RANK", "").split(","):
        commit = shard_commit.ShardInProgress.commit

        def commit_then_hold(self):
            doc = commit(self)
            hold()
            return doc

        shard_commit.ShardInProgress.commit = commit_then_hold
        extra.append(Hold())
    if os.environ.get("ALIGNKD_START_STEP"):
        extra.append(RecordStart())
    build = hf_trainer.build_callbacks
    hf_trainer.build_callbacks = lambda out: build(out) + extra


if __name__ == "__main__":
    arm()
    from alignkd.cli import main

    sys.argv[0] = "alignkd"
    main()
