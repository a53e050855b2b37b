"""CE only against the default Align-KD objective on a held-out world, through the public CLI only.

This is issue 8's held-out check as a new user would run it; nothing is imported from
alignkd, every stage is a subprocess of the CLI:

1. the student's share of the world: the first `--student-records` (1,500) records of
   `train.json`, written as `OUT/student-train.json`;
2. `alignkd cache build --teacher T --data OUT/student-train.json --images IMGS --out OUT/cache`;
3. per seed, `alignkd distill --student S --cache OUT/cache --out RUN --max-steps N
   --batch-size 32 --lr 1e-3 --seed S` with the default objective ("Align-KD"), and the
   same with `--preset ce` ("CE only"); `--extra-distill-args` go to both rows, and may not
   set the objective (--preset, --w-*), which would change the CE-only baseline too. Two
   distills run at a time, each with OMP_NUM_THREADS=1;
4. `alignkd eval --model RUN --data SPLIT.json --images IMGS --json` for every run (right
   after its distill) and the teacher.

Every stage is skipped when its output exists (a run counts once `distill_run.json` is
there), so an interrupted comparison resumes. Run directories are named after the
steps, the seed and a hash of the extra arguments, so changing either never reuses
a stale run. The table shows accuracy (%) per question type, mean ± sample std
over seeds, and the gain of Align-KD over CE only in points. Never tune on `--split test`.

    python bench/heldout_compare.py --world /work/heldout/world --teacher /work/heldout/teacher \\
        --student-init /work/heldout/student-init --seeds 3 --steps 1500 --split val
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
from pathlib import Path

CE_ONLY = ["--preset", "ce"]  # the CLI's one definition of the baseline
ROWS = (("CE only", "ce", CE_ONLY), ("Align-KD (defaults)", "akd", []))


def cli(args: argparse.Namespace) -> list[str]:
    return shlex.split(args.alignkd) if args.alignkd else [sys.executable, "-m", "alignkd.cli"]


def run_logged(cmd: list[str], log: Path) -> None:
    """Run `cmd` with one CPU thread, stdout+stderr to `log`; a failure names the log and stops."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "w") as fh:
        fh.write("$ " + shlex.join(cmd) + "\n")
        fh.flush()
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        sys.exit(f"command failed (exit {code}), see {log}:\n  " + "\n  ".join(tail))


def write_student_subset(world: Path, n: int, out: Path) -> Path:
    target = out / "student-train.json"
    if not target.exists():
        records = json.loads((world / "train.json").read_text())[:n]
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(records))
        tmp.rename(target)
    return target


def check_teacher(args, out: Path) -> None:
    """Pin OUT to one teacher: its weights' sha256 is recorded once and checked on every rerun."""
    weights = sorted(Path(args.teacher).glob("*.safetensors"))
    digest = hashlib.sha256(b"".join(w.read_bytes() for w in weights)).hexdigest()
    pinned = out / "teacher.sha256"
    if not pinned.exists():
        pinned.write_text(digest + "\n")
    elif pinned.read_text().strip() != digest:
        sys.exit(f"{out} was built with another teacher (sha256 {pinned.read_text().strip()[:12]}…, "
                 f"{args.teacher} has {digest[:12]}…); use a new --out.")


def build_cache(args, subset: Path, out: Path) -> Path:
    cache = out / "cache"
    done = out / "cache.done"
    if not done.exists():
        print(f"[compare] cache build -> {cache}", flush=True)
        run_logged([*cli(args), "cache", "build", "--teacher", args.teacher, "--data", str(subset),
                    "--images", str(Path(args.world) / "images"), "--out", str(cache), "--no-progress"],
                   out / "cache-build.log")
        done.write_text("ok\n")
    return cache


def distill_job(args, cache: Path, run: Path, weights: list[str], seed: int) -> Path:
    if (run / "distill_run.json").exists():
        return run
    shutil.rmtree(run, ignore_errors=True)
    run.parent.mkdir(parents=True, exist_ok=True)
    cmd = [*cli(args), "distill", "--student", args.student_init, "--cache", str(cache), "--out", str(run),
           "--max-steps", str(args.steps), "--batch-size", "32", "--lr", "1e-3", "--seed", str(seed),
           "--no-progress", *shlex.split(args.extra_distill_args), *weights]
    start = time.perf_counter()
    run_logged(cmd, run.with_suffix(".log"))
    print(f"[compare] {run.name} done in {time.perf_counter() - start:.0f} s", flush=True)
    return run


def evaluate(args, model: str, target: Path) -> dict:
    """`alignkd eval --json` on the chosen split, cached in `target`."""
    if not target.exists():
        world = Path(args.world)
        cmd = [*cli(args), "eval", "--model", model, "--data", str(world / f"{args.split}.json"),
               "--images", str(world / "images"), "--json", "--no-progress"]
        if args.eval_max_new_tokens:
            cmd += ["--max-new-tokens", str(args.eval_max_new_tokens)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"alignkd eval failed on {model}: {proc.stderr.strip().splitlines()[-1:]}")
        result = json.loads(proc.stdout[proc.stdout.index("{"):])
        target.write_text(json.dumps(result, indent=1))
    result = json.loads(target.read_text())
    return {"all": result["accuracy"], **result["by_type"]}


