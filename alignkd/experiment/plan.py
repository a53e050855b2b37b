"""What an experiment trains: arms (named `alignkd distill` flags), worlds and their recipes.

An arm is a set of `distill` flags; the objective presets (`alignkd.distill.terms.PRESETS`)
are the one definition of each objective, and the default preset runs with no flags. A
world is a directory a user can make without reading our code (docs/efficacy.md):

    WORLD/teacher/  WORLD/student/  WORLD/train_student.json  WORLD/val.json  WORLD/test.json
    WORLD/images/   WORLD/recipe.json (optional: steps, batch_size, lr, warmup_ratio)
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from alignkd.distill.terms import DEFAULT_PRESET, PRESETS
from alignkd.errors import ConfigError

RECIPE_DEFAULTS = {"steps": 1500, "batch_size": 32, "lr": 1e-3, "warmup_ratio": 0.0}
WORLD_FILES = ("teacher", "student", "train_student.json", "images")


@dataclass(frozen=True)
class Arm:
    name: str
    flags: str = ""  # `alignkd distill` flags, as typed on a command line

    @classmethod
    def of_preset(cls, name: str, preset: str) -> "Arm":
        """The arm that trains objective preset `preset` (no flags for the default one)."""
        if preset not in PRESETS:
            raise ConfigError(f"arm {name!r}: unknown objective preset {preset!r}; choose one of {', '.join(PRESETS)}.")
        return cls(name, "" if preset == DEFAULT_PRESET else f"--preset {preset}")

    def argv(self) -> list[str]:
        return shlex.split(self.flags)


def preset_arms() -> list[Arm]:
    """One arm per objective preset, in the presets' order; the default preset's arm is `alignkd`."""
    return [Arm.of_preset("alignkd" if p == DEFAULT_PRESET else p, p) for p in PRESETS]


def parse_arm(text: str) -> Arm:
    """`NAME="distill flags"` (the command line's form of an arm)."""
    name, sep, flags = text.partition("=")
    if not sep or not name.strip():
        raise ConfigError(f"--arm {text!r}: expected NAME=\"distill flags\".")
    return Arm(name.strip(), flags)


@dataclass(frozen=True)
class Student:
    """One distill run: an arm at a seed, trained into `run`."""
    arm: Arm
    seed: int
    run: Path


@dataclass(frozen=True)
class World:
    root: Path
    recipe: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.root.name

    def split(self, name: str) -> Path:
        return self.root / f"{name}.json"

    def teacher_digest(self) -> str:
        """The teacher's weights, hashed: another teacher never reuses this world's runs."""
        weights = sorted((self.root / "teacher").glob("*.safetensors"))
        return hashlib.sha256(b"".join(w.read_bytes() for w in weights)).hexdigest()[:16]


def load_world(root: str, overrides: dict) -> World:
    """The world at `root` with its recipe (recipe.json, then the command line's overrides)."""
    path = Path(root)
    missing = [name for name in WORLD_FILES if not (path / name).exists()]
    if missing:
        raise ConfigError(f"world {path} lacks {', '.join(missing)} (a world holds {', '.join(WORLD_FILES)} and "
                          "val.json/test.json; see docs/efficacy.md).")
    recipe = dict(RECIPE_DEFAULTS)
    if (path / "recipe.json").is_file():
        stored = json.loads((path / "recipe.json").read_text())
        unknown = sorted(set(stored) - set(RECIPE_DEFAULTS))
        if unknown:
            raise ConfigError(f"{path / 'recipe.json'}: unknown keys {unknown}; known: {sorted(RECIPE_DEFAULTS)}.")
        recipe.update(stored)
    recipe.update({k: v for k, v in overrides.items() if v is not None})
    return World(path, recipe)


def recipe_flags(recipe: dict) -> list[str]:
    """The `distill` flags of a recipe."""
    return ["--max-steps", str(recipe["steps"]), "--batch-size", str(recipe["batch_size"]),
            "--lr", str(recipe["lr"]), "--warmup-ratio", str(recipe["warmup_ratio"])]


# Before the presets the CE-only arm was these flags (the same objective, bit for bit): its run
# directories keep their names, so an earlier efficacy --out is reused rather than trained again.
SAME_RUN_AS = {"--preset ce": "--w-logit 0 --w-attn 0 --w-vis 0"}


def hashed_run_name(recipe: dict, arm: Arm, seed: int) -> str:
    """The efficacy bench's run directory name: the recipe, a hash of the arm's flags and the seed,
    so changing either never reuses a stale run."""
    flags = arm.flags.strip()
    tag = hashlib.sha256(SAME_RUN_AS.get(flags, flags).encode()).hexdigest()[:8]
    r = recipe
    return f"{r['steps']}steps-b{r['batch_size']}-lr{r['lr']:g}-w{r['warmup_ratio']:g}-x{tag}-seed{seed}"
