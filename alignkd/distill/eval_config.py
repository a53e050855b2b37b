"""`alignkd eval`'s settings, declared once (alignkd.settings): the command's options are
generated from these fields. Imports nothing heavy, so `alignkd --help` stays instant;
the scoring itself is alignkd.distill.evaluate."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alignkd.errors import ConfigError, check_at_least_one
from alignkd.hub import check_model_arg
from alignkd.settings import setting


@dataclass(frozen=True)
class EvalConfig:
    model: str = setting(help="Any saved student or teacher directory, or a hub id org/name[@revision].")
    data: str = setting(help="Held-out records: JSON/JSONL manifest or Parquet file/directory.")
    images: str | None = setting(None, type=str, help="Image root for the records' image paths.")
    max_length: int = setting(2048)
    max_new_tokens: int = setting(16)
    batch_size: int = setting(64, help="Records answered per generate call.")
    limit: int | None = setting(None, type=int)
    progress: bool = setting(True, cli=False)  # the command's --no-progress
    # JSONL: each scored record's id, greedy answer, reference and hit
    predictions: str | None = setting(None, type=str, help="Write each scored record's greedy answer as JSON "
                                                            "lines (id, prediction, answer, correct).")

    def __post_init__(self) -> None:
        check_at_least_one(self, ("max_length", "max_new_tokens", "batch_size"))
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be at least 1, not {self.limit}.")
        check_model_arg(self.model, "--model", "model directory")
        if not Path(self.data).exists():
            raise ConfigError(f"manifest {self.data} does not exist.")
        if self.images is not None and not Path(self.images).is_dir():
            raise ConfigError(f"images directory {self.images} does not exist.")
        if self.predictions is not None and not Path(self.predictions).parent.is_dir():
            raise ConfigError(f"--predictions {self.predictions}: its directory does not exist.")
