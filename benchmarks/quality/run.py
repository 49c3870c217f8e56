"""Quality harness: accuracy after pruning with each layer criterion at the same budget and re-tuning.

For the real SmolLM2-135M-Instruct and any task file (BIG-bench JSON or PIQA, via ``load_task``):

1. deterministic split (``split_task(seed=0)``, test capped at ``--test``);
2. the observation WINDOW: ``--window`` full fine-tuning steps of the dense model (AdamW, constant lr,
   fixed data order), observed by one probe GradPruner per statistic (IGIA with full gradients, layer
   gates, hidden states for span 1 and for each budget's block). The window is shared by every arm, so
   every arm starts pruning from the identical model, optimizer state and statistics; the probes'
   ``state_dict()`` statistics are cached in ``<out>/window.pt``;
3. per ARM: a copy of the window state -> a GradPruner with the arm's criterion / budget / merge
   settings -> ``load_state_dict`` of its own state with the window's statistics and step counts ->
   ``maybe_prune()`` (plan, merge, surgery, optimizer carried)
   -> ``--retune`` more steps on the same batches for every arm -> test accuracy (log-likelihood,
   ``evaluate_choices``). The dense arm does the same re-tuning without pruning;
4. one JSON per arm in ``<out>/arms/`` (arms already there are skipped: the run is resumable), then
   ``results.md``, ``results.json`` and ``results.png`` over all arms found.

Example::

    python -m benchmarks.quality.run --task ../shared/data/bigbench/intent_recognition.json \\
        --out benchmarks/quality/out/intent --budgets 0.3 --window 4 --retune 8 --test 60

Arm names: ``dense``, ``<criterion>@<budget>`` (e.g. ``igia_sum@0.3``), ``random@0.3#s1`` (seed 1),
``<criterion>@<budget>+m<k>`` (k of the removed layers merged), ``...+m<k>-laco`` (LaCo-style unmasked
difference merge, ``merge_rule: laco``), ``...#d<N>`` (re-tuning data order N; 0 = the shared fixed
order, others a reshuffle seeded with N; ``dense#d<N>`` too), ``...+m<k>-nosign`` (merge without the
sign rule), ``...~lora`` (IGIA from the paper's LoRA probe: a peft LoRA r=8 copy trained for the same
window on the same batches; its plan is applied to the full fine-tune).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import torch

from gradpruner_ds.arch import decoder_layers, get_arch, layer_linears
from gradpruner_ds.config import GradPrunerConfig
from gradpruner_ds.core.criteria import CRITERIA, ScoreContext, layer_scores
from gradpruner_ds.core.criteria.igia import partial_table
from gradpruner_ds.core.igia import IGIAAccumulator
from gradpruner_ds.core.plan import select_layers
from gradpruner_ds.peft_support import linear_weight
from gradpruner_ds.pruner import GradPruner
from launch.models import load_smollm2
from launch.tasks import build_train_dataset, collate, evaluate_choices, load_task, split_task

ROOT = Path(__file__).resolve().parents[2]

ARM_RE = re.compile(
    r"^(?P<crit>[a-z_]+)@(?P<budget>[0-9.]+)(?:\+m(?P<merge>\d+))?(?P<rule>-nosign|-laco)?(?P<lora>~lora)?"
    r"(?:#s(?P<seed>\d+))?(?:#d(?P<dseed>\d+))?$"
)
DENSE_RE = re.compile(r"^dense(?:#d(?P<dseed>\d+))?$")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", required=True, help="BIG-bench .json task file or PIQA folder / valid.jsonl")
    ap.add_argument("--out", required=True, help="output folder (arms/, window.pt, results.*)")
    ap.add_argument("--arms", default="", help="comma-separated arm names (default: the standard set)")
    ap.add_argument("--budgets", default="0.3", help="comma-separated fractions of decoder layers removed")
    ap.add_argument("--window", type=int, default=4, help="observed optimizer steps (shared by all arms)")
    ap.add_argument("--retune", type=int, default=8, help="optimizer steps after the prune (every arm)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--test", type=int, default=60, help="test items (cap)")
    ap.add_argument("--random-seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lora-lr", type=float, default=1e-4, help="lr of the LoRA probe (~lora arms)")
    ap.add_argument("--cache", default="", help="folder for window.pt (~2.5 GB; default: --out)")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the table/plot from arms/")
    return ap.parse_args(argv)


def default_arms(budgets: list[float], seeds: list[int]) -> list[str]:
    arms = ["dense"]
    for b in budgets:
        for crit in (
            "igia_sum",
            "igia_norm_sum",
            "igia_relative",
            "obd",
            "obd_residual",
            "shortgpt_bi",
            "angular",
            "gate_fisher",
            "reverse",
        ):
            arms.append(f"{crit}@{b}")
        arms += [f"random@{b}#s{s}" for s in seeds]
    return arms


# ---- training ----------------------------------------------------------------------------------------
def make_batches(
    tok: Any, split: Any, n: int, batch: int, max_length: int, seed: int = 1234
) -> list[dict[str, torch.Tensor]]:
    """``n`` training batches in a fixed order (seeded shuffle of the train split, cycled)."""
    ds = build_train_dataset(tok, split.train, max_length=max_length)
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < n * batch:
        order += torch.randperm(len(ds), generator=g).tolist()
    return [collate([ds[i] for i in order[k * batch : (k + 1) * batch]], tok.pad_token_id) for k in range(n)]


def step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor], pruners=()
) -> float:
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    for pruner in pruners:
        pruner.observe()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def new_opt(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)


# ---- window -------------------------------------------------------------------------------------------
def stat_key(name: str, state: dict[str, Any]) -> str:
    """Which window statistic an arm's statistic is: its name, and its block spans for hidden states."""
    spans = state.get("spans")
    return name if spans is None else f"{name}@{','.join(str(int(s)) for s in spans)}"


