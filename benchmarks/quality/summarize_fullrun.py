"""Tables of the full-run quality protocol (``benchmarks/quality/fullrun.py``) from the runs that finished.

Per task and budget: every arm's accuracy at each evaluation point of the run (the recovery curve), the
final accuracy paired with the dense run of the same seed (mean +- standard error over seeds), and the
training wall clock (evaluation excluded), so arms compare at equal steps and at equal time. Across tasks:
the points below dense, the share of dense's accuracy kept, and the share of dense's accuracy ABOVE CHANCE
kept, (pruned - chance) / (dense - chance): a few points on a task where dense barely beats chance are most
of what it knows.

    python -m benchmarks.quality.summarize_fullrun [--out results/fullrun] [--docs]
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def task_of(group: str) -> str:
    """``<task>_b<percent>`` -> ``<task>``."""
    return group.rsplit("_b", 1)[0]


def budget_of(group: str) -> str:
    """``<task>_b<percent>[_e<epochs>s<steps>]`` -> ``<percent>[_e<epochs>s<steps>]`` (a table of its own)."""
    return group.rsplit("_b", 1)[1]


def length_of(group: str) -> str:
    """The protocol's length suffix (``e3s360``), empty for the standard one."""
    return budget_of(group).partition("_")[2]


def label(budget: str) -> str:
    """``30`` -> ``30% of layers removed``; ``30_e3s360`` -> ``30% of layers removed, 3 epochs capped at 360 steps``."""
    percent, _, length = budget.partition("_")
    if not length:
        return f"{percent}% of layers removed"
    epochs, _, steps = length[1:].partition("s")
    return f"{percent}% of layers removed, {epochs} epochs capped at {steps} steps"


