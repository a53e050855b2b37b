"""The scale check of issue 25: LLaVA-665K and a LLaVA-OneVision-style mixture as they are.

1. Planning under 2-rank torchrun: each rank runs `alignkd.cache.teacher.build.plan_rows`, the very
   function `cache build` runs before its teacher loads (every source's ids streamed, the
   sampling, the unique keys, the rank's share), over the LLaVA-665K-shaped JSON list
   (bench/llava_mix.py) at each --scales value, and over the six-source mixture at the
   largest. Each rank reports its peak RSS, what the planning added to it, and what its
   share holds; memory should follow the records (bytes/row), never the file's size.
2. A build of a --limit slice of a small mixture with a tiny LLaVA teacher: `cache sql ...
   GROUP BY source` must match the sampling, kept + rejects = the slice's records by
   source, and every reject has a reason.

    .venv/bin/python -m bench.manifest_scale                          # scales 0.1 and 1.0 (~5 min on 2 busy cores)
    .venv/bin/python -m bench.manifest_scale --scales 0.01 0.1 --build-limit 80
    .venv/bin/python -m bench.manifest_scale --workdir /tmp/scale     # keep (and reuse) the manifests

Written manifests are kept in --workdir between runs (LLaVA-665K at 1.0: 443 MB = 423 MiB, ~75 s to write).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.llava_mix import write_llava665k, write_onevision_mix

REPO = Path(__file__).resolve().parents[1]


def rss_kb() -> int:
    """The resident set now, in kB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def probe(data: str, teacher: str, out: str, limit: int | None) -> None:
    """One rank's planning, under torchrun: prints one JSON line."""
    from alignkd.cache.teacher.build import BuildConfig, plan_rows
    from alignkd.distributed import init_process_group

    import ijson  # noqa: F401 - the readers' modules, loaded before "before" so that what
    import pyarrow.compute as pc  # planning adds is the data's cost, not an import's
    import pyarrow.parquet  # noqa: F401
    import yaml  # noqa: F401

    dist = init_process_group()
    cfg = BuildConfig(teacher=teacher, data=data, images=None, out=out, limit=limit)
    before, start = rss_kb(), time.perf_counter()
    source, share = plan_rows(cfg, dist)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    renamed = int(pc.sum(pc.not_equal(share.keys, share.ids)).as_py() or 0)  # repeated ids given ID#k
    print(json.dumps({"rank": dist.rank, "rows": sum(k for _, k in source.counts), "share": len(share.rows),
                      "first_row": int(share.rows[0]) if len(share.rows) else None, "renamed": renamed,
                      "share_bytes": share.nbytes(), "rss_before_mb": before / 1024, "peak_mb": peak / 1024,
                      "added_mb": (peak - before) / 1024, "seconds": seconds}), flush=True)


def plan_under_torchrun(data: Path, workdir: Path, limit: int | None = None) -> list[dict]:
    """Both ranks' probe results (sorted by rank)."""
    teacher = workdir / "teacher-unused"  # plan_rows loads no teacher; BuildConfig wants a directory
    teacher.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), __file__, "--probe", str(data), str(teacher), str(workdir / "out-unused")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if limit is not None:
        cmd += ["--limit", str(limit)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"torchrun failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return sorted((json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")),
                  key=lambda r: r["rank"])


def llava665k_at(scale: float, workdir: Path) -> Path:
    path = workdir / f"llava665k-{scale}.json"
    if not path.exists():
        partial = path.with_suffix(".partial")
        write_llava665k(partial, scale)
        partial.rename(path)
    return path


def onevision_at(scale: float, workdir: Path, images: bool = False) -> Path:
    root = workdir / f"onevision-{scale}"
    mix = root / "onevision_mix.yaml"
    if not mix.exists():
        write_onevision_mix(root, scale, images=images)
    return mix


def planning_table(scales: list[float], workdir: Path) -> list[str]:
    lines = ["| manifest | file MiB | rows planned | rank | share rows | share MB | RSS before MB | peak RSS MB | "
             "planning added MB | seconds |", "|" + "---|" * 10]
    print("\n".join(lines), flush=True)
    runs = [(f"LLaVA-665K x{s}", llava665k_at(s, workdir)) for s in scales]
    added: dict[str, list[dict]] = {}
    runs.append((f"OneVision-style mix x{max(scales)} (6 sources)", onevision_at(max(scales), workdir)))
    for name, data in runs:
        size = sum(p.stat().st_size for p in data.parent.rglob("*") if p.is_file()) if data.suffix == ".yaml" \
            else data.stat().st_size
        for r in plan_under_torchrun(data, workdir):
            lines.append(f"| {name} | {size / 2**20:.0f} | {r['rows']:,} | {r['rank']} | {r['share']:,} | "
                         f"{r['share_bytes'] / 2**20:.1f} | {r['rss_before_mb']:.0f} | {r['peak_mb']:.0f} | "
                         f"{r['added_mb']:.1f} | {r['seconds']:.1f} |")
            print(lines[-1], flush=True)
            added.setdefault(name, []).append(r)
    (small, *_, big) = [added[f"LLaVA-665K x{s}"] for s in scales] if len(scales) > 1 else [None, None]
    for a, b in zip(small or [], big or []):  # a fixed cost (first allocations) cancels out
        per_row = (b["added_mb"] - a["added_mb"]) * 2**20 / (b["rows"] - a["rows"])
        lines.append(f"rank {a['rank']}: planning costs {per_row:.0f} bytes per manifest row "
                     f"(x{scales[0]} -> x{scales[-1]}); the share kept for the build "
                     f"{b['share_bytes'] / b['share']:.0f} bytes per row of the rank's share")
        print(lines[-1], flush=True)
    return lines