def probe_blocks(args: argparse.Namespace, budgets: list[float]) -> list[dict[str, Any]]:
    """GradPruner blocks whose statistics together cover every arm: IGIA (full gradients), the layer gates,
    the hidden states of single layers and of each budget's block."""
    base = {"window_steps": args.window, "progress_bar": False, "observe_only": True}
    blocks = [
        {**base, "num_drop": 1, "criterion": "igia_sum"},
        {**base, "num_drop": 1, "criterion": "gate_fisher"},
        {**base, "num_drop": 1, "criterion": "shortgpt_bi"},
    ]
    blocks += [{**base, "prune_ratio": b, "criterion": "angular"} for b in budgets]
    return blocks


def run_window(args: argparse.Namespace, model: Any, batches: list, budgets: list[float]) -> dict[str, Any]:
    """Train the window, observed by the probe pruners; return {model, opt, statistics, losses, diag}
    (``statistics``: every probe's ``state_dict()`` statistics, by :func:`stat_key`)."""
    model.train()
    opt = new_opt(model, args.lr)
    total = args.window + args.retune
    probes = {
        b["criterion"] + str(b.get("prune_ratio", "")): GradPruner(
            model, GradPrunerConfig.from_dict(b), total_steps=total
        )
        for b in probe_blocks(args, budgets)
    }
    losses = []
    for i in range(args.window):
        t0 = time.perf_counter()
        losses.append(step(model, opt, batches[i], probes.values()))
        print(f"  window step {i}: loss {losses[-1]:.4f} ({time.perf_counter() - t0:.1f}s)", flush=True)
    statistics: dict[str, Any] = {}
    for probe in probes.values():
        for name, state in probe.state_dict()["statistics"].items():
            if state is not None and name != "recovery":
                statistics.setdefault(stat_key(name, state), state)
    diag = diagnose(model, statistics["igia"], batches[args.window % len(batches)])
    for crit in ("shortgpt_bi", "gate_fisher"):
        diag[crit] = probes[crit].compute_scores()
    for probe in probes.values():
        probe.maybe_prune()  # observe_only: plans (unused), removes the hooks, changes nothing
    return {
        "model": model.state_dict(),
        "opt": opt.state_dict(),
        "statistics": statistics,
        "losses": losses,
        "diag": diag,
    }