def load(out: Path) -> dict[str, dict[str, dict[int, dict[str, Any]]]]:
    """group -> arm -> seed -> summary. The dense run does not depend on the budget: a group without the
    dense run of a seed borrows it from another budget's group of the same task (one dense run per task and
    seed serves every budget)."""
    runs: dict[str, dict[str, dict[int, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    for path in sorted(out.glob("*/*/summary.json")):
        s = json.loads(path.read_text())
        runs[path.parent.parent.name][s["arm"]][int(s["seed"])] = s
    for group, arms in runs.items():
        for other, other_arms in sorted(runs.items()):
            if other != group and task_of(other) == task_of(group) and length_of(other) == length_of(group):
                for seed, summary in other_arms.get("dense", {}).items():
                    arms["dense"].setdefault(seed, summary)
    return runs


CHANCE = {"intent_recognition": 1 / 7, "piqa": 0.5, "social_iqa": 0.335, "multiemo": 0.25}
"""Chance accuracy of each task's test items (mean of 1 / choices over the ``--max-test 200`` split of seed 0)."""


def kept(
    arms: dict[str, dict[int, dict[str, Any]]], arm: str, chance: float
) -> tuple[list[float], list[float]]:
    """Per seed with a dense run: the pruned accuracy as a share of dense's, and the share of dense's accuracy
    above chance that the pruned model keeps, (pruned - chance) / (dense - chance)."""
    dense = arms.get("dense", {})
    pct, above = [], []
    for s, r in sorted(arms.get(arm, {}).items()):
        if s in dense:
            d = dense[s]["acc_after"]
            pct.append(r["acc_after"] / d)
            above.append((r["acc_after"] - chance) / (d - chance) if d > chance else float("nan"))
    return pct, above


def paired(arms: dict[str, dict[int, dict[str, Any]]], arm: str, ref: str = "dense") -> list[float]:
    """Final accuracy minus the ``ref`` run's of the same seed, for every seed of ``arm`` with a ``ref`` run."""
    other = arms.get(ref, {})
    return [
        r["acc_after"] - other[s]["acc_after"] for s, r in sorted(arms.get(arm, {}).items()) if s in other
    ]


DEFAULT = "shortgpt_bi"
"""The default criterion's plain-removal arm: the reference of every ``<default>+<option>`` arm."""


def versus_default(runs: dict[str, dict[str, dict[int, dict[str, Any]]]], budget: str) -> str:
    """Across tasks at one budget: each ``<default>+<option>`` arm (repair, stages, distillation) minus plain
    removal by the same criterion, paired by seed (the same plan inputs and batches up to the window), per
    task and over the tasks that have the arm; the run-by-run differences are listed so two seeds read as two."""
    groups = {task_of(g): arms for g, arms in sorted(runs.items()) if budget_of(g) == budget}
    tasks = sorted(groups)
    arms = sorted({a for arms in groups.values() for a in arms if a.startswith(DEFAULT + "+")})
    head = ["arm", *tasks, "mean over tasks", "runs"]
    lines = [f"### all tasks, {label(budget)}: final accuracy minus plain `{DEFAULT}` (paired by seed)",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for arm in arms:
        cells, means, every = [arm], [], []
        for task in tasks:
            diffs = paired(groups[task], arm, ref=DEFAULT)
            if diffs:
                means.append(sum(diffs) / len(diffs))
                every += diffs
                cells.append(fmt(*mean_se(diffs), sign=True) + f" (n={len(diffs)})")
            else:
                cells.append("")
        if means:
            cells += [f"{100 * sum(means) / len(means):+.1f}", " ".join(f"{100 * d:+.1f}" for d in every)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" if len(lines) > 4 else ""  # no such arm at this budget: no table


def across_tasks(runs: dict[str, dict[str, dict[int, dict[str, Any]]]], budget: str) -> str:
    """The goal's reading at one budget: per arm, the paired difference to dense on each task (mean over
    seeds) and their mean over the tasks that have the arm (each task weighing the same; its standard error
    from the tasks' own, where every task has two seeds or more)."""
    groups = {task_of(g): arms for g, arms in sorted(runs.items()) if budget_of(g) == budget}
    tasks = sorted(groups)
    arms = sorted({a for arms in groups.values() for a in arms if a != "dense"})
    head = ["arm", *tasks, "mean over tasks", "% of dense kept", "above-chance share kept", "tasks"]
    lines = [f"### all tasks, {label(budget)}: final accuracy minus dense (paired by seed)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for arm in arms:
        cells, means, ses, pcts, aboves = [arm], [], [], [], []
        for task in tasks:
            diffs = paired(groups[task], arm)
            if not diffs:
                cells.append("")
                continue
            m, se = mean_se(diffs)
            means.append(m)
            ses.append(se)
            pct, above = kept(groups[task], arm, CHANCE.get(task, 0.0))
            pcts.append(sum(pct) / len(pct))
            aboves.append(sum(above) / len(above))
            cells.append(fmt(m, se, sign=True) + f" (n={len(diffs)})")
        if not means:
            continue
        total = sum(means) / len(means)
        se_total = None if any(e is None for e in ses) else math.sqrt(sum(e * e for e in ses)) / len(ses)  # type: ignore[operator]
        cells += [fmt(total, se_total, sign=True), f"{100 * sum(pcts) / len(pcts):.1f}%",
                  f"{100 * sum(aboves) / len(aboves):.0f}%", f"{len(means)}/{len(tasks)}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cut_jump(arms: dict[str, dict[int, dict[str, Any]]], arm: str) -> list[float]:
    """Per seed with a dense run: the training loss of the first batch the pruned model sees (before its first
    update; after the last stage's cut) minus the dense run's loss on the same batch at the same step. Both runs
    drew the same batches and were the same model up to the cut, so this is what the cut (and its repair) costs
    with no further training, paired. Arms with logit distillation (``+kd``) log the distillation objective
    during it, not the task loss, and are left out."""
    if "+kd" in arm:
        return []
    dense = arms.get("dense", {})
    out = []
    for s, r in sorted(arms.get(arm, {}).items()):
        at = r.get("prune_step", r.get("window"))
        mine, theirs = r.get("losses", []), dense.get(s, {}).get("losses", [])
        if at is not None and at < min(len(mine), len(theirs)):
            out.append(mine[at] - theirs[at])
    return out


SPANS = ((12, 20), (20, 36), (36, 68), (68, None))
"""Step ranges of the training-loss comparison: from the repair arms' cut (step 12) to the end, split at the
evaluation points."""


def loss_gap(
    arms: dict[str, dict[int, dict[str, Any]]], arm: str, ref: str, lo: int, hi: int | None
) -> list[float]:
    """Per seed with a ``ref`` run: the mean training loss over steps ``lo .. hi-1`` minus ``ref``'s over the same
    steps (the same batches: both runs draw the same data order)."""
    out = []
    for s, r in sorted(arms.get(arm, {}).items()):
        mine, theirs = r.get("losses", []), arms.get(ref, {}).get(s, {}).get("losses", [])
        end = min(len(mine), len(theirs), hi or len(mine))  # a shorter run (60 steps): its part of the range
        if "+kd" not in arm and lo < end:
            out.append(sum(mine[lo:end]) / (end - lo) - sum(theirs[lo:end]) / (end - lo))
    return out


def loss_table(runs: dict[str, dict[str, dict[int, dict[str, Any]]]], budget: str) -> str:
    """Per task at one budget: plain removal's training loss minus dense's, and each ``<default>+<option>``
    arm's minus plain removal's, over the step ranges ``SPANS`` (mean over seeds): whether a difference at the
    cut lasts, and what stays between the pruned and the dense model."""
    groups = {task_of(g): arms for g, arms in sorted(runs.items()) if budget_of(g) == budget}
    head = [
        "task",
        "arm",
        "minus",
        "seeds",
        *[f"steps {lo}-{'end' if hi is None else hi - 1}" for lo, hi in SPANS],
    ]
    lines = [f"### all tasks, {label(budget)}: training loss minus the reference (same batches), "
             "mean over step ranges", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    compared = False
    for task, arms in sorted(groups.items()):
        options = sorted(a for a in arms if a.startswith(DEFAULT + "+") and "+kd" not in a)
        for arm, ref in [(DEFAULT, "dense")] + [(a, DEFAULT) for a in options]:
            gaps = [loss_gap(arms, arm, ref, lo, hi) for lo, hi in SPANS]
            if not any(gaps):
                continue
            compared |= ref == DEFAULT
            seeds = max(len(g) for g in gaps)
            cells = [task, arm, ref, str(seeds), *[f"{sum(g) / len(g):+.2f}" if g else "" for g in gaps]]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" if compared else ""  # plain - dense alone: nothing to compare


def cut_table(runs: dict[str, dict[str, dict[int, dict[str, Any]]]], budget: str) -> str:
    """Across tasks at one budget: the loss jump at the cut (``cut_jump``), mean over seeds per task, and the
    mean over the tasks that have the arm."""
    groups = {task_of(g): arms for g, arms in sorted(runs.items()) if budget_of(g) == budget}
    tasks = sorted(groups)
    arms = sorted({a for arms in groups.values() for a in arms if a != "dense"})
    head = ["arm", *tasks, "mean over tasks", "tasks"]
    lines = [f"### all tasks, {label(budget)}: training loss right after the cut minus dense "
             "(same batch, same step)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for arm in arms:
        cells, means = [arm], []
        for task in tasks:
            jumps = cut_jump(groups[task], arm)
            if jumps:
                m, se = mean_se(jumps)
                means.append(m)
                cells.append(fmt(m, se, scale=1.0, sign=True) + f" (n={len(jumps)})")
            else:
                cells.append("")
        if means:
            cells += [f"{sum(means) / len(means):+.2f}", f"{len(means)}/{len(tasks)}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" if len(lines) > 4 else ""


def mean_se(values: list[float]) -> tuple[float, float | None]:
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1)
    return m, math.sqrt(var / len(values))


def fmt(m: float, se: float | None, scale: float = 100.0, sign: bool = False) -> str:
    """Points (``scale`` 100, one decimal) or raw values (``scale`` 1, two decimals), with the standard error."""
    digits = 1 if scale == 100.0 else 2
    body = f"{m * scale:+.{digits}f}" if sign else f"{m * scale:.{digits}f}"
    return body if se is None else f"{body} ± {se * scale:.{digits}f}"


def table(group: str, arms: dict[str, dict[int, dict[str, Any]]]) -> str:
    points = sorted({p["step"] for runs in arms.values() for s in runs.values() for p in s.get("curve", [])})
    head = ["arm", "seeds", *[f"acc @ {p}" for p in points], "final vs dense (paired)", "train s", "layers"]
    lines = [f"### {group}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = ["dense"] + sorted(a for a in arms if a != "dense")
    for arm in order:
        runs = arms.get(arm)
        if not runs:
            continue
        seeds = sorted(runs)
        cells = [arm, ",".join(map(str, seeds))]
        for p in points:
            accs = [q["accuracy"] for s in runs.values() for q in s.get("curve", []) if q["step"] == p]
            cells.append(fmt(*mean_se(accs)) if accs else "")
        diffs = paired(arms, arm) if arm != "dense" else []
        cells.append(fmt(*mean_se(diffs), sign=True) + f" (n={len(diffs)})" if diffs else "-")
        cells.append(f"{sum(r['train_s'] for r in runs.values()) / len(runs):.0f}")
        cells.append(str(runs[seeds[0]].get("pruned_layers", runs[seeds[0]].get("dense_layers", ""))))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def print_tables(out: Path) -> str:
    runs = load(out)
    text = "\n".join(table(g, arms) for g, arms in sorted(runs.items()))
    for b in sorted({budget_of(g) for g in runs}):
        text += "".join(
            "\n" + t
            for t in (across_tasks(runs, b), versus_default(runs, b), cut_table(runs, b), loss_table(runs, b))
            if t
        )
    print(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "results" / "fullrun"))
    ap.add_argument("--markdown", default="", help="also write the tables to this file")
    ap.add_argument(
        "--docs", action="store_true", help="put the tables into docs/results.md (between markers)"
    )
    args = ap.parse_args()
    text = print_tables(Path(args.out))
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.docs:
        doc = ROOT / "docs" / "results.md"
        body = doc.read_text()
        start, end = "<!-- fullrun tables -->", "<!-- /fullrun tables -->"
        head, rest = body.split(start, 1)
        doc.write_text(head + start + "\n" + text + end + rest.split(end, 1)[1])


if __name__ == "__main__":
    main()