def build_slice(mix: Path, limit: int, workdir: Path) -> dict:
    """Build `limit` rows of the mixture with a tiny LLaVA teacher; per source: what the
    sampling says, what the cache holds, and the reject reasons."""
    from alignkd.cache.catalog import run_sql
    from alignkd.demo.tiny_models import build_tiny_llava

    teacher = workdir / "tiny-llava"
    if not (teacher / "config.json").exists():
        build_tiny_llava(teacher)
    out = workdir / f"slice-cache-{limit}"
    cmd = [sys.executable, "-m", "alignkd.cli", "cache", "build", "--teacher", str(teacher), "--data", str(mix),
           "--out", str(out), "--limit", str(limit), "--overwrite", "--no-progress", "--batch-size", "8"]
    built = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if built.returncode != 0:
        raise SystemExit(f"cache build failed:\n{built.stdout[-2000:]}\n{built.stderr[-2000:]}")
    sources = json.loads((out / "cache.json").read_text())["build_options"]["sources"]
    kept = {r["source"]: r for r in run_sql(out, "SELECT source, count(*) AS n, count(*) FILTER "
                                                 "(WHERE record_id <> sample_id) AS renamed FROM samples "
                                                 "GROUP BY source").to_pylist()}
    rejects = {}
    for r in run_sql(out, "SELECT source, reason, count(*) AS n FROM rejects GROUP BY source, reason").to_pylist():
        rejects.setdefault(r["source"], {})[r["reason"]] = r["n"]
    unexplained = run_sql(out, "SELECT count(*) AS n FROM rejects WHERE coalesce(reason, '') = '' "
                               "OR coalesce(message, '') = ''").to_pylist()[0]["n"]
    table, offset = {}, 0
    for s in sources:
        in_slice = max(0, min(s["kept"], limit - offset))  # --limit cuts the numbered list of sampled rows
        offset += s["kept"]
        table[s["name"]] = {"records": s["records"], "sampling": s["sampling"], "sampled": s["kept"],
                            "in_slice": in_slice, "kept": kept.get(s["name"], {}).get("n", 0),
                            "repeats": kept.get(s["name"], {}).get("renamed", 0), "rejects": rejects.get(s["name"], {})}
    return {"sources": table, "unexplained_rejects": unexplained, "cache": out}


def expected_sample(sampling: str, records: int) -> int:
    """The sampled count, worked out independently of alignkd.data.mixture."""
    kind, _, amount = sampling.partition(":")
    if kind == "all":
        return records
    n = -(-records * int(amount[:-1]) // 100) if amount.endswith("%") else int(amount)  # a percentage rounds up
    return min(records, n)


def slice_lines(result: dict) -> list[str]:
    lines = ["| source | sampling | records | sampled | in slice | kept | of them repeated ids (ID#k) | "
             "rejects (reason: n) | kept + rejects = slice |", "|" + "---|" * 9]
    for name, s in result["sources"].items():
        nrej = sum(s["rejects"].values())
        ok = s["kept"] + nrej == s["in_slice"] and s["sampled"] == expected_sample(s["sampling"], s["records"])
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(s["rejects"].items())) or "-"
        lines.append(f"| {name} | {s['sampling']} | {s['records']} | {s['sampled']} | {s['in_slice']} | {s['kept']} | "
                     f"{s['repeats']} | {reasons} | {'yes' if ok else 'NO'} |")
    lines.append(f"\nrejects without a reason or a sentence: {result['unexplained_rejects']}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--build-scale", type=float, default=0.0005, help="the mixture a slice of is built")
    parser.add_argument("--build-limit", type=int, default=150)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--probe", nargs=3, metavar=("DATA", "TEACHER", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        return probe(*args.probe, args.limit)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="manifest-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"workdir {workdir}\n\nPlanning under torchrun --nproc-per-node 2 (plan_rows, as cache build runs it):")
    planning_table(args.scales, workdir)
    mix = onevision_at(args.build_scale, workdir, images=True)
    print(f"\nA build of --limit {args.build_limit} of {mix} (tiny LLaVA teacher):")
    print("\n".join(slice_lines(build_slice(mix, args.build_limit, workdir))))


if __name__ == "__main__":
    main()