def diagnose(model: Any, igia_state: dict[str, Any], batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Per-layer numbers behind the raw IGIA sum: gradient vs weight vs residual-stream scale (from the
    window's IGIA state and the model's weights)."""
    acc = IGIAAccumulator(keys=[(int(k[0]), str(k[1])) for k in igia_state["keys"]], mode=igia_state["mode"])
    acc.load_state_dict(igia_state)
    keys = acc.keys
    spec = get_arch(model)
    layers = decoder_layers(model)
    weights = {(i, n): linear_weight(layer_linears(layers[i], spec)[n]).detach() for i, n in keys}
    table = partial_table(acc, "obd", weights)
    wsq = torch.zeros(len(keys), dtype=torch.float64)
    for i, k in enumerate(keys):
        wsq[i] = weights[k].double().square().sum()
    table[-1] = wsq
    L = len(layers)
    ctx = ScoreContext(L, spec.residual_writers)
    out: dict[str, Any] = {}
    for crit in ("igia_sum", "igia_norm_sum", "igia_relative", "obd", "obd_residual"):
        out[crit] = layer_scores(table, keys, crit, ctx)
    steps = table[:-2]
    per_mat = steps.sum(0) / steps.shape[0]
    names = list(spec.linear_names)
    out["igia_by_sublayer"] = {n: [float(per_mat[i]) for i, k in enumerate(keys) if k[1] == n] for n in names}
    out["weight_sq_by_layer"] = [
        float(sum(wsq[i] for i, k in enumerate(keys) if k[0] == j)) for j in range(L)
    ]
    out["igia_step0_by_layer"] = [
        float(sum(steps[0, i] for i, k in enumerate(keys) if k[0] == j)) for j in range(L)
    ]
    # residual stream: |h_l| and |dL/dh_l| on one batch (h_l = input of layer l)
    model.train()
    res = model(**batch, output_hidden_states=True)
    hs = res.hidden_states[:L]
    for h in hs:
        h.retain_grad()
    res.loss.backward()
    mask = batch["attention_mask"].bool()
    out["hidden_norm"] = [float(h.detach()[mask].norm(dim=-1).mean()) for h in hs]
    out["hidden_grad_norm"] = [float(h.grad[mask].norm(dim=-1).mean()) for h in hs]
    model.zero_grad(set_to_none=True)
    return out


def lora_probe_igia(args: argparse.Namespace, base: Any, batches: list) -> dict[str, Any]:
    """The paper's LoRA probe: peft LoRA (r 8, alpha 32, all 7 linears) trained for the window on the
    same batches (lr ``--lora-lr``); returns the IGIA state (simulated gradients grad(B) @ grad(A))."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(
            r=8,
            lora_alpha=32,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    model.train()
    cfg = GradPrunerConfig.from_dict(
        {
            "window_steps": args.window,
            "num_drop": 1,
            "criterion": "igia_sum",
            "mode": "lora",
            "progress_bar": False,
        }
    )
    pruner = GradPruner(model, cfg, total_steps=args.window + args.retune)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lora_lr)
    for i in range(args.window):
        step(model, opt, batches[i], [pruner])
    return pruner.state_dict()["statistics"]["igia"]


def lora_probe_plan(win: dict[str, Any], crit: str, budget: float, num_layers: int, spec: Any) -> tuple:
    """(removed layers, scores) of ``crit`` from the LoRA probe's IGIA at ``budget``: the plan the arm's full
    fine-tune is given through ``layers_to_remove``."""
    state = win["lora_igia"]
    acc = IGIAAccumulator(keys=[(int(k[0]), str(k[1])) for k in state["keys"]], mode="lora")
    acc.load_state_dict(state)
    scores = layer_scores(
        partial_table(acc, crit), acc.keys, crit, ScoreContext(num_layers, spec.residual_writers)
    )
    num_drop, _ = GradPrunerConfig.from_dict({"prune_ratio": budget}).resolve_budget(num_layers)
    dropped, _ = select_layers(scores, num_drop, 0, GradPrunerConfig().protect_layers)
    return dropped, scores


