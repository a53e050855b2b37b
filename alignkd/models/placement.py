"""Where a teacher's weights live when it does not fit one device: accelerate's big-model loading.

`--device-map auto` (or balanced, balanced_low_0, sequential, or a JSON file naming a device
per module) is handed to `from_pretrained` unchanged, with `--max-memory` and an offload
folder, so transformers and accelerate place the layers and dispatch the model with their
own hooks: no pipeline of ours. What alignkd adds is what a dispatched model needs from
its caller:
- the inputs go to the device the input embeddings run on (`input_device`), which is not
  `model.device` (that is the first parameter's, `meta` when it was offloaded to disk);
- the captured tensors come from modules on different devices, so `capture_forward` moves
  them to the inputs' device;
- every option is checked here first, so a typo is one sentence naming it, not a traceback
  from inside accelerate after the teacher half loaded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from alignkd.errors import ConfigError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")  # what from_pretrained computes itself
_NAMED_DEVICES = ("cpu", "disk")
# --max-memory units, spelt out: accelerate reads a lowercase "b" as bits ("70gb" is 8.75 GB),
# so a size ending in "b" is refused rather than guessed, and what we hand on is plain bytes.
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([A-Za-z]*)$")


@dataclass(frozen=True)
class Placement:
    """A device map for `from_pretrained`: a strategy name or {module: device}, plus limits."""

    device_map: str | dict
    max_memory: dict | None = None
    offload_folder: str | None = None

    def describe(self) -> str:
        return self.device_map if isinstance(self.device_map, str) else "a device map file"


def parse_max_memory(text: str) -> dict:
    """"0=70GiB,1=70GiB,cpu=200GiB" -> {0: "70GiB", 1: "70GiB", "cpu": "200GiB"} (accelerate's form)."""
    limits: dict = {}
    for part in (p.strip() for p in text.split(",")):
        key, sep, size = (s.strip() for s in part.partition("="))
        if not sep or not key or not size:
            raise ConfigError(f"--max-memory {text!r}: each entry must read DEVICE=SIZE (e.g. 0=70GiB,cpu=200GiB), "
                              f"not {part!r}.")
        device = int(key) if key.isdigit() else key.lower()
        if not isinstance(device, int) and device not in _NAMED_DEVICES:
            raise ConfigError(f"--max-memory {text!r}: {key!r} is not a device; use a GPU index (0, 1, ...), "
                              "cpu or disk.")
        if device in limits:
            raise ConfigError(f"--max-memory {text!r} names {key} twice.")
        limits[device] = size_in_bytes(size, text)
    return limits


def size_in_bytes(size: str, text: str) -> int:
    """"70GiB" -> 75161927680. Units: B, KB, MB, GB, TB (powers of 1000), KiB ... TiB (of 1024)."""
    match = _SIZE.match(size)
    unit = match.group(2) if match else ""
    if match and unit.endswith("b"):
        number, prefix = match.group(1), unit[:1].upper() if len(unit) > 1 else ""
        ways = f"{number}{prefix}B or {number}{prefix}iB" if prefix else f"{number} (bytes)"
        raise ConfigError(f"--max-memory {text!r}: {size!r} ends in a lowercase b, which accelerate may read as bits; "
                          f"write {ways} instead.")
    if not match or unit.upper() not in UNITS:
        raise ConfigError(f"--max-memory {text!r}: {size!r} is not a size; use bytes or a number with "
                          "GiB, MiB, KiB, GB, MB or KB (e.g. 70GiB).")
    return int(float(match.group(1)) * UNITS[unit.upper()])


def parse_device_map(value: str) -> str | dict:
    """A strategy name, or a JSON file {module name: GPU index | "cuda:N" | "cpu" | "disk"}."""
    if value in STRATEGIES:
        return value
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"--device-map must be one of {', '.join(STRATEGIES)} or a JSON file mapping module "
                          f"names to devices; {value!r} is neither.")
    try:
        mapping = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"--device-map {value}: the file is not readable JSON ({err}).") from None
    if not isinstance(mapping, dict) or not mapping:
        raise ConfigError(f"--device-map {value}: the file must hold a non-empty JSON object {{module: device}}.")
    for module, device in mapping.items():
        mapping[module] = _device_of(device, f"--device-map {value}: module {module!r}")
    return mapping


def _device_of(device, where: str):
    if isinstance(device, int) and not isinstance(device, bool) and device >= 0:
        return device
    if isinstance(device, str) and (device in _NAMED_DEVICES or re.fullmatch(r"cuda:\d+", device)):
        return int(device.split(":")[1]) if device.startswith("cuda:") else device
    raise ConfigError(f"{where} is placed on {device!r}; use a GPU index, \"cuda:N\", \"cpu\" or \"disk\".")


