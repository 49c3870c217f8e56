"""Full-run quality protocol: the pruned model after a real fine-tune, dense and pruned side by side.

Every run is one call of the product's own training script, ``launch/train.py`` (one process, one
thread): the same loop, AdamW, linear warmup (10% of the steps) + linear decay, clipping 1.0, batch 8,
lr 1e-4. GradPruner observes the first ``--window`` optimizer steps (4: longer than ~1% of an epoch on
every task here), prunes at the end of the window and training goes on with the smaller model for the
rest of the run. A run is one epoch of the task's train split, capped at ``--max-steps`` (120) steps.

The test split is capped at ``--max-test`` (200) items; the pruned model is scored on all of them at
``window + 8``, ``window + 32``, ``window + 64`` steps and at the end of the same run (the recovery
curve comes from one run per arm). Each run's wall clock (training only, evaluation excluded) is in its
summary, so arms can be compared at equal steps and at equal time.

Arms (``--arms``): ``dense``; a criterion name (``shortgpt_bi``, ``angular``, ``obd``, ``igia_sum``,
``last_layers``, ``random``, ...); ``<criterion>+kd<K>`` (the product's ``recovery`` option: the pre-prune
model distilled into the pruned one for K steps after the prune); ``<criterion>+rep<R>[:key=value...]`` (the
``repair`` option fitted over R steps after the plan; keys ``ridge``, ``target``, ``map``, ``state``);
``<criterion>+st<S>x<I>`` (progressive removal: ``stages`` S, ``stage_interval`` I); ``igia_sum~lora`` (the paper's LoRA-probe score: a LoRA r=8 probe run
over the same window batches with the same learning rates, its plan given to the full fine-tune
through ``layers_to_remove``). Seeds (``--seeds``) change the data order; arms in ``--repeat`` run with
every seed, the others with the first one only. The dense run does not depend on the budget: one dense run
per task and seed serves every budget (run in the first budget's folder, found there by the others).

Every run imports this checkout's ``gradpruner_ds`` (``PYTHONPATH``), so a grid run from a git worktree
runs the worktree's code while the main checkout changes; its summary records the commit (``code``).

Resumable: a run whose ``summary.json`` is in ``--out`` is skipped; runs write to a scratch folder
(``--scratch``) and only the small result files are copied into ``--out`` when a run has finished.

    python -m benchmarks.quality.fullrun --tasks piqa,intent_recognition --budget 0.3 --workers 1
    python -m benchmarks.quality.fullrun --summary          # tables from what has finished
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data"
TASKS = {
    "intent_recognition": DATA / "bigbench" / "intent_recognition.json",
    "piqa": DATA / "piqa",
    "social_iqa": DATA / "bigbench" / "social_iqa.json",
    "multiemo": DATA / "bigbench" / "multiemo__medicine_text_en.json",
}
TRAIN_ITEMS = {"intent_recognition": 485, "piqa": 1454, "social_iqa": 1552, "multiemo": 2745}
"""Train-split sizes with ``--max-test 200`` (``split_task(seed=0)``), for the one-epoch step count."""
DEFAULT_ARMS = "dense,shortgpt_bi,angular,obd,last_layers,igia_sum,igia_sum~lora,random"
DEFAULT_REPEAT = "dense,shortgpt_bi,angular,obd"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--budget", type=float, default=0.3, help="fraction of decoder layers removed")
    ap.add_argument("--arms", default=DEFAULT_ARMS)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--repeat", default=DEFAULT_REPEAT, help="arms run with every seed")
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--max-steps", type=int, default=120)
    ap.add_argument("--epochs", type=int, default=1, help="epochs of the train split (capped at --max-steps)")
    ap.add_argument("--max-test", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--out", default=str(ROOT / "results" / "fullrun"))
    ap.add_argument("--scratch", default="/tmp/gp/fullrun", help="run folders (logs, reports); not kept")
    ap.add_argument("--workers", type=int, default=1, help="runs at a time (one thread each)")
    ap.add_argument("--list", action="store_true", help="print the runs and whether they are done")
    ap.add_argument("--summary", action="store_true", help="print the tables of finished runs")
    return ap.parse_args(argv)


def run_steps(task: str, max_steps: int, batch: int, epochs: int = 1) -> int:
    """``epochs`` epochs of the train split (one by default), capped."""
    return min(max_steps, epochs * (TRAIN_ITEMS[task] // batch))


def group_name(args: argparse.Namespace, task: str) -> str:
    """``<task>_b<percent>``; a protocol with other lengths gets ``_e<epochs>s<max steps>`` too."""
    name = f"{task}_b{round(100 * args.budget)}"
    if args.epochs != 1 or args.max_steps != 120:
        name += f"_e{args.epochs}s{args.max_steps}"
    return name


def eval_points(window: int, steps: int, prune_step: int | None = None) -> list[int]:
    """Steps after which the model is scored: window + 8 / 32 / 64 (where inside the run), the end, and (for a
    pruned arm) right after the prune, before any further training."""
    points = {s for s in (window + 8, window + 32, window + 64) if s < steps} | {steps}
    if prune_step is not None and prune_step < steps:
        points.add(prune_step)
    return sorted(points)


REPAIR_KEYS = {"ridge": "ridge", "target": "ridge_target", "map": "map", "state": "optimizer_state", "dtype": "dtype"}
"""Short keys of an arm's repair options (``+rep8:ridge=1e-3:target=identity``) -> the sub-block's keys."""


def parse_arm(arm: str) -> tuple[str, dict[str, Any]]:
    """``<criterion>[+kd<K>][+rep<R>[:key=value...]][+st<S>x<I>]`` -> (criterion, the block's extra keys)."""
    criterion, *mods = arm.split("+")
    extra: dict[str, Any] = {}
    for mod in mods:
        if mod.startswith("kd"):
            extra["recovery"] = {"distill_steps": int(mod[2:])}
        elif mod.startswith("rep"):
            steps, *opts = mod[3:].split(":")
            sub: dict[str, Any] = {"steps": int(steps)}
            for opt in opts:
                key, _, value = opt.partition("=")
                sub[REPAIR_KEYS[key]] = float(value) if key == "ridge" else value
            extra["repair"] = sub
        elif mod.startswith("st"):  # progressive removal: S stages, I steps apart
            stages, _, interval = mod[2:].partition("x")
            extra.update(stages=int(stages), stage_interval=int(interval))
        else:
            raise SystemExit(f"fullrun.py: unknown arm modifier {mod!r} in {arm!r}")
    return criterion, extra


def prune_step(args: argparse.Namespace, arm: str) -> int | None:
    """The optimizer step after which an arm's model is pruned (None: dense)."""
    if arm == "dense":
        return None
    extra = parse_arm(arm.split("~")[0])[1]
    last = (extra.get("stages", 1) - 1) * extra.get("stage_interval", 0)
    return args.window + extra.get("repair", {}).get("steps", 0) + last


def jobs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every run of the grid, in the order they are run (seed-major: first seeds of all arms first)."""
    seeds = [int(s) for s in args.seeds.split(",")]
    repeat = set(args.repeat.split(","))
    out = []
    for i, seed in enumerate(seeds):
        for task in args.tasks.split(","):
            for arm in args.arms.split(","):
                if i > 0 and arm not in repeat:
                    continue
                name = group_name(args, task)
                out.append({"task": task, "arm": arm, "seed": seed, "group": name, "id": f"{arm}#s{seed}"})
    return out


def _block(args: argparse.Namespace, arm: str, removed: list[int] | None = None) -> dict[str, Any]:
    """The gradpruner block of an arm: ``<criterion>``, ``<criterion>+kd<K>`` (recovery by
    self-distillation for K steps after the prune), or a plan given by hand (``removed``)."""
    block: dict[str, Any] = {"window_steps": args.window, "progress_bar": False, "plot": False}
    criterion, extra = parse_arm(arm)
    block.update(extra)
    if removed is not None:
        block["layers_to_remove"] = removed
    else:
        block.update(prune_ratio=args.budget, criterion=criterion)
    return block


def _train_cmd(args: argparse.Namespace, job: dict[str, Any], folder: Path, steps: int) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "launch" / "train.py"),
        "--task", str(TASKS[job["task"]]),
        "--max_steps", str(steps),
        "--batch_size", str(args.batch),
        "--lr", str(args.lr),
        "--warmup_steps", str(max(1, round(0.1 * steps))),
        "--seed", str(job["seed"]),
        "--max_test", str(args.max_test),
        "--eval_size", "-1",
        "--threads", "1",
        "--no_save",
        "--output_dir", str(folder),
    ]  # fmt: skip


def code_version() -> str:
    """The commit of this checkout, ``+dirty`` when its package or launcher differs from it."""
    git = ["git", "-C", str(ROOT)]
    rev = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "gradpruner_ds", "launch"], capture_output=True, text=True)
    return rev + ("+dirty" if dirty.stdout.strip() else "")


def run_job(args: argparse.Namespace, job: dict[str, Any]) -> str:
    """Run one grid cell (resumable: skipped when its summary is in ``--out``)."""
    final = Path(args.out) / job["group"] / job["id"]
    if (final / "summary.json").exists():
        return f"{job['group']}/{job['id']}: done already"
    if job["arm"] == "dense":  # the dense run does not depend on the budget: one per task, seed and length
        def length(group: str) -> str:  # "" for the standard protocol, else "e<epochs>s<steps>"
            return group[len(f"{job['task']}_b") :].partition("_")[2]

        other = [
            p
            for p in sorted(Path(args.out).glob(f"{job['task']}_b*/{job['id']}/summary.json"))
            if length(p.parent.parent.name) == length(job["group"])
        ]
        if other:
            return f"{job['group']}/{job['id']}: done already (the budget's dense run is {other[0].parent})"
    folder = Path(args.scratch) / job["group"] / job["id"]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    steps = run_steps(job["task"], args.max_steps, args.batch, args.epochs)
    # this checkout's gradpruner_ds, not whatever the venv's editable install points at (a grid run from a
    # worktree must run the worktree's code, and record which)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path}
    t0 = time.time()
    cmd = _train_cmd(args, job, folder, steps)
    cmd += ["--eval_at", ",".join(str(s) for s in eval_points(args.window, steps, prune_step(args, job["arm"])))]
    if job["seed"] != 0 or job["arm"] != "dense":
        cmd.append("--skip_eval_before")  # the dense model before training: scored once per task
    arm = job["arm"]
    if arm != "dense":
        removed = None
        if arm.endswith("~lora"):  # the paper's LoRA probe over the same window batches and lrs
            probe = folder / "probe"
            pcmd = _train_cmd(args, job, probe, args.window + 1)
            pcmd[pcmd.index("--warmup_steps") + 1] = str(max(1, round(0.1 * steps)))
            block = {**_block(args, arm.split("~")[0]), "mode": "lora"}
            (folder / "probe.json").write_text(json.dumps(block))
            pcmd += ["--lora", "8", "--eval_size", "0", "--skip_eval_before", "--gradpruner",
                     "--gradpruner_config", str(folder / "probe.json")]  # fmt: skip
            with open(folder / "probe.log", "w") as log:
                subprocess.run(pcmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
            removed = json.loads((probe / "gradpruner_plan.json").read_text())["dropped"]
        (folder / "gradpruner.json").write_text(json.dumps(_block(args, arm, removed)))
        cmd += ["--gradpruner", "--gradpruner_config", str(folder / "gradpruner.json")]
    with open(folder / "train.log", "w") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        return f"{job['group']}/{job['id']}: FAILED (exit {proc.returncode}), see {folder / 'train.log'}"
    summary = json.loads((folder / "summary.json").read_text())
    summary.update(arm=arm, seed=job["seed"], wall_s=time.time() - t0, window=args.window, code=code_version())
    if (at := prune_step(args, arm)) is not None:
        summary["prune_step"] = at  # losses[at]: the first step of the pruned model, before its update
    if (folder / "gradpruner_report.json").exists():
        report = json.loads((folder / "gradpruner_report.json").read_text())
        summary["scores"] = [row["score"] for row in report["layers"]]
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
    for extra in ("gradpruner.json", "probe.json"):
        if (folder / extra).exists():
            shutil.copy(folder / extra, tmp / extra)
    os.replace(tmp, final)
    acc = summary.get("acc_after")
    return f"{job['group']}/{job['id']}: acc {acc:.3f} in {summary['wall_s']:.0f}s"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.summary:
        from benchmarks.quality.summarize_fullrun import print_tables

        print_tables(Path(args.out))
        return
    todo = jobs(args)
    if args.list:
        for j in todo:
            pattern = f"{j['task']}_b*/{j['id']}" if j["arm"] == "dense" else f"{j['group']}/{j['id']}"
            done = any(Path(args.out).glob(pattern + "/summary.json"))
            print(f"{'done' if done else 'todo'}  {j['group']}/{j['id']}")
        return
    with ThreadPoolExecutor(args.workers) as pool:
        for line in pool.map(lambda j: run_job(args, j), todo):
            print(time.strftime("%H:%M:%S"), line, flush=True)


if __name__ == "__main__":
    main()
