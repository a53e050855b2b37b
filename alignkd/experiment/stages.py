"""The stages of an experiment, each a subprocess of the public CLI and each skipped when its
output exists, so an interrupted experiment resumes where it stopped.

`build_cache` runs `alignkd cache build` once per world; `train_students` runs `alignkd
distill` then `alignkd eval --json` for every student, `jobs` at a time, each process with
`threads` torch threads (two students with one thread each fill two cores). The exact
command of every stage is the first line of its log, so any run can be repeated by hand.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from alignkd.errors import AlignKDError
from alignkd.experiment.plan import Student


class StageFailed(AlignKDError):
    """A CLI stage exited non-zero; the message names its log."""


@dataclass(frozen=True)
class Stages:
    """How the stages are called: the CLI, the tag of console lines, the torch threads of each
    process, and the flags every distill and every eval gets."""
    cli: tuple[str, ...] = (sys.executable, "-m", "alignkd.cli")
    tag: str = "experiment"
    threads: int = 1
    eval_threads: int = 1
    distill_flags: tuple[str, ...] = ()
    eval_flags: tuple[str, ...] = ()
    drop_checkpoints: bool = False  # the exported student is what is kept

    @classmethod
    def calling(cls, command: str, **kw) -> "Stages":
        """`command` is the CLI to call (e.g. "alignkd"); empty: this Python's `-m alignkd.cli`."""
        return cls(cli=tuple(shlex.split(command)), **kw) if command else cls(**kw)

    def say(self, msg: str, about: str = "") -> None:
        print(f"[{self.tag}] " + (f"{about}: " if about else "") + msg, flush=True)


def _env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def run_logged(cmd: list[str], log: Path, threads: int) -> None:
    """Run `cmd` with `threads` torch threads, stdout+stderr to `log`; a failure names the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        fh.write("$ " + shlex.join(cmd) + "\n")
        fh.flush()
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env(threads)).returncode
    if code != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        raise StageFailed(f"command failed (exit {code}), see {log}:\n  " + "\n  ".join(tail))


def build_cache(st: Stages, label: str, teacher: Path, data: Path, images: Path, out: Path,
                flags: list[str] = (), overwrite: bool = True) -> Path:
    """`out/cache`, built once (`out/cache.done` marks it finished) and reused by every arm and seed."""
    cache, done = out / "cache", out / "cache.done"
    if not done.exists():
        st.say(f"cache build -> {cache}", label)
        run_logged([*st.cli, "cache", "build", "--teacher", str(teacher), "--data", str(data),
                    "--images", str(images), "--out", str(cache), *(["--overwrite"] if overwrite else []),
                    "--no-progress", *flags], out / "cache-build.log", st.threads)
        done.write_text("ok\n")
    return cache


def distill(st: Stages, label: str, student: Student, init: Path, cache: Path, recipe: list[str]) -> None:
    """`alignkd distill` of one student into `student.run` (a run counts once distill_run.json is there)."""
    run = student.run
    if (run / "distill_run.json").exists():
        return
    shutil.rmtree(run, ignore_errors=True)  # a run cut off before its export starts over
    cmd = [*st.cli, "distill", "--student", str(init), "--cache", str(cache), "--out", str(run), *recipe,
           "--seed", str(student.seed), *st.distill_flags, *student.arm.argv()]
    start = time.perf_counter()
    run_logged(cmd, run.with_name(run.name + ".log"), st.threads)
    if st.drop_checkpoints:
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
    st.say(f"{run.parent.name}/{run.name} in {time.perf_counter() - start:.0f} s", label)


def evaluate(st: Stages, model: Path, data: Path, images: Path, target: Path) -> dict:
    """`alignkd eval --json` of `model` on `data`, its output kept in `target` for reruns;
    returns {"all": accuracy, question type: accuracy..., "answer_ce": ...}."""
    if not target.exists():
        cmd = [*st.cli, "eval", "--model", str(model), "--data", str(data), "--images", str(images),
               "--json", "--no-progress", *st.eval_flags]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(st.eval_threads))
        if proc.returncode != 0:
            raise StageFailed(f"alignkd eval failed on {model}: {proc.stderr.strip().splitlines()[-1:]}")
        target.write_text(json.dumps(json.loads(proc.stdout[proc.stdout.index("{"):]), indent=1))
    result = json.loads(target.read_text())
    return {"all": result["accuracy"], **result.get("by_type", {}), "answer_ce": result["answer_ce"]}


@dataclass(frozen=True)
class Task:
    """A student with where it learns and where it is scored."""
    student: Student
    init: Path
    cache: Path
    recipe: list[str]
    data: Path
    images: Path
    score_file: str
    label: str = ""  # its world, in console lines
    steps: int = field(default=0)  # its distill steps, for the progress bar


def train_students(st: Stages, tasks: list[Task], jobs: int, progress: bool = False) -> list[dict]:
    """Distill and score every task, `jobs` at a time; scores in the tasks' order."""
    def one(task: Task) -> dict:
        distill(st, task.label, task.student, task.init, task.cache, task.recipe)
        return evaluate(st, task.student.run, task.data, task.images, task.student.run / task.score_file)

    with ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(one, task) for task in tasks]
        if progress:
            _draw_progress(futures, tasks)
        return [f.result() for f in futures]


def _draw_progress(futures, tasks: list[Task]) -> None:
    """One bar over the steps of every student still to train, read from their metrics.jsonl."""
    from tqdm.auto import tqdm

    todo = [t for t in tasks if not (t.student.run / "distill_run.json").exists()]
    with tqdm(total=sum(t.steps for t in todo), desc=f"distil {len(todo)} students", unit="step") as bar:
        while wait(futures, timeout=0.5).not_done:
            bar.update(max(sum(_steps_logged(t) for t in todo) - bar.n, 0))
        bar.update(bar.total - bar.n)


def _steps_logged(task: Task) -> int:
    if (task.student.run / "distill_run.json").exists():
        return task.steps
    try:
        last = (task.student.run / "metrics.jsonl").read_text().strip().splitlines()[-1]
        return min(int(json.loads(last).get("step", 0)), task.steps)
    except (OSError, IndexError, ValueError):
        return 0
