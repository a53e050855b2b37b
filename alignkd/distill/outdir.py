"""Where `alignkd distill` may write: never over one of its inputs, never over files it did not write.

An export puts `config.json` and `model.safetensors` into --out, and `from_pretrained`
takes any directory holding them for a model: pointed at the teacher, the student, the
cache or a user's folder, a run would silently replace what was there. So --out must be
new or empty, or hold this very run (`--resume`, checked against the run's record), or
`--overwrite` is given, which removes only what a distill run wrote (its record says which
files) and refuses a directory whose distill-named files (`checkpoints/`, `metrics.jsonl`...)
another program wrote. An --out that is, is inside, or contains an input (student, cache,
images, or the teacher the cache was built from) is refused whatever the flags.

The record is written before step 1 to `checkpoints/run.json` (a run in progress); the
export writes the same record, plus the exported file names, to `distill_run.json`, whose
presence the benches and the demo take to mean a finished run.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from alignkd.errors import ConfigError

RECORD = Path("checkpoints") / "run.json"
FINISHED = "distill_run.json"
# Every name a distill run puts in --out besides the exported student (listed in its record).
OWN = ("checkpoints", "metrics.jsonl", "tensorboard", ".tmp-export", FINISHED, "loss_curves.png",
       "adapters.safetensors")
MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def run_inputs(cfg) -> dict[str, str]:
    """What makes two runs the same run: the student and the cache, as absolute paths."""
    return {"student": _absolute(cfg.student), "cache": _absolute(cfg.cache)}


def _absolute(value: str) -> str:
    from alignkd.cache.storage import is_object_url
    from alignkd.hub import is_local

    # a URL names no directory here
    return str(Path(value).resolve()) if not is_object_url(value) and is_local(value) else str(value)


def run_record(cfg, cache_meta: dict) -> dict:
    return {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
            "inputs": run_inputs(cfg),
            "cache_teacher": cache_meta.get("teacher", {}), "cache_options": cache_meta.get("build_options", {})}


def read_record(out: Path) -> dict | None:
    """The run record in --out (a run in progress, else a finished one), or None."""
    for path in (out / RECORD, out / FINISHED):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get("config"), dict):
            return record
    return None


def recorded_inputs(record: dict) -> dict[str, str]:
    """A record's inputs; records written before they were kept name them in the config."""
    if "inputs" in record:
        return record["inputs"]
    config = record["config"]
    return {k: _absolute(str(config.get(k, ""))) for k in ("student", "cache")}


def check_out(cfg) -> None:
    """Refuse an --out this run must not write into (see the module docstring)."""
    _check_not_an_input(cfg)
    out = Path(cfg.out)
    found = describe_contents(out)
    record = read_record(out) if found else None
    if cfg.resume:
        if found is None:
            raise ConfigError(f"--resume: no complete checkpoint found under {out / 'checkpoints'}.")
        if record is None:
            raise ConfigError(f"--resume: --out {out} holds {found}, not a distill run to continue.")
        theirs, ours = recorded_inputs(record), run_inputs(cfg)
        if theirs != ours:
            raise ConfigError(f"--resume: --out {out} is a run of student {theirs['student']} on cache "
                              f"{theirs['cache']}, not of student {ours['student']} on cache {ours['cache']}.")
    elif cfg.overwrite:
        foreign = [name for name in OWN if (out / name).exists()] if record is None else []
        if foreign:
            raise ConfigError(f"--overwrite: --out {out} holds {foreign[0]} but no distill run record, so "
                              "alignkd did not write it and will not delete it; choose another --out.")
    elif found is not None:
        raise ConfigError(f"--out {out} already holds {found}; choose a new or empty directory, pass --resume "
                          "to continue this run, or --overwrite to replace a run's files.")


def _check_not_an_input(cfg) -> None:
    from alignkd.cache.storage import is_object_url

    out = Path(cfg.out).resolve()
    inputs = {"--student": cfg.student, "--cache": cfg.cache, "--images": cfg.images,
              "cache's teacher": _cache_teacher(cfg.cache)}
    for option, value in inputs.items():
        if value is None or is_object_url(value) or not Path(value).exists():
            continue  # a hub id or a URL is not a directory --out could land in
        path = Path(value).resolve()
        relation = ("is" if path == out else "is inside" if path in out.parents
                    else "contains" if out in path.parents else None)
        if relation:
            raise ConfigError(f"--out {cfg.out} {relation} the {option} directory {value}; the run would write "
                              "over its own input: choose a directory of its own for --out.")


def _cache_teacher(cache: str) -> str | None:
    """The teacher directory a local cache was built from, as its cache.json names it."""
    from alignkd.storage_schemas import CACHE_JSON

    try:
        return str(json.loads((Path(cache) / CACHE_JSON).read_text())["teacher"]["path"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a URL, or a damaged cache that open_cache will name


def describe_contents(out: Path) -> str | None:
    """What an existing --out holds, in words; None when it is missing or empty."""
    if not out.is_dir():
        return None
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return None
    if read_record(out) is not None:
        return f"a distill run ({RECORD if (out / RECORD).is_file() else FINISHED})"
    if "cache.json" in names:
        return "a cache (cache.json)"
    model = [n for n in names if n in MODEL_FILES or n.endswith(".safetensors")]
    if model:
        return f"a model ({model[0]})"
    return f"files this run did not write ({names[0]}{' and more' if len(names) > 1 else ''})"


def prepare_out(cfg, cache_meta: dict) -> None:
    """Rank 0, before step 1: clear a replaced run (--overwrite), then record this one."""
    out = Path(cfg.out)
    if cfg.overwrite:
        remove_run_files(out)
    write_json_atomically(out / RECORD, run_record(cfg, cache_meta))


def remove_run_files(out: Path) -> None:
    """Delete what a recorded distill run wrote: its own names and its exported files, nothing else."""
    record = read_record(out)
    if record is None:
        return  # check_out let this through only when no distill-named file is there
    listed = [n for n in record.get("files") or [] if isinstance(n, str) and Path(n).name == n
              and n not in ("", ".", "..")]  # plain names in --out only, whatever the record says
    for name in [*OWN, *listed]:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def write_text_atomically(path: Path, text: str) -> None:
    """`text` at `path`, whole or not at all: written under a temporary name, then renamed; a
    failed write leaves no temporary file behind."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomically(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps(doc, indent=2))
