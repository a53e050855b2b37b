"""Scores to tables: mean ± sample sd over seeds, and paired per-seed gains over a base arm.

Scores are {arm: {seed: {"all": accuracy, question type: accuracy...}}}; a gain compares an
arm with the base arm at the same seed (same initialisation and data order).
"""

from __future__ import annotations

import statistics

Scores = dict[str, dict[int, dict]]


def mean_spread(values: list[float]) -> str:
    """A fraction as percent, `mean ± sample sd` (the mean alone for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} ± {100 * statistics.stdev(values):.1f}"


def accuracy_table(rows: dict[str, list[dict]], teacher: dict | None = None, label: str = "model",
                   count: str = "seeds") -> str:
    """Markdown: accuracy (%) overall and per question type, one line per row, mean ± sd over its runs."""
    first = teacher if teacher is not None else next(iter(rows.values()))[0]
    cols = ["all", *sorted(k for k in first if k not in ("all", "answer_ce"))]
    lines = [f"| {label} | {count} | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    if teacher is not None:
        lines.append("| teacher | - | " + " | ".join(f"{100 * teacher[c]:.1f}" for c in cols) + " |")
    for name, runs in rows.items():
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(mean_spread([r[c] for r in runs]) for c in cols) + " |")
    return "\n".join(lines)


def paired(scores: Scores, arm: str, base: str = "ce") -> list[float]:
    """Per-seed gains of `arm` over `base` in points."""
    return [100 * (scores[arm][s]["all"] - scores[base][s]["all"]) for s in sorted(scores[arm])
            if s in scores.get(base, {})]


def gain_stats(gains: list[float]) -> tuple[float, float, int]:
    """(mean, sample sd, seeds won) of per-seed paired gains."""
    return statistics.fmean(gains), statistics.stdev(gains) if len(gains) > 1 else 0.0, sum(g > 0 for g in gains)


def summarise_world(name: str, teacher: dict, scores: Scores) -> dict:
    """Per arm: mean, sd and per-seed accuracy (points); against `ce`: the paired gain and the gap closed."""
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


def increments(scores: Scores, base: str) -> dict[str, dict]:
    """Each arm's paired per-seed increment over `base`: mean, sample sd, seeds won."""
    out = {}
    for arm in scores:
        if arm in ("ce", base) or base not in scores:
            continue
        gains = paired(scores, arm, base)
        mean, sd, wins = gain_stats(gains)
        out[arm] = {"mean": mean, "sd": sd, "wins": wins, "per_seed": gains}
    return out


def render_gains(summaries: list[dict], split: str, seeds: int) -> str:
    """One line per world and arm: teacher, CE only, the arm, and its paired gain over CE only."""
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


def render_increments(summaries: list[dict], base: str, key: str) -> str:
    """What each arm adds to `base`, seed by seed (the summaries' `key` entries)."""
    lines = [f"increment over {base} only (points): mean ± sample sd of per-seed paired gains", "",
             f"| world | arm | over {base} | sd | wins | per seed |", "|---|---|---|---|---|---|"]
    for s in summaries:
        for arm, inc in s.get(key, {}).items():
            lines.append(f"| {s['world']} | {arm} | {inc['mean']:+.1f} | {inc['sd']:.1f} | "
                         f"{inc['wins']}/{len(inc['per_seed'])} | {' '.join(f'{g:+.1f}' for g in inc['per_seed'])} |")
    return "\n".join(lines)
