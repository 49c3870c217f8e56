"""Cross-task summary of quality-harness results: one row per arm and budget, averaged over the tasks
that ran it, with the spread over its runs (re-tuning data orders ``#d<N>``, random seeds ``#s<N>``).

    python -m benchmarks.quality.summarize results/quality/{intent_recognition,piqa,social_iqa,multiemo} \
        results/quality/{intent_recognition,piqa,social_iqa,multiemo}_b20 --out docs/benchmarks/quality_summary.md

Per task and run, the arm's accuracy minus the dense arm's accuracy with the same re-tuning data order
(the mean of the dense runs when that order has no dense run), and its mean re-tuning loss (last 3
steps) over the dense one's. Per task: mean and sample standard deviation over the runs. Over tasks: the
mean of the per-task means, and the standard deviation over runs of the run-level task means (runs paired
by their index: data order, seed) when every task has the same runs. "vs baselines": in how many tasks
the arm's mean is at or above every baseline arm's mean at the same budget, and whether its cross-task
mean is at or above every baseline's. "vs default": the arm minus the default criterion at the same
budget, paired by task and data order (random seeds averaged within an order), averaged over the tasks
per order, then mean ± standard error over the orders every task has (their count in brackets).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

BASELINES = ("reverse", "random", "angular", "shortgpt_bi")
DEFAULT = "shortgpt_bi"  # the product's default criterion: every row is also compared with it, run by run
SHORT = {"intent_recognition": "intent", "social_iqa": "siqa", "multiemo": "memo", "piqa": "piqa"}


def runs(folder: Path) -> dict[str, list[dict]]:
    """Arm group (name without ``#...``) -> its runs."""
    out: dict[str, list[dict]] = defaultdict(list)
    for p in sorted((folder / "arms").glob("*.json")):
        rec = json.loads(p.read_text())
        out[rec["arm"].split("#")[0]].append(rec)
    return out


def loss3(rec: dict) -> float:
    return sum(rec["retune_losses"][-3:]) / 3


def run_id(rec: dict) -> tuple[int, int]:
    return int(rec.get("data_order", 0)), int(rec.get("seed", 0))


def sd(xs: list[float]) -> float | None:
    return statistics.stdev(xs) if len(xs) > 1 else None


def fmt_sd(x: float | None) -> str:
    return "" if x is None else f" ± {x:.1f}"


class Cell:
    """One arm at one budget on one task: its runs' accuracy deltas and loss ratios vs dense."""

    def __init__(self, task: str, deltas: dict[tuple[int, int], float], ratios: list[float]) -> None:
        self.task, self.deltas, self.ratios = task, deltas, ratios
        self.mean = statistics.fmean(deltas.values())
        self.sd = sd(list(deltas.values()))
        self.loss = statistics.fmean(ratios)


def collect(folders: list[Path]) -> dict[tuple[str, str], list[Cell]]:
    """(arm without budget and run suffix, budget) -> one cell per task."""
    table: dict[tuple[str, str], list[Cell]] = defaultdict(list)
    for folder in folders:
        groups = runs(folder)
        if "dense" not in groups:
            continue
        dense_acc = {r.get("data_order", 0): r["accuracy"] for r in groups["dense"]}
        dense_loss = {r.get("data_order", 0): loss3(r) for r in groups["dense"]}
        mean_acc, mean_loss = statistics.fmean(dense_acc.values()), statistics.fmean(dense_loss.values())
        task = re.sub(r"(_[bwr]\d+)+$", "", folder.name)  # _b20 budget, _w12 window, _r32 re-tuning
        task = SHORT.get(task, task)
        for arm, rs in groups.items():
            deltas = {
                run_id(r): 100 * (r["accuracy"] - dense_acc.get(r.get("data_order", 0), mean_acc)) for r in rs
            }
            ratios = [loss3(r) / dense_loss.get(r.get("data_order", 0), mean_loss) for r in rs]
            if arm == "dense":
                table[("dense", "-")].append(Cell(task, deltas, ratios))
                continue
            name, budget = arm.split("@", 1)
            rest = re.sub(r"^[0-9.]+", "", budget)
            table[(name + rest, budget[: len(budget) - len(rest)])].append(Cell(task, deltas, ratios))
    return table


def cross_task_sd(cells: list[Cell]) -> float | None:
    """SD over runs of the run-level cross-task means, when every task has the same run ids."""
    ids = set(cells[0].deltas)
    if any(set(c.deltas) != ids for c in cells) or len(ids) < 2:
        return None
    return sd([statistics.fmean(c.deltas[i] for c in cells) for i in sorted(ids)])


def by_order(cell: Cell) -> dict[int, float]:
    """Data order -> the cell's mean accuracy delta over that order's runs (random seeds)."""
    acc: dict[int, list[float]] = defaultdict(list)
    for (order, _seed), d in cell.deltas.items():
        acc[order].append(d)
    return {o: statistics.fmean(v) for o, v in acc.items()}


def paired_vs(cells: list[Cell], ref_cells: list[Cell]) -> tuple[float, float | None, int] | None:
    """Mean over data orders of the cross-task mean of (arm - reference), its standard error, and the
    number of orders; None unless both ran on the same tasks with at least one common order."""
    ref = {c.task: by_order(c) for c in ref_cells}
    if {c.task for c in cells} != set(ref):
        return None
    mine = {c.task: by_order(c) for c in cells}
    orders = set.intersection(*(set(mine[t]) & set(ref[t]) for t in ref))
    if not orders:
        return None
    per_order = [statistics.fmean(mine[t][o] - ref[t][o] for t in ref) for o in sorted(orders)]
    se = statistics.stdev(per_order) / len(per_order) ** 0.5 if len(per_order) > 1 else None
    return statistics.fmean(per_order), se, len(per_order)


def render(folders: list[Path]) -> str:
    """The summary table (markdown) of the arm results in ``folders``."""
    table = collect(folders)
    lines = [
        "| arm | budget | tasks (k) | runs | accuracy vs dense, mean over tasks ± sd over runs (pt) "
        "| vs baselines: tasks at or above all / mean at or above all "
        f"| vs default ({DEFAULT}), paired: mean ± se (orders) "
        "| per task: accuracy vs dense ± sd (pt) (re-tune loss / dense) | re-tune loss / dense, mean over tasks |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    mean = {k: statistics.fmean(c.mean for c in v) for k, v in table.items()}
    order = sorted(table, key=lambda k: (k[1], -len(table[k]), -mean[k]))
    for key in order:
        name, budget = key
        cells = table[key]
        per = ", ".join(
            f"{c.task} {c.mean:+.1f}{fmt_sd(c.sd)} ({c.loss:.1f}x)"
            for c in sorted(cells, key=lambda c: c.task)
        )
        vs = "-"
        bases = [(b, budget) for b in BASELINES if (b, budget) in table and b != name]
        if name != "dense" and bases:
            wins = 0
            for c in cells:
                others = [o.mean for b in bases for o in table[b] if o.task == c.task]
                wins += all(c.mean >= o for o in others)
            same_tasks = all({c.task for c in table[b]} == {c.task for c in cells} for b in bases)
            on_avg = ("yes" if all(mean[key] >= mean[b] for b in bases) else "no") if same_tasks else "-"
            vs = f"{wins}/{len(cells)} / {on_avg}"
        paired = None
        if name not in ("dense", DEFAULT) and (DEFAULT, budget) in table:
            paired = paired_vs(cells, table[(DEFAULT, budget)])
        vs_default = "-" if paired is None else f"{paired[0]:+.1f}{fmt_sd(paired[1])} ({paired[2]})"
        lines.append(
            f"| {name} | {budget} | {len(cells)} | {sum(len(c.deltas) for c in cells)} "
            f"| {mean[key]:+.1f}{fmt_sd(cross_task_sd(cells))} | {vs} | {vs_default} | {per} "
            f"| {statistics.fmean(c.loss for c in cells):.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    text = render(args.folders)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
