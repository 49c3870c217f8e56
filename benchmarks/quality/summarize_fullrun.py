"""Tables of the full-run quality protocol (``benchmarks/quality/fullrun.py``) from the runs that finished.

Per task and budget: every arm's accuracy at each evaluation point of the run (the recovery curve), the
final accuracy paired with the dense run of the same seed (mean +- standard error over seeds), and the
training wall clock (evaluation excluded), so arms compare at equal steps and at equal time.

    python benchmarks/quality/summarize_fullrun.py [--out benchmarks/quality/fullrun] [--docs]
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def load(out: Path) -> dict[str, dict[str, dict[int, dict[str, Any]]]]:
    """group -> arm -> seed -> summary."""
    runs: dict[str, dict[str, dict[int, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    for path in sorted(out.glob("*/*/summary.json")):
        s = json.loads(path.read_text())
        runs[path.parent.parent.name][s["arm"]][int(s["seed"])] = s
    return runs


def mean_se(values: list[float]) -> tuple[float, float | None]:
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1)
    return m, math.sqrt(var / len(values))


def fmt(m: float, se: float | None, scale: float = 100.0, sign: bool = False) -> str:
    body = f"{m * scale:+.1f}" if sign else f"{m * scale:.1f}"
    return body if se is None else f"{body} ± {se * scale:.1f}"


def table(group: str, arms: dict[str, dict[int, dict[str, Any]]]) -> str:
    dense = arms.get("dense", {})
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
        paired = [runs[s]["acc_after"] - dense[s]["acc_after"] for s in seeds if s in dense and arm != "dense"]
        cells.append(fmt(*mean_se(paired), sign=True) + f" (n={len(paired)})" if paired else "-")
        cells.append(f"{sum(r['train_s'] for r in runs.values()) / len(runs):.0f}")
        cells.append(str(runs[seeds[0]].get("pruned_layers", runs[seeds[0]].get("dense_layers", ""))))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def print_tables(out: Path) -> str:
    runs = load(out)
    text = "\n".join(table(g, arms) for g, arms in sorted(runs.items()))
    print(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "quality" / "fullrun"))
    ap.add_argument("--markdown", default="", help="also write the tables to this file")
    ap.add_argument("--docs", action="store_true", help="put the tables into docs/results.md (between markers)")
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
