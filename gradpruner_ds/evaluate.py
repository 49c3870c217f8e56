"""Evaluate a pruned checkpoint (and optionally the dense one) with lm-evaluation-harness, the tool pruned
models are compared with. Needs the ``eval`` extra (``pip install "gradpruner-ds[eval]"``: ``lm_eval``).

    gradpruner-ds eval --model outputs/demo/final --dense PATH --tasks piqa,arc_easy [--limit 200]

Any lm_eval task name works (its data must be on the machine: lm_eval loads it through ``datasets``);
``--include-path DIR`` adds local task YAMLs (``launch/lm_eval_tasks.py`` writes them for the task files
of ``data/``). Prints one row per task: accuracy of the pruned model, of the dense one, the difference.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradpruner_ds.errors import user_error


def _lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise user_error(
            "evaluation with lm-evaluation-harness needs the lm_eval package",
            "not installed",
            'pip install "gradpruner-ds[eval]"',
        ) from None
    return lm_eval


def evaluate(
    model_dir: str | Path,
    tasks: Sequence[str],
    *,
    include_path: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict[str, dict[str, float]]:
    """``lm_eval.simple_evaluate`` of the ``from_pretrained`` folder ``model_dir`` on ``tasks``; returns
    ``{task: {metric: value}}`` (lm_eval's metric names, e.g. ``acc``, ``acc_norm``, ``acc_stderr``)."""
    lm_eval = _lm_eval()
    from lm_eval.tasks import TaskManager

    if not (Path(model_dir) / "config.json").is_file():
        raise user_error(
            "--model must be a from_pretrained folder (with config.json)", str(model_dir), "pass one"
        )
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "dtype": dtype},
        tasks=list(tasks),
        task_manager=manager,
        batch_size=batch_size,
        device=device,
        limit=limit,
        log_samples=False,
        bootstrap_iters=0,
    )
    results: dict[str, dict[str, float]] = {}
    for task, metrics in out["results"].items():
        results[task] = {
            key.split(",")[0]: float(value)
            for key, value in metrics.items()
            if isinstance(value, int | float) and "," in key
        }
    return results


def compare(
    pruned: dict[str, dict[str, float]], dense: dict[str, dict[str, float]] | None = None, metric: str = "acc"
) -> str:
    """A markdown table: the pruned model's ``metric`` per task, the dense model's and the difference."""
    rows = ["| task | pruned | dense | pruned - dense |", "|---|---|---|---|"]
    for task in sorted(pruned):
        p = pruned[task].get(metric)
        d = (dense or {}).get(task, {}).get(metric)
        cells = [
            task,
            "" if p is None else f"{p:.4f}",
            "" if d is None else f"{d:.4f}",
            "" if p is None or d is None else f"{p - d:+.4f}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def run_cli(args: Any) -> int:
    """``gradpruner-ds eval``: evaluate, print the table, write JSON if asked."""
    tasks = [t for t in args.tasks.split(",") if t]
    if not tasks:
        raise user_error(
            "--tasks must name at least one lm_eval task", args.tasks, "e.g. --tasks piqa,arc_easy"
        )
    if args.limit is not None and args.limit < 1:
        raise user_error("--limit must be at least 1", args.limit, "leave it out to use every item")
    kw = {"include_path": args.include_path, "limit": args.limit, "batch_size": args.batch_size,
          "device": args.device}  # fmt: skip
    pruned = evaluate(args.model, tasks, **kw)
    dense = evaluate(args.dense, tasks, **kw) if args.dense else None
    print(compare(pruned, dense, args.metric))
    if args.json:
        Path(args.json).write_text(json.dumps({"pruned": pruned, "dense": dense}, indent=2))
    return 0
