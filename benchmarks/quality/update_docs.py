"""Regenerate the quality tables in ``docs/results.md`` from the committed arm results.

    python -m benchmarks.quality.update_docs            # rewrite the generated blocks (and their copies)
    python -m benchmarks.quality.update_docs --check    # exit 1 if a block differs from the results

The document marks what is generated; the prose around it is written by hand:

* ``<!-- summary suffix=_b20 out=docs/benchmarks/quality_summary_b20.md -->`` ... ``<!-- /summary -->``:
  the :mod:`summarize` table of the folders ``results/quality/<task><suffix>`` for the four
  tasks (an empty suffix: the 30% folders), also written to ``out``; ``folders=a,b,c`` instead of
  ``suffix=`` names the result folders one by one (the observation windows: one window length per task);
* ``<!-- compute suffixes=,_b20,_b40 -->`` ... ``<!-- /compute -->`` (inline): per folder, the sum of
  the arms' own wall times in minutes (arms copied from another folder, ``copied_from``, not counted);
  ``folders=a,b`` names the folders one by one.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results" / "quality"
DOC = ROOT / "docs" / "results.md"
TASKS = ("intent_recognition", "piqa", "social_iqa", "multiemo")

SUMMARY = re.compile(r"(<!-- summary (suffix|folders)=(\S*) out=(\S+) -->\n)(.*?)(<!-- /summary -->)", re.S)
COMPUTE = re.compile(r"(<!-- compute (suffixes|folders)=(\S*) -->)(.*?)(<!-- /compute -->)", re.S)


def folders(kind: str, value: str) -> list[str]:
    """The result folder names a marker selects: the four tasks with a suffix, or listed by name."""
    if kind == "folders":
        return value.split(",")
    return [t + s for t in TASKS for s in value.split(",")]


def _summarize():
    spec = importlib.util.spec_from_file_location("summarize", Path(__file__).with_name("summarize.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def minutes(folder: Path) -> float:
    recs = [json.loads(p.read_text()) for p in (folder / "arms").glob("*.json")]
    return sum(r["seconds"]["total"] for r in recs if "copied_from" not in r) / 60


def generate(text: str, results: Path = RESULTS) -> tuple[str, dict[str, str]]:
    """The document with every generated block refreshed, and the summary copies (path -> table)."""
    render = _summarize().render
    copies: dict[str, str] = {}

    def summary(m: re.Match) -> str:
        table = render([results / f for f in folders(m.group(2), m.group(3))])
        copies[m.group(4)] = table
        return f"{m.group(1)}\n{table}\n{m.group(6)}"

    def compute(m: re.Match) -> str:
        parts = [f"{f} {minutes(results / f):.0f} min" for f in folders(m.group(2), m.group(3))]
        return f"{m.group(1)}{', '.join(parts)}{m.group(5)}"

    return COMPUTE.sub(compute, SUMMARY.sub(summary, text)), copies


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    args = ap.parse_args()
    old = DOC.read_text()
    new, copies = generate(old)
    stale = [str(DOC.relative_to(ROOT))] if new != old else []
    stale += [p for p, t in copies.items() if not (ROOT / p).exists() or (ROOT / p).read_text() != t]
    if args.check:
        for p in stale:
            print(f"out of date: {p} (run python -m benchmarks.quality.update_docs)")
        return 1 if stale else 0
    DOC.write_text(new)
    for p, t in copies.items():
        (ROOT / p).parent.mkdir(parents=True, exist_ok=True)
        (ROOT / p).write_text(t)
    print(f"updated: {', '.join(stale) or 'nothing (already current)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
