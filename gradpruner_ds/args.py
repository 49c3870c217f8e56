"""Command-line switches for GradPruner, in the style of ``deepspeed.add_config_arguments``.

Usage in a training script::

    parser = argparse.ArgumentParser()
    deepspeed.add_config_arguments(parser)      # --deepspeed, --deepspeed_config
    add_argparse_args(parser)                   # --gradpruner, --gradpruner_config
    args = parser.parse_args()
    cfg = resolve_config(args, ds_config)       # None when --gradpruner is off; validated before step 0

Precedence: the block in ``--gradpruner_config`` (a JSON file holding just the block) replaces the
``"gradpruner"`` block of the DeepSpeed config. Every user mistake raises a ``gradpruner:`` ValueError.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gradpruner_ds.config import BLOCK_NAME, GradPrunerConfig, load_config
from gradpruner_ds.errors import user_error
from gradpruner_ds.io import read_json_file
from gradpruner_ds.log import get_logger

__all__ = ["add_argparse_args", "resolve_config", "read_block_file"]


def add_argparse_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the "GradPruner" argument group (``--gradpruner``, ``--gradpruner_config``); returns ``parser``."""
    group = parser.add_argument_group("GradPruner", "GradPruner layer pruning during training")
    group.add_argument(
        "--gradpruner",
        default=False,
        action="store_true",
        help="Enable GradPruner: observe gradients for a window of steps, then prune decoder layers.",
    )
    group.add_argument(
        "--gradpruner_config",
        default=None,
        type=str,
        metavar="PATH",
        help="JSON file holding just the gradpruner block; overrides the DeepSpeed config's "
        f'"{BLOCK_NAME}" block.',
    )
    return parser


def read_block_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON file that holds just the gradpruner block.

    A file that wraps the block as ``{"gradpruner": {...}}`` (e.g. a DeepSpeed config passed by
    mistake) is accepted too, when ``gradpruner`` is its only key, or the block is taken from it.
    """
    data = read_json_file(path, "the --gradpruner_config")
    if not isinstance(data, dict):
        raise user_error(
            "the --gradpruner_config file must hold a JSON object (the gradpruner block)",
            type(data).__name__,
            'write {"window_steps": ..., "num_drop": ...}',
        )
    if BLOCK_NAME in data and isinstance(data[BLOCK_NAME], dict):
        return dict(data[BLOCK_NAME])  # a whole DeepSpeed-style config: take its block
    return data


def resolve_config(args: argparse.Namespace, ds_config: Mapping[str, Any] | None) -> GradPrunerConfig | None:
    """The validated GradPruner config for this run, or None when ``--gradpruner`` is off.

    * ``--gradpruner`` off: None, but a DeepSpeed-config key that looks like a misspelled block is still
      an error (a typo must never pass silently) and a present block is validated; a
      ``--gradpruner_config`` without ``--gradpruner`` is an error (it would be ignored).
    * ``--gradpruner`` on: the block of ``--gradpruner_config`` if given, else the DeepSpeed config's
      ``"gradpruner"`` block; neither -> the ``gradpruner:`` "needs a block" error of ``load_config``.
    """
    enabled = bool(getattr(args, "gradpruner", False))
    block_path = getattr(args, "gradpruner_config", None)
    ds = dict(ds_config) if ds_config is not None else {}
    if not enabled:
        if block_path is not None:
            raise user_error(
                "--gradpruner_config is given but --gradpruner is off, so it would be ignored",
                block_path,
                "add --gradpruner (or drop --gradpruner_config)",
            )
        if load_config(ds, required=False) is not None:  # validates a present block, catches a misspelled one
            get_logger("args").warning(
                "the DeepSpeed config has a '%s' block but --gradpruner is not given: GradPruner is off and "
                "nothing will be pruned (add --gradpruner to prune)",
                BLOCK_NAME,
            )
        return None
    if block_path is not None:
        # the overridden block itself is not used; a misspelled one is still an error
        if BLOCK_NAME not in ds:
            load_config(ds, required=False)
        return GradPrunerConfig.from_dict(read_block_file(block_path))
    cfg = load_config(ds, required=True)
    assert cfg is not None
    return cfg
