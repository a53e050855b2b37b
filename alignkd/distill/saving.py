"""A write that fails for want of space (a checkpoint, the export) is one sentence, not a traceback.

torch.save reports a full disk as `RuntimeError: unexpected pos 704 vs 598` and safetensors
as `SafetensorError: ... (os error 28)`; neither says which file or how much it wanted.
`write_failure` names the path, what the write needed, what the disk has free and, when
the OS gave one, its reason; a file size limit (`ulimit -f`, RLIMIT_FSIZE) is named too.
Checkpoints are written under `checkpoints/.tmp-checkpoint/` and renamed into place, so a
failed or killed save never leaves a `checkpoint-N` that `--resume` could take.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

from alignkd.errors import AlignKDError

STAGING = ".tmp-checkpoint"


class WriteError(AlignKDError):
    """A checkpoint or export could not be written (full disk, file size limit, I/O error)."""


def is_write_failure(err: BaseException) -> bool:
    """An error a failed write raises: not a collective that lost a peer (alignkd.distributed)."""
    from alignkd.distributed import is_peer_failure

    if isinstance(err, RuntimeError) and is_peer_failure(err):
        return False
    return isinstance(err, (OSError, RuntimeError)) or type(err).__name__ == "SafetensorError"


def write_failure(what: str, path, err: BaseException, needed: int) -> WriteError:
    """One sentence: which path, why, how much was needed and how much is free."""
    free = _free_bytes(Path(path))
    room = f"about {megabytes(needed)} needed, {megabytes(free)} free there" if free is not None \
        else f"about {megabytes(needed)} needed"
    return WriteError(f"cannot write {what} to {path}: {_reason(err, needed, free)} ({room}); "
                      "make room and rerun with --resume.")


def _reason(err: BaseException, needed: int, free: int | None) -> str:
    code = err.errno if isinstance(err, OSError) and err.errno else None
    if code is None and (m := re.search(r"(?:os error|errno)\s*(\d+)", str(err), flags=re.I)):
        code = int(m.group(1))
    limit = _file_size_limit()
    if limit is not None and code in (None, errno.EFBIG):  # torch.save says neither
        return f"the file size limit (ulimit -f) is {megabytes(limit)}"
    if code is not None:
        words = os.strerror(code)
        return words[0].lower() + words[1:]
    if free is not None and free < needed:
        return "no space left on device"
    return f"the write failed ({str(err).splitlines()[0][:200]})"


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def _file_size_limit() -> int | None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def megabytes(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def tensor_bytes(tensors) -> int:
    import torch

    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def checkpoint_bytes(model, optimizer) -> int:
    """What a checkpoint holds, roughly: the weights and the optimizer's state tensors."""
    state = getattr(optimizer, "state", {}).values()
    return tensor_bytes(model.parameters()) + tensor_bytes(v for s in state for v in s.values())


def publish_checkpoint(staged: Path, final: Path) -> None:
    """Move a complete staged checkpoint into place (a leftover of the same step is replaced)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(staged, final)
