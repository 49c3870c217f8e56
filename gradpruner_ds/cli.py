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
        help="a model of configs/ (llama-3.1-70b, llama-3.1-8b, mistral-7b, qwen2.5-7b, qwen3-8b), or the path of "
        "a config.json or of a from_pretrained folder",
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
    sub.add_parser("config", help="print the config reference (markdown)")
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
        from gradpruner_ds.config import config_reference_markdown

        print(config_reference_markdown(), end="")
        return 0
    from gradpruner_ds.errors import GradPrunerError
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
