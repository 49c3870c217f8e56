"""Evaluate a pruned checkpoint (and optionally the dense one) with lm-evaluation-harness, the tool pruned
models are compared with. Needs the ``eval`` extra (``pip install "gradpruner-ds[eval]"``: ``lm_eval``).

    gradpruner-ds eval --model outputs/demo/final --dense PATH --tasks piqa,arc_easy [--limit 200]

Any lm_eval task name works (its data must be on the machine: lm_eval loads it through ``datasets``);
``--include-path DIR`` adds local task YAMLs (``launch/lm_eval_tasks.py`` writes them for the task files
of ``data/``). Prints one row per task: the number of items, the metric of the pruned model and of the dense
one, each with its standard error, and the difference.

Every argument is checked before any model is loaded (``gradpruner:`` errors, exit code 2): the model
folders, the task names (against lm_eval's task index, with ``--include-path``), the metric (against the
metrics the tasks' configs declare), ``--json``'s folder, ``--limit``, ``--batch-size`` and ``--device``.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradpruner_ds.errors import user_error

_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_DEFAULT_METRICS = {  # lm_eval's metrics per output_type when a task config lists none
    "multiple_choice": {"acc", "acc_norm"},
    "loglikelihood": {"perplexity", "acc"},
    "loglikelihood_rolling": {"word_perplexity", "byte_perplexity", "bits_per_byte"},
    "generate_until": {"exact_match"},
}


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


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None) -> Any:
    """lm_eval's task index (built once per include path: it scans every task YAML)."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def check_model_dir(model_dir: str | Path, option: str) -> None:
    """``model_dir`` must be a ``from_pretrained`` folder: ``config.json`` and weights."""
    folder = Path(model_dir)
    if not (folder / "config.json").is_file() or not any((folder / w).is_file() for w in _WEIGHTS):
        raise user_error(
            f"{option} must be a from_pretrained folder (config.json and model.safetensors or its index)",
            str(model_dir),
            "pass the folder save_pretrained wrote, e.g. outputs/demo/final",
        )


def check_tasks(tasks: Sequence[str], include_path: str | Path | None) -> Any:
    """Every name must be a task, group or tag lm_eval knows (with ``include_path``); returns the index."""
    if include_path is not None and not Path(include_path).is_dir():
        raise user_error(
            "--include-path must be a folder of lm_eval task YAMLs", str(include_path), "pass a folder"
        )
    manager = _task_manager(None if include_path is None else str(include_path))
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        close = {t: difflib.get_close_matches(t, known, n=3) for t in unknown}
        hint = "; ".join(f"{t}: did you mean {c}" for t, c in close.items() if c)
        raise user_error(
            "--tasks must name lm_eval tasks, groups or tags"
            + ("" if include_path else " (local task YAMLs need --include-path)"),
            ", ".join(unknown),
            (hint + "; " if hint else "") + "list them with `lm_eval ls tasks`",
        )
    return manager


def declared_metrics(manager: Any, task: str) -> set[str] | None:
    """The metrics a (leaf) task's config declares; None where that is not known before running it (groups,
    tags, Python tasks)."""
    entry = getattr(manager, "task_index", {}).get(task)
    cfg = getattr(entry, "cfg", None)
    if not isinstance(cfg, dict) or getattr(getattr(entry, "kind", None), "name", "") != "TASK":
        return None
    listed = cfg.get("metric_list")
    if isinstance(listed, list) and listed:
        names = {m.get("metric") for m in listed if isinstance(m, dict)}
        return {n for n in names if isinstance(n, str)} or None
    return _DEFAULT_METRICS.get(str(cfg.get("output_type")))


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
    ``{task: {metric: value}}`` (lm_eval's metric names, e.g. ``acc``, ``acc_norm``), with ``n`` (the items
    scored) and, for 0/1 metrics (accuracies, exact match), ``<metric>_stderr``: the standard error of the mean,
    sqrt(p (1 - p) / (n - 1)), lm_eval's own formula for a mean."""
    lm_eval = _lm_eval()
    check_model_dir(model_dir, "--model")
    manager = check_tasks(tasks, include_path)
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
    counts = out.get("n-samples", {})
    results: dict[str, dict[str, float]] = {}
    for task, metrics in out["results"].items():
        row = {
            key.split(",")[0]: float(value)
            for key, value in metrics.items()
            if isinstance(value, int | float) and not isinstance(value, bool) and "," in key
        }
        count = counts.get(task)
        n = count.get("effective") if isinstance(count, dict) else getattr(count, "effective", None)
        if isinstance(n, int) and n > 0:
            row["n"] = float(n)
            for name, p in list(row.items()):
                if _is_rate(name) and 0.0 <= p <= 1.0 and f"{name}_stderr" not in row and n > 1:
                    row[f"{name}_stderr"] = math.sqrt(p * (1.0 - p) / (n - 1))
        results[task] = row
    return results


