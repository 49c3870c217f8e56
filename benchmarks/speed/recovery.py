"""What in-job recovery (self-distillation from the pre-prune model) costs per step and in memory.

One process, the real SmolLM2-135M-Instruct, real task batches (batch 8, max length 128, as the full-run
quality protocol). GradPruner observes ``--window`` steps with a ``recovery`` block and prunes; then, with
the teacher alive, steps of the pruned model alternate: a plain step (the task loss only) and a
distillation step (``pruner.distill``: + the teacher's forward and the KL term). Reported:

* distillation step / plain step: median and quartiles of the ratios of adjacent pairs (machine noise
  lands on both sides of a pair);
* the teacher's weights / the pruned student's weights (bytes; the teacher is the pre-prune model, so this
  is 1 / kept fraction), and the process RSS after the prune with the teacher / before the prune.

(The post-prune / dense step ratio is the speed benchmark's, ``benchmarks/speed/run.py``.)

    python -m benchmarks.speed.recovery --pairs 16 --out docs/benchmarks/recovery_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from gradpruner_ds.config import GradPrunerConfig
from gradpruner_ds.diagnostics import rss_bytes
from gradpruner_ds.pruner import GradPruner
from launch.models import load_smollm2
from launch.tasks import build_train_dataset, collate, load_task, split_task

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default=str(ROOT / "data" / "bigbench" / "intent_recognition.json"))
    ap.add_argument("--pairs", type=int, default=16, help="(plain, distillation) step pairs after the prune")
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--prune_ratio", type=float, default=0.3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max_length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model, tok = load_smollm2()
    model.train()
    split = split_task(load_task(args.task), seed=0, max_test=200)
    ds = build_train_dataset(tok, split.train, max_length=args.max_length)
    n_batches = args.window + 2 * args.pairs
    order = torch.randperm(len(ds)).tolist() * (1 + n_batches * args.batch // len(ds))
    batches = [
        collate([ds[i] for i in order[k * args.batch : (k + 1) * args.batch]], tok.pad_token_id)
        for k in range(n_batches)
    ]
    total_steps = n_batches
    cfg = GradPrunerConfig.from_dict(
        {
            "window_steps": args.window,
            "prune_ratio": args.prune_ratio,
            "progress_bar": False,
            # the teacher lives for every timed pair (each pair is two optimizer steps)
            "recovery": {"distill_steps": 2 * args.pairs + 1},
        }
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    pruner = GradPruner(model, cfg, total_steps=total_steps)
    it = iter(batches)

    def step(distill: bool) -> float:
        batch = next(it)
        t0 = time.perf_counter()
        out = model(**batch)
        loss = pruner.distill(out.loss, out.logits, batch) if distill else out.loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        pruner.observe()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for _ in range(args.window):
        step(False)
    student_bytes_before = sum(p.numel() * p.element_size() for p in model.parameters())
    rss_before = rss_bytes()
    opt, _ = pruner.maybe_prune(opt)
    assert pruner.plan is not None and pruner.distiller is not None and pruner.distiller.active
    rss_after = rss_bytes()
    student_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    teacher_bytes = pruner.distiller.teacher_bytes()
    plain, distill = [], []
    for _ in range(args.pairs):
        plain.append(step(False))
        distill.append(step(True))
        assert pruner.distiller.active
    ratios = sorted(d / p for d, p in zip(distill, plain, strict=True))
    q = len(ratios)
    res = {
        "command": "python benchmarks/speed/" + Path(__file__).name + " " + " ".join(sys.argv[1:]),
        "model": "SmolLM2-135M-Instruct",
        "layers_removed": len(pruner.plan.removed),
        "pairs": args.pairs,
        "plain_step_s": statistics.median(plain),
        "distill_step_s": statistics.median(distill),
        "distill_over_plain_median": statistics.median(ratios),
        "distill_over_plain_q1": ratios[q // 4],
        "distill_over_plain_q3": ratios[(3 * q) // 4],
        "teacher_bytes": teacher_bytes,
        "student_bytes": student_bytes,
        "dense_bytes": student_bytes_before,
        "teacher_over_student_bytes": teacher_bytes / student_bytes,
        "rss_bytes_before_prune": rss_before,
        "rss_bytes_after_prune_with_teacher": rss_after,
        "rss_after_over_before": rss_after / rss_before,
    }
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