# ---- arms ---------------------------------------------------------------------------------------------
def window_fingerprint(win: dict[str, Any]) -> float:
    """A checksum of the shared window state (model, optimizer, statistics) that arms must not change."""
    total = 0.0

    def visit(x: Any) -> None:
        nonlocal total
        if torch.is_tensor(x):
            total += float(x.double().abs().sum()) if x.is_floating_point() else float(x.sum())
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)

    visit({k: v for k, v in win.items() if k != "meta"})
    return total


def data_order(arm: str) -> int:
    """The re-tuning data order of an arm (``#d<N>``; 0 = the shared fixed order)."""
    m = DENSE_RE.match(arm) or ARM_RE.match(arm)
    if m is None:
        raise SystemExit(f"bad arm name {arm!r}")
    return int(m["dseed"] or 0)


def plan_key(removed: list[int], n_merge: int, order: int) -> tuple | None:
    """What fixes a drop-only arm's result given the shared window: removed layers and data order."""
    return None if n_merge else (tuple(sorted(removed)), order)


def window_pruner(
    model: Any, block: dict[str, Any], args: argparse.Namespace, win: dict[str, Any], seed: int = 0
) -> GradPruner:
    """A GradPruner with ``block``'s settings on ``model`` (the window's model) that has observed the shared
    window: its own ``state_dict()`` with the window's step counts and statistics, loaded back."""
    pruner = GradPruner(
        model, GradPrunerConfig.from_dict(block), total_steps=args.window + args.retune, seed=seed
    )
    state = pruner.state_dict()
    state.update(steps_seen=args.window, observed_steps=args.window, skipped_steps=0)
    for name, own in state["statistics"].items():
        if own is not None and name != "recovery":
            state["statistics"][name] = copy.deepcopy(win["statistics"][stat_key(name, own)])
    pruner.load_state_dict(state)
    return pruner


