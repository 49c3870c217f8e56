"""``gradpruner-ds`` command line: ``plan`` (cluster-scale dry run), ``eval`` (lm-evaluation-harness on the
pruned and the dense checkpoint) and ``config``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    from gradpruner_ds import __version__

    ap = argparse.ArgumentParser(prog="gradpruner-ds")
    ap.add_argument("--version", action="version", version=f"gradpruner-ds {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plan", help="dry run: GradPruner's memory and traffic on N ranks (meta device)")
    p.add_argument(
        "--model-config",
        required=True,
        help="a built-in architecture (llama-3.1-70b, llama-3.1-8b, mistral-7b, qwen2.5-7b, qwen3-8b: the families of "
        "the cluster configs in configs/), or the path of a config.json or of a from_pretrained folder",
    )
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument(
        "--zero-stage", type=int, default=3, choices=(3,), help="the dry run models ZeRO-3 / FSDP2"
    )
    p.add_argument(
        "--gradpruner",
        default='{"window_steps": 40, "prune_ratio": 0.4, "num_merge": 3}',
        help="the gradpruner block (JSON text, or a file: the block, or a DeepSpeed config holding one)",
    )
    p.add_argument(
        "--total-steps", type=int, default=None, help="the run's optimizer steps (needed for window_fraction)"
    )
    p.add_argument("--mode", choices=("full", "lora"), default="full")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    c = sub.add_parser(
        "config", help="the config reference (markdown), or the ready configs shipped with the package"
    )
    c.add_argument("name", nargs="?", default=None, help="print this shipped config (e.g. zero3.json)")
    c.add_argument("--list", action="store_true", help="list the shipped configs")
    a = sub.add_parser("apply", help="apply a saved plan to a saved checkpoint: a from_pretrained model")
    a.add_argument("plan", help="a gradpruner_plan.json (an observe_only run's, or any report's plan)")
    a.add_argument("model", help="the dense model's from_pretrained folder")
    a.add_argument("out", help="where the pruned model is written (save_pretrained)")
    a.add_argument(
        "--drop-merged",
        action="store_true",
        help="a plan with merged layers: drop them instead (the merge needs the window's IGIA, not saved)",
    )
    e = sub.add_parser(
        "eval", help="evaluate a pruned checkpoint (and the dense one) with lm-evaluation-harness"
    )
    e.add_argument("--model", required=True, help="the pruned model's from_pretrained folder")
    e.add_argument("--dense", default=None, help="the dense model's folder, evaluated the same way")
    e.add_argument("--tasks", required=True, help="comma-separated lm_eval task names")
    e.add_argument("--include-path", default=None, help="a folder of extra lm_eval task YAMLs")
    e.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--device", default="cpu")
    e.add_argument("--metric", default="acc", help="the metric of the table (acc, acc_norm, ...)")
    e.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.cmd == "config":
        return _config(args)
    from gradpruner_ds.errors import GradPrunerError

    if args.cmd == "apply":
        try:
            return _apply(args)
        except GradPrunerError as exc:
            print(exc, file=sys.stderr)
            return 2
    from gradpruner_ds.scale import format_dry_run

    if args.cmd == "eval":
        from gradpruner_ds.evaluate import run_cli

        try:
            return run_cli(args)
        except GradPrunerError as exc:
            print(exc, file=sys.stderr)
            return 2
    try:
        d = _plan(args)
    except GradPrunerError as exc:  # a user mistake: one line, no traceback
        print(exc, file=sys.stderr)
        return 2
    print(json.dumps(d.as_dict(), indent=2) if args.json else format_dry_run(d))
    return 0


def _plan(args: argparse.Namespace) -> Any:
    """The dry run of ``gradpruner-ds plan``, every argument checked first (``gradpruner:`` errors)."""
    from gradpruner_ds.config import GradPrunerConfig
    from gradpruner_ds.errors import user_error
    from gradpruner_ds.io import loads_json, read_json_file
    from gradpruner_ds.scale import ALIASES, KNOWN, check_model_config, dry_run

    if args.world_size < 1:
        raise user_error(
            "--world-size must be at least 1", args.world_size, "pass the number of ranks, e.g. 64"
        )
    if args.lora_rank < 1:
        raise user_error("--lora-rank must be at least 1", args.lora_rank, "pass the LoRA rank, e.g. 8")
    name = ALIASES.get(args.model_config, args.model_config)
    if name in KNOWN:
        model_cfg = KNOWN[name]
    else:
        path = Path(args.model_config)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise user_error(
                f"--model-config must be one of {sorted(KNOWN)}, a config.json file or a from_pretrained folder",
                args.model_config,
                "pass a known name or a path",
            )
        model_cfg = read_json_file(path, "the --model-config")
    check_model_config(model_cfg, f"the --model-config {args.model_config}")
    if args.total_steps is not None and args.total_steps < 2:
        raise user_error(
            "--total-steps must be at least 2", args.total_steps, "pass the run's optimizer steps"
        )
    block_src = Path(args.gradpruner)
    if block_src.is_file():
        block = read_json_file(block_src, "the --gradpruner")
        if isinstance(block, dict) and "gradpruner" in block:  # a DeepSpeed config (configs/*.json)
            block = block["gradpruner"]
    else:
        block = loads_json(args.gradpruner, "the --gradpruner block", "(command line)")
    return dry_run(
        model_cfg,
        GradPrunerConfig.from_dict(block),
        world_size=args.world_size,
        total_steps=args.total_steps,
        mode=args.mode,
        lora_rank=args.lora_rank,
        name=args.model_config,
    )


if __name__ == "__main__":
    sys.exit(main())


CONFIGS = Path(__file__).resolve().parent / "configs"
"""The ready configs shipped with the package (the repository's ``configs/``)."""


def _config(args: argparse.Namespace) -> int:
    if args.list:
        for path in sorted(CONFIGS.iterdir()):
            if path.suffix in (".json", ".yaml"):
                print(path.name)
        return 0
    if args.name is not None:
        path = CONFIGS / Path(args.name).name
        if not path.is_file():
            names = ", ".join(sorted(p.name for p in CONFIGS.iterdir()))
            print(
                f"gradpruner: no shipped config named {args.name!r} (got {args.name!r}). Fix: one of {names}",
                file=sys.stderr,
            )
            return 2
        print(path.read_text(), end="")
        return 0
    from gradpruner_ds.config import config_reference_markdown

    print(config_reference_markdown(), end="")
    return 0


def _apply(args: argparse.Namespace) -> int:
    """``gradpruner-ds apply PLAN MODEL OUT``: every check before the model is loaded, then the surgery and an
    export that ``from_pretrained`` loads."""
    from gradpruner_ds.core.plan import PrunePlan
    from gradpruner_ds.errors import user_error

    plan_path, model_dir, out = Path(args.plan), Path(args.model), Path(args.out)
    if not plan_path.is_file():
        raise user_error("the plan must be a file", str(plan_path), "pass the gradpruner_plan.json of a run")
    plan = PrunePlan.from_json(plan_path.read_text())
    if not (model_dir / "config.json").is_file():
        raise user_error(
            "the model must be a from_pretrained folder", str(model_dir), "pass the dense model's folder"
        )
    config = json.loads((model_dir / "config.json").read_text())
    layers = config.get("num_hidden_layers", config.get("text_config", {}).get("num_hidden_layers"))
    if config.get("gradpruner") is not None:
        raise user_error(
            "the model must be the dense one: it was already pruned (its config records the prune)",
            str(model_dir),
            "apply the plan to the model the plan was made on",
        )
    if layers != plan.num_layers:
        raise user_error(
            "the plan must be made for a model with this number of decoder layers",
            f"plan for {plan.num_layers} layers, {model_dir} has {layers}",
            "apply the plan to the model the plan was made on",
        )
    if plan.merged and not args.drop_merged:
        raise user_error(
            "a plan with merged layers cannot be applied offline: the merge masks come from the window's IGIA",
            list(plan.merged),
            "pass --drop-merged to drop them instead, or prune in the training job",
        )
    from gradpruner_ds.export import check_target

    check_target(out)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gradpruner_ds.export import save_pretrained
    from gradpruner_ds.surgery import apply_surgery

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    apply_surgery(model, plan)
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError):
        pass
    save_pretrained(model, out, tokenizer)
    print(f"gradpruner-ds apply: removed layers {list(plan.removed)} of {plan.num_layers}; wrote {out}")
    return 0