def mean_std(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    return f"{mean:.1f}" if len(values) < 2 else f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}"


def render_table(teacher: dict, rows: dict[str, list[dict]]) -> str:
    cols = ["all", *sorted(k for k in teacher if k != "all")]
    lines = ["| model | seeds | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|",
             "| teacher | - | " + " | ".join(f"{100 * teacher[c]:.1f}" for c in cols) + " |"]
    for name, scores in rows.items():
        lines.append(f"| {name} | {len(scores)} | " + " | ".join(mean_std([s[c] for s in scores]) for c in cols) + " |")
    ce, akd = rows[ROWS[0][0]], rows[ROWS[1][0]]
    gains = [100 * (statistics.fmean(s[c] for s in akd) - statistics.fmean(s[c] for s in ce)) for c in cols]
    lines.append("| gain (points) | | " + " | ".join(f"{g:+.1f}" for g in gains) + " |")
    return "\n".join(lines)


def summarise(teacher: dict, rows: dict[str, list[dict]]) -> dict:
    ce = statistics.fmean(s["all"] for s in rows[ROWS[0][0]])
    akd = statistics.fmean(s["all"] for s in rows[ROWS[1][0]])
    gap = teacher["all"] - ce
    return {"teacher": teacher["all"], "ce_only": ce, "align_kd": akd, "gain_points": 100 * (akd - ce),
            "gap_closed": (akd - ce) / gap if gap > 0 else None}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="CE only vs default Align-KD on a held-out world, via the CLI.")
    p.add_argument("--world", required=True, help="directory with {train,val,test}.json and images/")
    p.add_argument("--teacher", required=True)
    p.add_argument("--student-init", required=True)
    p.add_argument("--out", default="heldout-compare", help="cache, runs and scores; reruns resume")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--split", choices=("val", "test"), default="val")
    p.add_argument("--student-records", type=int, default=1500)
    p.add_argument("--extra-distill-args", default="", help="appended to every distill command, e.g. \"--vision-topk 3\"")
    p.add_argument("--workers", type=int, default=2, help="distills run side by side")
    # eval's default (16) is what the check used. A smaller cap is cheaper for
    # students that never emit </s>, but it can change a score: the normaliser drops
    # punctuation, so "7 ? ? ... 3" cut early reads "7".
    p.add_argument("--eval-max-new-tokens", type=int, default=0, help="passed to alignkd eval when > 0")
    p.add_argument("--alignkd", default="", help="the CLI to call; default: this Python's `-m alignkd.cli`")
    args = p.parse_args(argv)
    for name in ("world", "teacher", "student_init"):
        if not Path(getattr(args, name)).is_dir():
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)} is not a directory")
    if args.seeds < 1 or args.steps < 1:
        p.error("--seeds and --steps must be at least 1")
    if any(a.startswith(("--preset", "--w-")) for a in shlex.split(args.extra_distill_args)):
        p.error("--extra-distill-args may not set the objective (--preset, --w-*): it goes to the CE-only row too")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check_teacher(args, out)
    cache = build_cache(args, write_student_subset(Path(args.world), args.student_records, out), out)
    tag = hashlib.sha256(args.extra_distill_args.strip().encode()).hexdigest()[:8]
    jobs = [(name, out / "runs" / f"{slug}-{args.steps}steps-x{tag}-seed{seed}", weights, seed)
            for name, slug, weights in ROWS for seed in range(args.seeds)]
    print(f"[compare] {len(jobs)} distills, {args.workers} at a time (extra args: {args.extra_distill_args!r})",
          flush=True)
    def distill_and_score(job) -> dict:
        _, run, weights, seed = job
        distill_job(args, cache, run, weights, seed)
        return evaluate(args, str(run), run / f"eval-{args.split}.json")

    with ThreadPoolExecutor(args.workers) as pool:
        scores = list(pool.map(distill_and_score, jobs))
    rows: dict[str, list[dict]] = {}
    for (name, _, _, _), score in zip(jobs, scores):
        rows.setdefault(name, []).append(score)
    teacher = evaluate(args, args.teacher, out / f"teacher-eval-{args.split}.json")
    table = render_table(teacher, rows)
    summary = {"split": args.split, "seeds": args.seeds, "steps": args.steps, "extra_distill_args":
               args.extra_distill_args, **summarise(teacher, rows), "seconds": round(time.perf_counter() - start)}
    (out / f"summary-{args.split}-{args.steps}steps-x{tag}.json").write_text(json.dumps(summary, indent=1))
    print(f"\n{args.split} accuracy (%), {args.seeds} seed(s), {args.steps} steps, "
          f"{args.student_records} student records\n\n{table}\n")
    gap = summary["gap_closed"]
    print(f"Align-KD - CE only: {summary['gain_points']:+.1f} points; gap to the teacher closed: "
          f"{'n/a' if gap is None else f'{100 * gap:.0f}%'}; wall {summary['seconds']} s")


if __name__ == "__main__":
    main()
