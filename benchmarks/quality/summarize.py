"""Cross-task summary of quality-harness results: one row per arm (data orders and random seeds pooled),
one column group per budget, averaged over the tasks that ran it.

    python benchmarks/quality/summarize.py benchmarks/quality/results/{intent_recognition,piqa,social_iqa,multiemo} \
        benchmarks/quality/results/{intent_recognition,piqa,social_iqa,multiemo}_b20 --out docs/benchmarks/quality_summary.md

Per task the arm's accuracy is its mean over runs (seeds / data orders) minus the dense arm's mean in the
same folder; "loss ratio" is the arm's mean re-tuning loss (last 3 steps) over the dense one's. The
table averages these per-task numbers over the tasks (``k`` = how many tasks have the arm), and counts
in how many of them the arm is at or above every baseline arm of that folder.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

BASELINES = ("reverse", "random", "angular", "shortgpt_bi")


def runs(folder: Path) -> dict[str, list[dict]]:
    """Arm group (name without ``#...``) -> its runs."""
    out: dict[str, list[dict]] = defaultdict(list)
    for p in sorted((folder / "arms").glob("*.json")):
        rec = json.loads(p.read_text())
        out[rec["arm"].split("#")[0]].append(rec)
    return out


def loss3(rec: dict) -> float:
    return sum(rec["retune_losses"][-3:]) / 3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    # (arm without budget, budget) -> per task (delta acc, loss ratio, n runs)
    table: dict[tuple[str, str], list[tuple[str, float, float, int]]] = defaultdict(list)
    for folder in args.folders:
        groups = runs(folder)
        if "dense" not in groups:
            continue
        d_acc = sum(r["accuracy"] for r in groups["dense"]) / len(groups["dense"])
        d_loss = sum(loss3(r) for r in groups["dense"]) / len(groups["dense"])
        task = re.sub(r"_b\d+$", "", folder.name)
        for arm, rs in groups.items():
            if arm == "dense":
                table[("dense", "-")].append((task, 0.0, 1.0, len(rs)))
                continue
            name, budget = arm.split("@", 1)
            rest = re.sub(r"^[0-9.]+", "", budget)
            acc = sum(r["accuracy"] for r in rs) / len(rs)
            loss = sum(loss3(r) for r in rs) / len(rs)
            table[(name + rest, budget[: len(budget) - len(rest)])].append(
                (task, 100 * (acc - d_acc), loss / d_loss, len(rs))
            )
    short = {"intent_recognition": "intent", "social_iqa": "siqa", "multiemo": "memo", "piqa": "piqa"}
    table = {k: [(short.get(t, t), *rest) for t, *rest in v] for k, v in table.items()}
    lines = [
        "| arm | budget | tasks (k) | runs | accuracy vs dense, mean over tasks (pt) "
        "| per task: accuracy vs dense (pt) (re-tune loss / dense) | re-tune loss / dense, mean over tasks |",
        "|---|---|---|---|---|---|---|",
    ]
    order = sorted(table, key=lambda k: (k[1], -len(table[k]), -sum(x[1] for x in table[k]) / len(table[k])))
    for name, budget in order:
        rows = table[(name, budget)]
        per = ", ".join(f"{t} {d:+.1f} ({lr:.1f}x)" for t, d, lr, _ in sorted(rows))
        mean_d = sum(r[1] for r in rows) / len(rows)
        mean_l = sum(r[2] for r in rows) / len(rows)
        lines.append(
            f"| {name} | {budget} | {len(rows)} | {sum(r[3] for r in rows)} | {mean_d:+.1f} | {per} | {mean_l:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
