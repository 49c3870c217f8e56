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
    p.add_argument("--model-config", required=True, help="llama-3.1-70b, llama-3.1-8b, or a config.json path")
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument(
        "--zero-stage", type=int, default=3, choices=(3,), help="the dry run models ZeRO-3 / FSDP2"
    )
    p.add_argument(
        "--gradpruner",
        default='{"window_steps": 40, "prune_ratio": 0.4, "num_merge": 3}',
        help="the gradpruner block (JSON text or a file)",
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
    from gradpruner_ds.scale import KNOWN, dry_run

    if args.world_size < 1:
        raise user_error(
            "--world-size must be at least 1", args.world_size, "pass the number of ranks, e.g. 64"
        )
    if args.lora_rank < 1:
        raise user_error("--lora-rank must be at least 1", args.lora_rank, "pass the LoRA rank, e.g. 8")
    if args.model_config in KNOWN:
        model_cfg = KNOWN[args.model_config]
    else:
        if not Path(args.model_config).is_file():
            raise user_error(
                f"--model-config must be one of {sorted(KNOWN)} or a config.json file",
                args.model_config,
                "pass a known name or a path",
            )
        model_cfg = read_json_file(args.model_config, "the --model-config")
        if not isinstance(model_cfg, dict) or "model_type" not in model_cfg:
            raise user_error(
                "the --model-config file must be an HF config.json (with model_type)",
                args.model_config,
                "fix it",
            )
    block_src = Path(args.gradpruner)
    if block_src.is_file():
        block = read_json_file(block_src, "the --gradpruner")
    else:
        block = loads_json(args.gradpruner, "the --gradpruner block", "(command line)")
    return dry_run(
        model_cfg,
        GradPrunerConfig.from_dict(block),
        world_size=args.world_size,
        mode=args.mode,
        lora_rank=args.lora_rank,
        name=args.model_config,
    )


if __name__ == "__main__":
    sys.exit(main())
