"""What ``repair`` costs: a training step while its sums are collected against a plain step, side by side in
one run (alternate steps of the repair phase run inside ``pruner.paused()``, which turns the hooks off), the
memory of the sums, and the time of the fold at the prune. The real SmolLM2-135M on a real task, the plan of
the full-run protocol's default on it.

    python -m benchmarks.speed.repair --task piqa --steps 12 --json docs/benchmarks/repair_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.quality.fullrun import TASKS
from gradpruner_ds.config import GradPrunerConfig
from gradpruner_ds.pruner import GradPruner
from gradpruner_ds.repair import statistics_bytes
from launch.models import load_smollm2
from launch.tasks import build_train_dataset, collate, load_task, split_task


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="piqa", choices=sorted(TASKS))
    ap.add_argument("--removed", default="3,12,13,14,15,16,17,25,26")
    ap.add_argument("--steps", type=int, default=12, help="steps of the repair phase (half of them paused)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--map", default="full", choices=("full", "diagonal"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    model.config.use_cache = False
    model.train()
    items = build_train_dataset(tok, split_task(load_task(TASKS[args.task]), seed=0).train, max_length=128)
    batches = [collate(items[i : i + args.batch], tok.pad_token_id) for i in range(0, len(items), args.batch)]
    removed = [int(x) for x in args.removed.split(",")]
    # the steps of the phase alternate: unpaused ones count (sums collected), paused ones are plain steps
    counted = args.steps // 2
    block = {"window_steps": 1, "layers_to_remove": removed, "progress_bar": False,
             "repair": {"steps": counted, "map": args.map}}  # fmt: skip
    cfg = GradPrunerConfig.from_dict(block)
    pruner = GradPruner(model, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    times: dict[str, list[float]] = {"plain": [], "repair": []}
    fold_s = None
    for i, b in enumerate(batches[: args.steps + 3]):
        paused = pruner.repairing and i % 2 == 0
        ctx = pruner.paused() if paused else _nothing()
        t0 = time.perf_counter()
        with ctx:
            model(**b).loss.backward()
            pruner.observe()
        opt.step()
        opt.zero_grad()
        step_s = time.perf_counter() - t0
        if pruner.repairing and i > 1:  # the phase's steps, the first of each kind left out (warm-up)
            times["plain" if paused else "repair"].append(step_s)
        cutting = pruner.cutting
        t1 = time.perf_counter()
        opt, _ = pruner.maybe_prune(opt)
        if cutting and pruner.repairer is None and pruner.plan is not None:
            fold_s = pruner.report["repair"]["fold_s"]
            prune_s = time.perf_counter() - t1
            break
    med = {k: statistics.median(v) for k, v in times.items() if v}
    report = pruner.report["repair"]
    out = {
        "task": args.task,
        "map": args.map,
        "removed": removed,
        "steps": {k: len(v) for k, v in times.items()},
        "median_step_s": med,
        "repair_over_plain": med["repair"] / med["plain"],
        "sums_bytes_per_rank": statistics_bytes(576, len(report["runs"]), cfg.repair),  # type: ignore[arg-type]
        "fold_s": fold_s,
        "prune_s": prune_s,
        "explained": [r["explained"] for r in report["runs"]],
        "tokens": [r["tokens"] for r in report["runs"]],
        "threads": args.threads,
    }
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    main()
