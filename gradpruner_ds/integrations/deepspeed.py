"""DeepSpeed's entry point: a GradPruner on a DeepSpeed engine (:func:`for_deepspeed`, what ``deepspeed train.py
--gradpruner`` with a ``"gradpruner"`` block in the DeepSpeed config uses). Checkpoints are the engine-neutral
:func:`gradpruner_ds.save_checkpoint` / :func:`gradpruner_ds.load_checkpoint` (re-exported here). The engine's
internals stay in ``gradpruner_ds/backends/``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gradpruner_ds.backends import backend_for
from gradpruner_ds.checkpoint import load_checkpoint, save_checkpoint
from gradpruner_ds.config import load_config
from gradpruner_ds.consensus import GRADPRUNER_OFF
from gradpruner_ds.pruner import DisabledPruner, GradPruner

__all__ = ["for_deepspeed", "load_checkpoint", "save_checkpoint"]

_FROM_BLOCK: Any = object()


def for_deepspeed(
    engine: Any,
    ds_config: Mapping[str, Any],
    *,
    total_steps: int | None = None,
    config: Any = _FROM_BLOCK,
) -> Any:
    """A ``GradPruner`` on a DeepSpeed engine. ``config``: the ``GradPrunerConfig`` of
    ``gradpruner_ds.resolve_config(args, ds_config)`` -- None when ``--gradpruner`` is not given, and then a
    :class:`~gradpruner_ds.pruner.DisabledPruner` whose calls do nothing is returned; left out, the
    ``"gradpruner"`` block of ``ds_config`` is used. Use it in the training loop as::

        loss = engine(**batch).loss
        engine.backward(loss)
        pruner.observe()                      # a no-op except at accumulation boundaries in the window
        engine.step()
        engine, lr_scheduler = pruner.maybe_prune(engine, lr_scheduler)   # new engine after the prune
    """
    if config is None:  # GradPruner off here: the other ranks must be off too (the same settings check)
        backend = backend_for(engine, ds_config=ds_config)
        if backend.world_size > 1:
            backend.check_settings(dict(GRADPRUNER_OFF), 300.0)
        return DisabledPruner()
    cfg = load_config(ds_config) if config is _FROM_BLOCK else config
    assert cfg is not None  # load_config(required=True) raises instead of returning None
    return GradPruner(
        engine.module, cfg, total_steps=total_steps, backend=backend_for(engine, ds_config=ds_config)
    )