def run_arm(
    arm: str,
    args: argparse.Namespace,
    win: dict[str, Any],
    base: Any,
    tok: Any,
    retune: list,
    test: list,
    reuse: dict[tuple, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One arm: prune the shared window state by the arm's settings, re-tune on ``retune``, evaluate."""
    t0 = time.perf_counter()
    model = copy.deepcopy(base)
    model.load_state_dict(win["model"])
    model.train()
    opt = new_opt(model, args.lr)
    # a deep copy: Optimizer.load_state_dict keeps the given state tensors (same dtype and device), so
    # this arm's Adam steps would otherwise update the shared window state that later arms start from
    opt.load_state_dict(copy.deepcopy(win["opt"]))
    rec: dict[str, Any] = {"arm": arm, "data_order": data_order(arm)}
    if DENSE_RE.match(arm) is None:
        m = ARM_RE.match(arm)
        if m is None:
            raise SystemExit(f"bad arm name {arm!r}")
        crit, budget = m["crit"], float(m["budget"])
        if crit not in CRITERIA:
            raise SystemExit(f"unknown criterion {crit!r}; registered: {sorted(CRITERIA)}")
        n_merge = int(m["merge"] or 0)
        block = {
            "window_steps": args.window,
            "prune_ratio": budget,
            "num_merge": n_merge,
            "criterion": crit,
            "sign_consistent": m["rule"] != "-nosign",
            "merge_rule": "laco" if m["rule"] == "-laco" else "gradpruner",
            "progress_bar": False,
        }
        lora_scores = None
        if m["lora"]:  # the plan from the LoRA probe's simulated gradients, given to the full fine-tune
            if n_merge:
                raise SystemExit(f"{arm}: LoRA-probe arms with a merge are not supported")
            removed, lora_scores = lora_probe_plan(
                win, crit, budget, len(decoder_layers(model)), get_arch(model)
            )
            block = {"window_steps": args.window, "layers_to_remove": removed, "progress_bar": False}
        pruner = window_pruner(model, block, args, win, seed=int(m["seed"] or 0))
        opt, _ = pruner.maybe_prune(opt)
        plan = pruner.plan
        assert plan is not None
        key = plan_key(list(plan.removed), n_merge, data_order(arm))
        if key is not None and reuse is not None and key in reuse:
            # the same layers dropped (nothing merged) and the same re-tuning batches as an arm already
            # run: the re-tuned model is bit-identical (deterministic fp32, one thread), so take its
            # re-tuning losses and accuracy instead of recomputing them; the record says so
            src = reuse[key]
            rec.update(accuracy=src["accuracy"], retune_losses=src["retune_losses"], reused_from=src["arm"])
        rec.update(
            criterion=crit,
            budget=budget,
            num_merge=n_merge,
            sign_consistent=m["rule"] != "-nosign",
            merge_rule="laco" if m["rule"] == "-laco" else "gradpruner",
            seed=int(m["seed"] or 0),
            removed=list(plan.removed),
            dropped=list(plan.dropped),
            merged=list(plan.merged),
            scores=list(plan.scores) if lora_scores is None else list(lora_scores),
            kept_layers=len(plan.kept),
        )
    t_prune = time.perf_counter() - t0
    if "reused_from" in rec:
        rec["seconds"] = {"prune": t_prune, "retune": 0.0, "total": t_prune}
        return rec
    losses = []
    for i in range(args.retune):
        losses.append(step(model, opt, retune[i]))
    t_train = time.perf_counter() - t0 - t_prune
    acc = evaluate_choices(model, tok, test, batch_size=32, max_length=256)
    rec.update(
        accuracy=acc,
        retune_losses=losses,
        seconds={"prune": t_prune, "retune": t_train, "total": time.perf_counter() - t0},
    )
    return rec


# ---- report -------------------------------------------------------------------------------------------
def build_report(out: Path) -> None:
    recs = [json.loads(p.read_text()) for p in sorted((out / "arms").glob("*.json"))]
    if not recs:
        return
    dense_accs = [r["accuracy"] for r in recs if DENSE_RE.match(r["arm"])]
    dense = sum(dense_accs) / len(dense_accs) if dense_accs else None  # over its data orders
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in recs:
        key = r["arm"].split("#")[0]
        groups.setdefault(key, []).append(r)
    rows = []
    for key, rs in groups.items():
        accs = torch.tensor([r["accuracy"] for r in rs], dtype=torch.float64)
        rows.append(
            {
                "arm": key,
                "n": len(rs),
                "mean": float(accs.mean()),
                "std": float(accs.std()) if len(rs) > 1 else 0.0,
                "min": float(accs.min()),
                "max": float(accs.max()),
                "removed": [r.get("removed") for r in rs],
                "retune_loss_last3": float(
                    torch.tensor([sum(r["retune_losses"][-3:]) / 3 for r in rs]).mean()
                ),
                "delta_vs_dense": float(accs.mean()) - dense if dense is not None else None,
            }
        )
    rows.sort(key=lambda r: -r["mean"])
    (out / "results.json").write_text(json.dumps({"rows": rows, "arms": recs}, indent=1))
    lines = [
        "| arm | n | accuracy mean | spread (std / min-max) | vs dense | re-tune loss (last 3 steps) | removed layers |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        spread = f"{r['std']:.3f} / {r['min']:.3f}-{r['max']:.3f}" if r["n"] > 1 else "-"
        delta = f"{100 * r['delta_vs_dense']:+.1f} pt" if r["delta_vs_dense"] is not None else ""
        removed = "; ".join(str(x) for x in r["removed"]) if r["arm"] != "dense" else "-"
        lines.append(
            f"| {r['arm']} | {r['n']} | {r['mean']:.3f} | {spread} | {delta} | {r['retune_loss_last3']:.2f} "
            f"| {removed} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.2))
        names = [r["arm"] for r in rows][::-1]
        means = [r["mean"] for r in rows][::-1]
        errs = [r["std"] for r in rows][::-1]
        ax.barh(names, means, xerr=errs, color="tab:blue")
        if dense is not None:
            ax.axvline(dense, color="k", ls="--", label="dense")
            ax.legend()
        ax.set_xlabel("test accuracy")
        ax.set_title(out.name)
        fig.tight_layout()
        fig.savefig(out / "results.png", dpi=110)
    except ImportError:
        print("matplotlib missing: no plot")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    (out / "arms").mkdir(parents=True, exist_ok=True)
    if args.report_only:
        build_report(out)
        return
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t_all = time.perf_counter()
    budgets = [float(b) for b in args.budgets.split(",")]
    seeds = [int(s) for s in args.random_seeds.split(",")]
    arms = [a for a in args.arms.split(",") if a] or default_arms(budgets, seeds)
    todo = [a for a in arms if not (out / "arms" / f"{a}.json").exists()]
    print(f"arms: {len(arms)} ({len(arms) - len(todo)} already done)", flush=True)
    if not todo:
        build_report(out)
        return
    base, tok = load_smollm2()
    split = split_task(load_task(args.task), seed=0, max_test=args.test)
    batches = make_batches(tok, split, args.window + args.retune, args.batch, args.max_length)
    L = base.config.num_hidden_layers
    wpath = (Path(args.cache) if args.cache else out) / "window.pt"
    wpath.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "window": args.window,
        "batch": args.batch,
        "lr": args.lr,
        "max_length": args.max_length,
        "budgets": budgets,
        "task": str(args.task),
        "statistics": "probes-v1",
    }
    win = None
    if wpath.exists():
        win = torch.load(wpath, weights_only=True)  # tensors, dicts and numbers only
        if win.get("meta") != meta:
            print("window cache was made with other settings: recomputing", flush=True)
            win = None
    if win is None:
        t0 = time.perf_counter()
        model = copy.deepcopy(base)
        win = run_window(args, model, batches, budgets)
        win["meta"] = meta
        win["seconds"] = time.perf_counter() - t0
        del model
        torch.save(win, wpath)
        (out / "diagnosis.json").write_text(json.dumps({"losses": win["losses"], **win["diag"]}, indent=1))
        print(f"window: {win['seconds']:.1f}s", flush=True)
    if any("~lora" in a for a in todo) and "lora_igia" not in win:
        t0 = time.perf_counter()
        win["lora_igia"] = lora_probe_igia(args, base, batches)
        print(f"LoRA probe window: {time.perf_counter() - t0:.1f}s", flush=True)
        torch.save(win, wpath)
    (out / "setup.json").write_text(
        json.dumps(
            {
                **meta,
                "retune": args.retune,
                "test": len(split.test),
                "train": len(split.train),
                "num_layers": L,
            },
            indent=1,
        )
    )
    retune_sets: dict[int, list] = {0: batches[args.window :]}
    shared_before = window_fingerprint(win)
    reuse: dict[tuple, dict[str, Any]] = {}  # drop-only plans already re-tuned in this folder

    def remember(rec: dict[str, Any]) -> None:
        if "removed" in rec and "reused_from" not in rec:
            key = plan_key(rec["removed"], rec.get("num_merge", 0), rec.get("data_order", 0))
            if key is not None:
                reuse.setdefault(key, rec)

    for p in sorted((out / "arms").glob("*.json")):
        remember(json.loads(p.read_text()))
    for arm in todo:
        d = data_order(arm)
        if d not in retune_sets:  # another order of the train split for the re-tuning steps
            retune_sets[d] = make_batches(
                tok, split, args.window + args.retune, args.batch, args.max_length, seed=1234 + d
            )[args.window :]
        rec = run_arm(arm, args, win, base, tok, retune_sets[d], split.test, reuse)
        remember(rec)
        if window_fingerprint(win) != shared_before:  # every arm must start from the same state
            raise SystemExit(f"arm {arm} changed the shared window state: results would depend on arm order")
        (out / "arms" / f"{arm}.json").write_text(json.dumps(rec, indent=1))
        print(
            f"{arm}: acc {rec['accuracy']:.3f} removed {rec.get('removed', '-')} "
            f"({rec['seconds']['total']:.0f}s)",
            flush=True,
        )
    build_report(out)
    print(f"wall time {time.perf_counter() - t_all:.0f}s")


if __name__ == "__main__":
    main()
