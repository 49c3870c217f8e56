"""gradpruner-ds: GradPruner layer pruning inside a running (sharded) training job.

The public names are imported lazily so that ``import gradpruner_ds`` stays cheap (no torch,
transformers or deepspeed import until a name that needs it is used).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "GradPrunerConfig": "gradpruner_ds.config",
    "load_config": "gradpruner_ds.config",
    "PrunePlan": "gradpruner_ds.core.plan",
    "GradPruner": "gradpruner_ds.pruner",
    "Continue": "gradpruner_ds.pruner",
    "remove_layers": "gradpruner_ds.surgery",
    "get_arch": "gradpruner_ds.arch",
    "register_arch": "gradpruner_ds.arch",
    "for_deepspeed": "gradpruner_ds.integrations.deepspeed",
    "backend_for": "gradpruner_ds.backends",
    "DeepSpeedBackend": "gradpruner_ds.backends.deepspeed",
    "FSDP2Backend": "gradpruner_ds.backends.fsdp2",
    "GradPrunerCallback": "gradpruner_ds.integrations.hf_trainer",
    "add_argparse_args": "gradpruner_ds.args",
    "resolve_config": "gradpruner_ds.args",
    "read_block_file": "gradpruner_ds.args",
    "save_checkpoint": "gradpruner_ds.checkpoint",
    "save_pretrained": "gradpruner_ds.export",
    "load_checkpoint": "gradpruner_ds.checkpoint",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gradpruner_ds' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
