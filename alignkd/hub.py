"""Resolve a model argument (--teacher, --student, --model) to a directory to load.

Every Hugging Face tool accepts `Qwen/Qwen2.5-VL-7B-Instruct` where it accepts a path, so
alignkd does too. A value that is an existing path is used as is: `load_vlm` and its
refusals apply unchanged. Any other value shaped like a hub repo id ("org/name" or
"name", optionally "@revision") is looked up in the local Hugging Face cache and, unless
offline mode is on, downloaded into it; the cache's snapshot directory is then loaded like
any local directory. Its commit hash is what a cache build records as the teacher's
revision, so a cache says exactly which commit of a named teacher wrote it.

A snapshot already in the cache is used without asking the Hub (no network, no silent
move of "main" under a resumed build). The environment (HF_HUB_OFFLINE, HF_HUB_CACHE,
HF_HOME, HF_ENDPOINT) is read at call time, not at import time as
`huggingface_hub.constants` does, so a notebook or a test that sets it later is honoured.
A download takes only what alignkd loads: config, tokenizer, processor and chat-template
files, then the safetensors shards the index names (a repo that also ships consolidated
weights is not fetched twice); never .bin/.pt pickles, which can run code on load.

It sits beside errors.py, not in models/: the configs check their model argument with it
when they are built, and importing models/ imports torch.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from alignkd.errors import AlignKDError, check_dir

METADATA_PATTERNS = ["*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken"]  # config, index, tokenizer, processor
CODE_PATTERNS = ["*.py"]  # a model's own code, fetched only under --trust-remote-code
WEIGHTS_INDEX, SINGLE_WEIGHTS = "model.safetensors.index.json", "model.safetensors"  # transformers' names
REVISION = re.compile(r"[\w.-][\w./-]*")  # a branch, tag ("v1.0", "refs/pr/1") or commit hash


@dataclass(frozen=True)
class ModelSource:
    """Where a model argument points: a directory, plus the hub id and commit it came from."""

    path: Path
    repo_id: str | None = None
    revision: str | None = None  # the snapshot's commit hash; None for a local directory


def parse_hub_id(value) -> tuple[str, str | None] | None:
    """(repo_id, revision) for "org/name[@revision]" or "name[@revision]"; None for anything else."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id, at, revision = str(value).partition("@")
    if at and (not REVISION.fullmatch(revision) or ".." in revision):  # a ref name never climbs out of refs/
        return None
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return repo_id, revision or None


def is_local(value) -> bool:
    """An existing path, or a value that cannot be a hub id: either way today's path checks apply."""
    return Path(value).exists() or parse_hub_id(value) is None


def hub_cache_dir() -> Path:
    """The hub cache huggingface_hub would use, by the same precedence, read now."""
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                              "huggingface")
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def is_offline() -> bool:
    return any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_model_arg(value, option: str, what: str) -> None:
    """The config-time check of a model argument; never downloads.

    A path must be a directory (`what` names it as before). A hub id is checked against
    the local cache only in offline mode; otherwise it is fetched when the run starts.
    """
    if is_local(value):
        check_dir(value, what)
    elif is_offline():
        resolve_model(value, option)


def resolve_model(value, option: str = "--model", *, trust_remote_code: bool = False) -> ModelSource:
    """The directory `value` names: itself when it is a path, else its hub-cache snapshot."""
    if is_local(value):
        return ModelSource(Path(value))
    repo_id, revision = parse_hub_id(value)
    cache = hub_cache_dir()
    snapshot = _cached_snapshot(repo_id, revision, cache)
    if snapshot is None or not _has_weights(snapshot):
        if is_offline():
            state = "is neither a local directory nor" if snapshot is None else "is only partly"
            raise AlignKDError(f"{option} {value} {state} in the local Hugging Face cache at {cache}, and "
                               "offline mode (HF_HUB_OFFLINE=1) forbids downloading it.")
        snapshot = _download(value, option, repo_id, revision, cache, trust_remote_code)
    return ModelSource(snapshot, repo_id, snapshot.name)


def _cached_snapshot(repo_id: str, revision: str | None, cache: Path) -> Path | None:
    """The cached snapshot of `revision` (a branch, tag or commit hash), with no network call.

    Only config.json is asked for: a snapshot that huggingface_hub knows is partial is then
    still found, and `_has_weights` decides whether it is enough.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True,
                                      allow_patterns=["config.json"]))
    except LocalEntryNotFoundError:
        return None


def _has_weights(snapshot: Path) -> bool:
    """config.json and the safetensors weights: every shard its index names, or at least one file."""
    if not (snapshot / "config.json").is_file():
        return False
    index = snapshot / WEIGHTS_INDEX
    if not index.is_file():
        return any(snapshot.glob("*.safetensors"))
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, AttributeError):
        return True  # present but unreadable: load_vlm names the damaged part
    return all((snapshot / s).is_file() for s in shards)


def _download(value, option: str, repo_id: str, revision: str | None, cache: Path, trust_remote_code: bool) -> Path:
    """Fetch the metadata files, then exactly the safetensors shards they name; one sentence on failure."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or None
    where = endpoint or "the Hugging Face Hub"
    try:
        patterns = METADATA_PATTERNS + (CODE_PATTERNS if trust_remote_code else [])
        snapshot = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, endpoint=endpoint,
                                          allow_patterns=patterns))
        index = snapshot / WEIGHTS_INDEX
        weights = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
                   else [SINGLE_WEIGHTS])
        snapshot_download(repo_id, revision=snapshot.name, cache_dir=cache, endpoint=endpoint, allow_patterns=weights)
    except Exception as exc:  # noqa: BLE001 - httpx, HTTP status and cache errors all mean "could not fetch it"
        # a connection error reaches us wrapped in LocalEntryNotFoundError; name the connection error
        cause = exc.__cause__ if isinstance(exc, LocalEntryNotFoundError) and exc.__cause__ else exc
        detail = (str(cause).strip().splitlines() or [""])[0][:200].rstrip(".")
        raise AlignKDError(f"{option} {value} is neither a local directory nor in the local Hugging Face cache at "
                           f"{cache}, and downloading it from {where} failed ({type(cause).__name__}: {detail})."
                           ) from None
    if not _has_weights(snapshot):
        raise AlignKDError(f"{option} {value} (revision {snapshot.name}) has no config.json or no safetensors "
                           f"weights on {where}; alignkd loads safetensors only.")
    return snapshot


def parse_dataset_arg(value) -> tuple[str, str | None, str | None, str | None] | None:
    """(repo_id, revision, config, split) for "org/name[@revision][:config[/split]]"; None otherwise.

    Only "org/name" ids count: a bare "name" is far more likely a mistyped file name.
    """
    head, _, choice = str(value).partition(":")
    parsed = parse_hub_id(head)
    if parsed is None or "/" not in parsed[0]:
        return None
    config, _, split = choice.partition("/")
    return (*parsed, config or None, split or None)


def resolve_dataset(value, repo_id: str, revision: str | None) -> Path:
    """The local Hugging Face cache's snapshot of a dataset repository; never downloads (a
    dataset can be hundreds of GB: fetching it is the user's explicit step)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", revision=revision, cache_dir=cache,
                                      local_files_only=True))
    except LocalEntryNotFoundError:
        raise AlignKDError(f"--data {value} is neither a file nor a dataset in the local Hugging Face cache at "
                           f"{cache}; fetch it first (`hf download --repo-type dataset {repo_id}`).") from None