def _is_rate(metric: str) -> bool:
    return (metric.startswith("acc") or metric == "exact_match") and not metric.endswith("_stderr")


def compare(
    pruned: dict[str, dict[str, float]], dense: dict[str, dict[str, float]] | None = None, metric: str = "acc"
) -> str:
    """A markdown table: items per task, the pruned model's ``metric`` and the dense model's, each +- its
    standard error, and the difference."""

    def cell(row: dict[str, float] | None) -> str:
        if row is None or metric not in row:
            return ""
        se = row.get(f"{metric}_stderr")
        return f"{row[metric]:.4f}" + ("" if se is None else f" ± {se:.4f}")

    rows = [f"| task | items | pruned {metric} | dense {metric} | pruned - dense |", "|---|---|---|---|---|"]
    for task in sorted(pruned):
        p, d = pruned[task], (dense or {}).get(task)
        n = p.get("n")
        diff = "" if d is None or metric not in p or metric not in d else f"{p[metric] - d[metric]:+.4f}"
        rows.append(f"| {task} | {'' if n is None else int(n)} | {cell(p)} | {cell(d)} | {diff} |")
    return "\n".join(rows)


def check_args(args: Any) -> tuple[list[str], Any]:
    """Every argument of ``gradpruner-ds eval`` checked before any work; returns the task names and the index."""
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise user_error(
            "--tasks must name at least one lm_eval task", args.tasks, "e.g. --tasks piqa,arc_easy"
        )
    if args.limit is not None and args.limit < 1:
        raise user_error("--limit must be at least 1", args.limit, "leave it out to use every item")
    if args.batch_size < 1:
        raise user_error("--batch-size must be at least 1", args.batch_size, "e.g. --batch-size 8")
    _check_device(args.device)
    check_model_dir(args.model, "--model")
    if args.dense is not None:
        check_model_dir(args.dense, "--dense")
    if args.json is not None:
        target = Path(args.json)
        folder = target.parent
        if target.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise user_error(
                "--json must be a file path in an existing, writable folder",
                args.json,
                "create the folder first or pass another path",
            )
    _lm_eval()
    manager = check_tasks(tasks, args.include_path)
    if not args.metric or not args.metric.strip():
        raise user_error("--metric must name a metric", args.metric, "e.g. --metric acc")
    for task in tasks:
        declared = declared_metrics(manager, task)
        if declared is not None and args.metric not in declared:
            raise user_error(
                f"--metric must be one the task computes ({task}: {', '.join(sorted(declared))})",
                args.metric,
                f"pass --metric {sorted(declared)[0]}",
            )
    return tasks, manager


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise user_error(
            "--device must be a torch device", device, "e.g. --device cpu or --device cuda:0"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise user_error("--device cuda needs a GPU torch can see", device, "pass --device cpu")


def run_cli(args: Any) -> int:
    """``gradpruner-ds eval``: check every argument, evaluate, print the table, write JSON if asked."""
    tasks, _ = check_args(args)
    kw = {"include_path": args.include_path, "limit": args.limit, "batch_size": args.batch_size,
          "device": args.device}  # fmt: skip
    pruned = evaluate(args.model, tasks, **kw)
    dense = evaluate(args.dense, tasks, **kw) if args.dense else None
    print(compare(pruned, dense, args.metric))
    if args.json:
        Path(args.json).write_text(json.dumps({"pruned": pruned, "dense": dense}, indent=2))
    missing = sorted(t for t, row in pruned.items() if args.metric not in row)
    if missing:  # a metric no task config declares in advance (groups, Python tasks) and none computed
        raise user_error(
            f"--metric must be one the tasks compute (not computed for {', '.join(missing)})",
            args.metric,
            "pass one of "
            + ", ".join(
                sorted({k for t in missing for k in pruned[t] if k != "n" and not k.endswith("_stderr")})
            ),
        )
    return 0
