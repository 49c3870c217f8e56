"""What the least-squares repair buys with no training (ReplaceMe's setting): the pre-trained SmolLM2-135M, a
plan, the repair maps fitted on calibration batches of the task's train split, and the answer-token loss on
other train items and the accuracy on the test items, for dense, plain removal and every repair variant.

The sums are the product's own (``gradpruner_ds.statistics.repair.RepairStatistic`` on the model's training
forwards, nothing trained: the model stays the pre-trained one), read after 1, 2, 4, ... calibration steps
(tokens), each variant solved with ``gradpruner_ds.core.repair`` and folded into a copy of the model before the
plan's layers are removed (``gradpruner_ds.surgery.remove_layers``).

    python -m benchmarks.quality.repair_zeroshot --task piqa --removed 3,12,13,14,15,16,17,25,26
    python -m benchmarks.quality.repair_zeroshot --task piqa --plan runs/x/gradpruner_plan.json --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.quality.fullrun import TASKS
from gradpruner_ds.arch import decoder_layers, get_arch
from gradpruner_ds.core.repair import fold, removed_runs, residuals, solve_map
from gradpruner_ds.statistics.repair import RepairStatistic
from gradpruner_ds.surgery import remove_layers
from launch.models import load_smollm2
from launch.tasks import build_train_dataset, collate, evaluate_choices, load_task, split_task

ROOT = Path(__file__).resolve().parents[2]

VARIANTS = [
    ("full, ridge 1e-5 to 0", {"ridge": 1e-5, "target": "zero", "map": "full"}),
    ("full, ridge 1e-4 to 0", {"ridge": 1e-4, "target": "zero", "map": "full"}),
    ("full, ridge 1e-2 to 0", {"ridge": 1e-2, "target": "zero", "map": "full"}),
    ("full, ridge 0.1 to I", {"ridge": 0.1, "target": "identity", "map": "full"}),
    ("full, ridge 1 to I", {"ridge": 1.0, "target": "identity", "map": "full"}),
    ("diagonal, ridge 1e-4", {"ridge": 1e-4, "target": "zero", "map": "diagonal"}),
]


def answer_loss(model: Any, batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean answer-token cross-entropy over ``batches`` (prompt and padding masked by the labels)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            labels = b["labels"][:, 1:]
            mask = labels != -100
            ce = torch.nn.functional.cross_entropy(logits[mask].float(), labels[mask], reduction="sum")
            total += float(ce)
            count += int(mask.sum())
    return total / count


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="piqa", choices=sorted(TASKS))
    ap.add_argument("--removed", default="", help="comma-separated decoder layers removed (the plan)")
    ap.add_argument("--plan", default="", help="a gradpruner_plan.json instead of --removed")
    ap.add_argument("--steps", default="1,4,16,32", help="calibration steps (batch --batch each) read off the sums")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--loss-items", type=int, default=128, help="train items (after the calibration ones) for the loss")
    ap.add_argument("--max-test", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="", help="write the rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    removed = (
        json.loads(Path(args.plan).read_text())["dropped"]
        if args.plan
        else [int(x) for x in args.removed.split(",") if x]
    )
    if not removed:
        raise SystemExit("repair_zeroshot.py: give --removed or --plan")
    steps = sorted(int(s) for s in args.steps.split(","))
    model, tok = load_smollm2()
    model.config.use_cache = False
    spec = get_arch(model)
    split = split_task(load_task(TASKS[args.task]), seed=0, max_test=args.max_test)
    items = build_train_dataset(tok, split.train, max_length=128)
    calib_n = steps[-1] * args.batch
    pad = tok.pad_token_id
    mk = lambda xs: [collate(xs[i : i + args.batch], pad_token_id=pad) for i in range(0, len(xs), args.batch)]  # noqa: E731
    calib = mk(items[:calib_n])
    held = mk(items[calib_n : calib_n + args.loss_items])
    test = split.test
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    def row(name: str, m: Any, tokens: int | None, explained: list[float] | None = None) -> None:
        r = {"arm": name, "tokens": tokens, "loss": answer_loss(m, held), "acc": evaluate_choices(m, tok, test, batch_size=16),
             "explained": explained}  # fmt: skip
        rows.append(r)
        print(f"{name:28s} tokens {tokens!s:>7s}  loss {r['loss']:.3f}  acc {r['acc']:.3f}  "
              f"{'' if explained is None else 'explained ' + ', '.join(f'{e:.0%}' for e in explained)}"
              f"  ({time.perf_counter() - t0:.0f}s)", flush=True)  # fmt: skip

    model.eval()
    row("dense", model, None)
    plain = copy.deepcopy(model)
    remove_layers(plain, removed)
    row("plain removal", plain, None)
    del plain
    runs = [r for r in removed_runs(removed) if r[0] >= 1]
    sums: dict[tuple[bool, int], torch.Tensor] = {}
    for diagonal in (False, True):
        stat = RepairStatistic(model, spec, runs, diagonal=diagonal)
        model.train()  # a training-mode forward (no dropout in this model): the statistic counts it
        with torch.no_grad():
            for k, b in enumerate(calib, start=1):
                model(**{key: b[key] for key in ("input_ids", "attention_mask")})
                stat.update(True)
                if k in steps:
                    sums[(diagonal, k)] = (stat.partial_table(), stat)  # type: ignore[assignment]
        stat.close()
        model.eval()
    for k in steps:
        for name, v in VARIANTS:
            table, stat = sums[(v["map"] == "diagonal", k)]  # type: ignore[misc]
            repaired = copy.deepcopy(model)
            layers = decoder_layers(repaired)
            explained, tokens = [], 0
            for r, (s, _) in enumerate(runs):
                a, b, c, tokens = stat.sums(table, r)
                t = solve_map(a, b, v["ridge"], v["target"])
                plain_res, fitted = residuals(a, b, c, t)
                explained.append(1 - fitted / plain_res)
                w = layers[s - 1].get_submodule(spec.mlp_writer).weight
                with torch.no_grad():
                    w.copy_(fold(w, t).to(w.dtype))
            remove_layers(repaired, removed)
            row(name, repaired, tokens, explained)
    if args.json:
        Path(args.json).write_text(json.dumps({"task": args.task, "removed": removed, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
