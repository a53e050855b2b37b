"""The alignkd CLI as torchrun starts it, with accelerate's FSDP allowed on CPU processes.

accelerate 1.16 turns its FSDP plugin on only for accelerator devices (GPUs, NPUs, ...):
for CPU processes it keeps `MULTI_CPU` and the Trainer silently trains with DDP. torch's
FSDP2 (`fully_shard`) itself runs on CPU over gloo, so this launcher makes that one
decision the other way (a CPU process group with an FSDP plugin becomes `FSDP`) and leaves
everything else to the real code: the Trainer's FSDP2 preparation, its sharded
checkpoints and resume, accelerate's full-state-dict gather, alignkd's export.
It is the only thing changed, and only in the tests' launcher.
"""

import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType


def allow_fsdp_on_cpu() -> None:
    init = AcceleratorState.__init__

    def init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type  # as accelerate does for GPUs

    AcceleratorState.__init__ = init_with_fsdp_on_cpu


if __name__ == "__main__":
    allow_fsdp_on_cpu()
    from alignkd.cli import main

    sys.argv[0] = "alignkd"
    main()
