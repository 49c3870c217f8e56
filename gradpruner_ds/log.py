"""Rank-aware logging: the library logs through ``get_logger``; by default only rank 0 speaks."""

from __future__ import annotations

import logging
import os

_LOGGER_NAME = "gradpruner_ds"


def current_rank() -> int:
    """This process's global rank (0 when no process group exists)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return int(dist.get_rank())
    except ImportError:  # pragma: no cover - torch always present in practice
        pass
    return int(os.environ.get("RANK", "0"))


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if os.environ.get("GRADPRUNER_LOG_ALL_RANKS") == "1":
            return True
        return current_rank() == 0


def get_logger(name: str = "") -> logging.Logger:
    """A logger under ``gradpruner_ds`` whose records are emitted on rank 0 only."""
    root = logging.getLogger(_LOGGER_NAME)
    if not getattr(root, "_gradpruner_configured", False):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[gradpruner %(levelname)s] %(message)s"))
        handler.addFilter(_RankFilter())
        root.addHandler(handler)
        root.setLevel(os.environ.get("GRADPRUNER_LOG_LEVEL", "INFO"))
        root.propagate = False
        root._gradpruner_configured = True  # type: ignore[attr-defined]
    return root.getChild(name) if name else root