def check_device(device: str, option: str = "--device") -> None:
    """A device torch knows and this machine has: cpu, cuda, cuda:N (N below the GPU count), mps."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{option} {device!r} is not a device; use cpu, cuda or cuda:N.") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count()
        if not count or (parsed.index is not None and parsed.index >= count):
            have = f"has {count} GPU(s), cuda:0 to cuda:{count - 1}" if count else "has no GPU that torch can use"
            raise ConfigError(f"{option} {device}: this machine {have} (torch.cuda.device_count() = {count}).")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{option} {device}: MPS is not available on this machine.")
    elif parsed.type not in ("cpu", "mps"):
        raise ConfigError(f"{option} {device!r}: alignkd runs the teacher on cpu, cuda or cuda:N, not {parsed.type}.")


def check_offload_folder(folder: str) -> None:
    """Create --offload-folder and write a file in it now: accelerate would fail half-way through
    loading, and the error would read as damaged teacher weights."""
    import tempfile

    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ConfigError(f"--offload-folder {folder} cannot be created or written ({reason[0].lower()}{reason[1:]}); "
                          "choose a writable directory for the modules placed on disk.") from None


def check_gpus(placement: Placement) -> None:
    """Refuse GPU indices this machine does not have (accelerate would only warn, then fail mid-load)."""
    import torch

    available = torch.cuda.device_count()
    named = [d for d in (placement.max_memory or {}) if isinstance(d, int)]
    if isinstance(placement.device_map, dict):
        named += [d for d in placement.device_map.values() if isinstance(d, int)]
    missing = sorted({d for d in named if d >= available})
    if missing:
        option = "--max-memory" if any(d in (placement.max_memory or {}) for d in missing) else "--device-map"
        raise ConfigError(f"{option} names GPU {missing[0]}, but this machine has {available} GPU(s) "
                          f"(torch.cuda.device_count() = {available}).")


def check_covers(model_dir: Path, config, placement: Placement, trust_remote_code: bool = False) -> None:
    """A device map file must name existing modules and place every weight. Checked on an empty
    (meta) model, before any weight is read, with accelerate's own coverage rule."""
    import torch
    from transformers import AutoModelForImageTextToText

    mapping = placement.device_map
    if not isinstance(mapping, dict) or "" in mapping:
        return
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, trust_remote_code=trust_remote_code)
    modules = dict(model.named_modules())
    unknown = [k for k in mapping if k not in modules]
    if unknown:
        raise ConfigError(f"--device-map names {unknown[0]!r}, which is not a module of {model_dir} "
                          f"(its top modules: {', '.join(n for n, _ in model.named_children())}).")
    uncovered = [name for name in model.state_dict()
                 if not any(name == k or name.startswith(k + ".") for k in mapping)]
    if uncovered:
        more = f" and {len(uncovered) - 1} more" if len(uncovered) > 1 else ""
        raise ConfigError(f"--device-map places no device for {uncovered[0]}{more}; every weight of {model_dir} "
                          "needs one (a module's entry covers everything under it).")


def from_pretrained_kwargs(placement: Placement) -> dict:
    return {"device_map": placement.device_map, "max_memory": placement.max_memory,
            "offload_folder": placement.offload_folder}


def input_device(model):
    """The device `input_ids` must be on: where the input embeddings run.

    A dispatched module's accelerate hook knows its execution device (a module placed on
    "cpu" or "disk" runs on the main GPU when there is one); otherwise it is where the
    embedding weight is. `model.device` is wrong here: it is the first parameter's, `meta`
    when that one was offloaded.
    """
    import torch

    embeddings = model.get_input_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    name = names[id(embeddings)]
    device_map = getattr(model, "hf_device_map", None) or {}
    # the embedding, or the nearest mapped module above it, carries the hook
    for prefix in _prefixes(name):
        module = model.get_submodule(prefix) if prefix else model
        hook = getattr(module, "_hf_hook", None)
        hooks = getattr(hook, "hooks", (hook,))  # accelerate's SequentialHook holds several
        execution = next((h.execution_device for h in hooks if getattr(h, "execution_device", None) is not None), None)
        if isinstance(execution, dict):  # a hook over a block holds one device per weight name
            execution = next(iter(execution.values()), None)
        if execution is not None:
            return torch.device(execution if not isinstance(execution, int) else f"cuda:{execution}")
        if prefix in device_map and device_map[prefix] not in _NAMED_DEVICES:
            device = device_map[prefix]
            return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return embeddings.weight.device


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), -1, -1)]


def placement_counts(model) -> dict[str, int]:
    """How many mapped modules sit on each device (for the build's summary line); {device: 1}
    when everything fit one device (transformers then dispatches nothing and keeps no map)."""
    mapped = getattr(model, "hf_device_map", None) or {"": next(model.parameters()).device}
    counts: dict[str, int] = {}
    for device in mapped.values():
        key = f"cuda:{device}" if isinstance(device, int) else str(device)
        counts[key] = counts.get(key, 0) + 1
    return counts
