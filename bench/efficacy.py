"""CE only against the default Align-KD objective on any world directory, through the public CLI only.

The product's claim is a better student, so it is measured on several small worlds, not
one. A *world* is a directory a user (or another team) can make without reading our code:

    WORLD/teacher/              the teacher, a Hugging Face model directory
    WORLD/student/              the student at initialisation (same tokenizer and image processor)
    WORLD/train_student.json    the student's training records (LLaVA manifest)
    WORLD/val.json              scored while tuning
    WORLD/test.json             scored for the report
    WORLD/images/               the image root of the three manifests
    WORLD/recipe.json           optional: {"steps": 1500, "batch_size": 32, "lr": 1e-3, "warmup_ratio": 0.0}

For each world the bench runs, as separate processes of the CLI:
1. `alignkd cache build --teacher WORLD/teacher --data WORLD/train_student.json ...` once;
2. per seed and arm, `alignkd distill --student WORLD/student --cache ... --seed S` with the
   world's recipe: the arm `alignkd` takes every objective default, the arm `ce` adds
   `--preset ce`, `--ablation` adds one arm per other objective preset (`--preset logits`,
   `logits+vision`, `logits+attention`), and `--arm NAME="FLAGS"` adds more;
3. `alignkd eval --json` of every student and of the teacher on the chosen split.

Two distills run at a time with one torch thread each. Every stage is skipped when its
output exists, so an interrupted bench resumes; run directories carry the recipe, seed
and a hash of the arm's flags, so changing either never reuses a stale run. It prints one
table: teacher, CE only, Align-KD (mean ± sample std over seeds), the gain, the spread of
the per-seed paired gains, the seeds Align-KD wins, and the share of the teacher-student
gap closed. With a `logits` arm (`--ablation`) a second table gives each other arm's paired
per-seed increment over logits only: what the vision and attention terms add to plain logit
distillation. Tune on `--split val`; report `--split test`.

    python bench/efficacy.py --world /work/worlds/digits --world /work/worlds/heldout \\
        --seeds 3 --split val --out /work/efficacy
    python bench/efficacy.py --world /work/worlds/digits --ablation --seeds 5 --split val --out /work/efficacy
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from alignkd.distill.terms import DEFAULT_PRESET, PRESETS

# An arm is a set of `distill` flags; the objective presets are the one definition of each
# objective (the default preset runs with no flags, so its runs are the `alignkd` arm's).
CE_ONLY = "--preset ce"
DEFAULT_ARMS = {"ce": CE_ONLY, "alignkd": ""}
ABLATION_ARMS = {("alignkd" if p == DEFAULT_PRESET else p): ("" if p == DEFAULT_PRESET else f"--preset {p}")
                 for p in PRESETS}
ABLATION_BASE = "logits"
# Before the presets the CE-only arm was these flags (the same objective, bit for bit): its run
# directories keep their names, so an earlier --out is reused rather than trained again.
SAME_RUN_AS = {CE_ONLY: "--w-logit 0 --w-attn 0 --w-vis 0"}
RECIPE_DEFAULTS = {"steps": 1500, "batch_size": 32, "lr": 1e-3, "warmup_ratio": 0.0}
WORLD_FILES = ("teacher", "student", "train_student.json", "images")


@dataclass(frozen=True)
class World:
    root: Path
    recipe: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.root.name

    def split(self, name: str) -> Path:
        return self.root / f"{name}.json"


def load_world(root: str, overrides: dict) -> World:
    """The world at `root` with its recipe (recipe.json, then the command line's overrides)."""
    path = Path(root)
    missing = [name for name in WORLD_FILES if not (path / name).exists()]
    if missing:
        sys.exit(f"world {path} lacks {', '.join(missing)} (a world holds {', '.join(WORLD_FILES)} and "
                 "val.json/test.json; see bench/efficacy.py's docstring).")
    recipe = dict(RECIPE_DEFAULTS)
    if (path / "recipe.json").is_file():
        stored = json.loads((path / "recipe.json").read_text())
        unknown = sorted(set(stored) - set(RECIPE_DEFAULTS))
        if unknown:
            sys.exit(f"{path / 'recipe.json'}: unknown keys {unknown}; known: {sorted(RECIPE_DEFAULTS)}.")
        recipe.update(stored)
    recipe.update({k: v for k, v in overrides.items() if v is not None})
    return World(path, recipe)


def cli(args: argparse.Namespace) -> list[str]:
    return shlex.split(args.alignkd) if args.alignkd else [sys.executable, "-m", "alignkd.cli"]


def run_logged(cmd: list[str], log: Path) -> None:
    """Run `cmd` with one torch thread, stdout+stderr to `log`; a failure names the log and stops."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        fh.write("$ " + shlex.join(cmd) + "\n")
        fh.flush()
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        raise SystemExit(f"command failed (exit {code}), see {log}:\n  " + "\n  ".join(tail))


def teacher_digest(world: World) -> str:
    weights = sorted((world.root / "teacher").glob("*.safetensors"))
    return hashlib.sha256(b"".join(w.read_bytes() for w in weights)).hexdigest()[:16]


def build_cache(args, world: World, out: Path) -> Path:
    """One cache per (world, teacher weights); reused by every arm, seed and later run."""
    cache = out / "cache"
    done = out / "cache.done"
    if not done.exists():
        print(f"[efficacy] {world.name}: cache build -> {cache}", flush=True)
        run_logged([*cli(args), "cache", "build", "--teacher", str(world.root / "teacher"),
                    "--data", str(world.root / "train_student.json"), "--images", str(world.root / "images"),
                    "--out", str(cache), "--overwrite", "--no-progress", *shlex.split(args.extra_build_args)],
                   out / "cache-build.log")
        done.write_text("ok\n")
    return cache


def run_name(world: World, arm_flags: str, seed: int) -> str:
    r = world.recipe
    flags = arm_flags.strip()
    tag = hashlib.sha256(SAME_RUN_AS.get(flags, flags).encode()).hexdigest()[:8]
    return f"{r['steps']}steps-b{r['batch_size']}-lr{r['lr']:g}-w{r['warmup_ratio']:g}-x{tag}-seed{seed}"


def distill(args, world: World, cache: Path, run: Path, arm_flags: str, seed: int) -> None:
    if (run / "distill_run.json").exists():
        return
    shutil.rmtree(run, ignore_errors=True)  # a run cut off before its export starts over
    r = world.recipe
    cmd = [*cli(args), "distill", "--student", str(world.root / "student"), "--cache", str(cache),
           "--out", str(run), "--max-steps", str(r["steps"]), "--batch-size", str(r["batch_size"]),
           "--lr", str(r["lr"]), "--warmup-ratio", str(r["warmup_ratio"]), "--seed", str(seed),
           "--save-steps", str(10**9), "--workers", str(args.distill_workers), "--no-progress",
           *shlex.split(arm_flags)]
    start = time.perf_counter()
    run_logged(cmd, run.with_name(run.name + ".log"))
    print(f"[efficacy] {world.name}: {run.parent.name}/{run.name} in {time.perf_counter() - start:.0f} s", flush=True)


def evaluate(args, world: World, model: Path, target: Path) -> dict:
    """`alignkd eval --json` on the chosen split, kept in `target` for reruns."""
    if not target.exists():
        cmd = [*cli(args), "eval", "--model", str(model), "--data", str(world.split(args.split)),
               "--images", str(world.root / "images"), "--json", "--no-progress"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            raise SystemExit(f"alignkd eval failed on {model}: {proc.stderr.strip().splitlines()[-1:]}")
        result = json.loads(proc.stdout[proc.stdout.index("{"):])
        target.write_text(json.dumps(result, indent=1))
    result = json.loads(target.read_text())
    return {"all": result["accuracy"], **result.get("by_type", {})}


def world_jobs(args, world: World, arms: dict[str, str], out: Path):
    """(arm, seed, run directory, flags) for every student of one world."""
    return [(arm, seed, out / arm / run_name(world, flags, seed), flags)
            for seed in range(1, args.seeds + 1) for arm, flags in arms.items()]


def paired(scores: dict[str, dict[int, dict]], arm: str, base: str = "ce") -> list[float]:
    """Per-seed gains of `arm` over `base` in points (same seed: same init and data order)."""
    return [100 * (scores[arm][s]["all"] - scores[base][s]["all"]) for s in sorted(scores[arm])
            if s in scores.get(base, {})]


def summarise_world(name: str, teacher: dict, scores: dict[str, dict[int, dict]]) -> dict:
    out = {"world": name, "teacher": 100 * teacher["all"], "arms": {}}
    for arm, by_seed in scores.items():
        values = [100 * by_seed[s]["all"] for s in sorted(by_seed)]
        out["arms"][arm] = {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                            "per_seed": values}
        if arm != "ce" and "ce" in scores:
            gains = paired(scores, arm)
            mean, sd, wins = gain_stats(gains)
            ce = statistics.fmean(100 * v["all"] for v in scores["ce"].values())
            gap = out["teacher"] - ce
            out["arms"][arm].update(gain=mean, gain_sd=sd, wins=wins, per_seed_gain=gains,
                                    gap_closed=mean / gap if gap > 0 else None)
    return out


def gain_stats(gains: list[float]) -> tuple[float, float, int]:
    """(mean, sample sd, seeds won) of per-seed paired gains."""
    return statistics.fmean(gains), statistics.stdev(gains) if len(gains) > 1 else 0.0, sum(g > 0 for g in gains)


def increments(scores: dict[str, dict[int, dict]], base: str = ABLATION_BASE) -> dict[str, dict]:
    """Each arm's paired per-seed increment over `base` (logits only): mean, sample sd, seeds won."""
    out = {}
    for arm in scores:
        if arm in ("ce", base) or base not in scores:
            continue
        gains = paired(scores, arm, base)
        mean, sd, wins = gain_stats(gains)
        out[arm] = {"mean": mean, "sd": sd, "wins": wins, "per_seed": gains}
    return out


def render_increments(summaries: list[dict]) -> str:
    """The ablation table: what each arm adds to logits only, seed by seed."""
    lines = [f"increment over {ABLATION_BASE} only (points): mean ± sample sd of per-seed paired gains", "",
             "| world | arm | over logits | sd | wins | per seed |", "|---|---|---|---|---|---|"]
    for s in summaries:
        for arm, inc in s.get("over_logits", {}).items():
            lines.append(f"| {s['world']} | {arm} | {inc['mean']:+.1f} | {inc['sd']:.1f} | "
                         f"{inc['wins']}/{len(inc['per_seed'])} | {' '.join(f'{g:+.1f}' for g in inc['per_seed'])} |")
    return "\n".join(lines)


def render(summaries: list[dict], split: str, seeds: int) -> str:
    lines = [f"{split} accuracy (%), {seeds} seed(s): mean ± sample std; gain = mean of per-seed paired gains",
             "", "| world | arm | teacher | CE only | arm | gain | gain sd | wins | gap closed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        ce = s["arms"].get("ce")
        ce_txt = f"{ce['mean']:.1f} ± {ce['sd']:.1f}" if ce else "-"
        for arm, a in s["arms"].items():
            if arm == "ce":
                continue
            gap = a.get("gap_closed")
            lines.append(f"| {s['world']} | {arm} | {s['teacher']:.1f} | {ce_txt} | {a['mean']:.1f} ± {a['sd']:.1f} | "
                         f"{a.get('gain', 0):+.1f} | {a.get('gain_sd', 0):.1f} | {a.get('wins', 0)}/{len(a['per_seed'])} | "
                         f"{'n/a' if gap is None else f'{100 * gap:.0f}%'} |")
    return "\n".join(lines)


def parse_arms(items: list[str], include_defaults: bool, ablation: bool = False) -> dict[str, str]:
    if ablation:  # the presets' order: ce, logits, ..., the default last
        arms = dict(ABLATION_ARMS)
    else:
        arms = dict(DEFAULT_ARMS) if include_defaults else {"ce": CE_ONLY}
    for item in items:
        name, sep, flags = item.partition("=")
        if not sep or not name.strip() or name.strip() == "ce":
            raise SystemExit(f"--arm {item!r}: expected NAME=\"distill flags\" with a NAME other than ce.")
        arms[name.strip()] = flags
    return arms


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="CE only against default Align-KD on world directories, via the CLI.")
    p.add_argument("--world", action="append", required=True, help="a world directory (repeat for several)")
    p.add_argument("--out", default="efficacy-out", help="caches, runs and scores; reruns resume")
    p.add_argument("--seeds", type=int, default=3, help="seeds 1..N, the same for every arm")
    p.add_argument("--split", choices=("val", "test"), default="val")
    p.add_argument("--arm", action="append", default=[], help='NAME="distill flags", e.g. paper="--loss-scale paper"')
    p.add_argument("--no-default-arm", action="store_true", help="train only CE only and the --arm rows")
    p.add_argument("--ablation", action="store_true",
                   help=f"one arm per objective preset ({', '.join(PRESETS)}) and each one's increment over "
                        f"{ABLATION_BASE} only")
    p.add_argument("--steps", type=int, help="override every world's recipe")
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--warmup-ratio", type=float)
    p.add_argument("--extra-build-args", default="", help="appended to `cache build` (a new --out per setting)")
    p.add_argument("--jobs", type=int, default=2, help="distills run side by side, one torch thread each")
    p.add_argument("--distill-workers", type=int, default=0,
                   help="DataLoader workers per distill (0: the two side-by-side runs already fill two cores; "
                        "the order and the numbers do not depend on it)")
    p.add_argument("--alignkd", default="", help="the CLI to call; default: this Python's `-m alignkd.cli`")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.jobs < 1:
        p.error("--seeds and --jobs must be at least 1")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    start = time.perf_counter()
    arms = parse_arms(args.arm, not args.no_default_arm, args.ablation)
    overrides = {"steps": args.steps, "lr": args.lr, "batch_size": args.batch_size, "warmup_ratio": args.warmup_ratio}
    worlds = [load_world(w, overrides) for w in args.world]
    for world in worlds:
        if not world.split(args.split).is_file():
            sys.exit(f"world {world.root} has no {args.split}.json.")
    out_root = Path(args.out)
    # a world's runs live under its name and its teacher's digest: another teacher never reuses them
    outs = {w.root: out_root / f"{w.name}-{teacher_digest(w)}" for w in worlds}
    caches = {w.root: build_cache(args, w, outs[w.root]) for w in worlds}
    jobs = [(w, *job) for w in worlds for job in world_jobs(args, w, arms, outs[w.root])]
    print(f"[efficacy] {len(jobs)} students over {len(worlds)} world(s), {args.jobs} at a time", flush=True)

    def train_and_score(job) -> dict:
        world, _, seed, run, flags = job
        distill(args, world, caches[world.root], run, flags, seed)
        return evaluate(args, world, run, run / f"eval-{args.split}.json")

    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(train_and_score, jobs))
    summaries = []
    for world in worlds:
        scores: dict[str, dict[int, dict]] = {}
        for (w, arm, seed, _, _), result in zip(jobs, results):
            if w.root == world.root:
                scores.setdefault(arm, {})[seed] = result
        teacher = evaluate(args, world, world.root / "teacher", outs[world.root] / f"teacher-eval-{args.split}.json")
        summary = {**summarise_world(world.name, teacher, scores), "recipe": world.recipe, "arms_flags": arms}
        if ABLATION_BASE in scores:
            summary["over_logits"] = increments(scores)
        summaries.append(summary)
    table = render(summaries, args.split, args.seeds)
    if any("over_logits" in s for s in summaries):
        table += "\n\n" + render_increments(summaries)
    (out_root / f"summary-{args.split}.json").write_text(json.dumps(summaries, indent=1))
    (out_root / f"table-{args.split}.md").write_text(table + "\n")
    print("\n" + table + f"\n\nwall {time.perf_counter() - start:.0f} s; per-run logs under {out_root}")
    return summaries


if __name__ == "__main__":
    main()
