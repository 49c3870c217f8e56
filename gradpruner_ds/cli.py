"""``gradpruner-ds`` command line: ``gradpruner-ds plan`` (cluster-scale dry run) and ``config``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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
    args = ap.parse_args(argv)
    if args.cmd == "config":
        from gradpruner_ds.config import config_reference_markdown

        print(config_reference_markdown(), end="")
        return 0
    from gradpruner_ds.config import GradPrunerConfig
    from gradpruner_ds.scale import KNOWN, dry_run, format_dry_run

    if args.model_config in KNOWN:
        model_cfg = KNOWN[args.model_config]
    else:
        model_cfg = json.loads(Path(args.model_config).read_text())
    block_src = Path(args.gradpruner)
    block = json.loads(block_src.read_text() if block_src.exists() else args.gradpruner)
    d = dry_run(
        model_cfg,
        GradPrunerConfig.from_dict(block),
        world_size=args.world_size,
        mode=args.mode,
        lora_rank=args.lora_rank,
        name=args.model_config,
    )
    print(json.dumps(d.as_dict(), indent=2) if args.json else format_dry_run(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
