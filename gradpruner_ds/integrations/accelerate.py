"""GradPruner in a loop driven by Hugging Face ``accelerate`` (``Accelerator.prepare``), the way most HF example
scripts train::

    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    pruner = for_accelerator(accelerator, model, config, total_steps=N)
    for batch in loader:
        out = model(**batch)
        accelerator.backward(pruner.distill(out.loss, out.logits, batch))
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        pruner.observe()
        optimizer.step(); scheduler.step(); optimizer.zero_grad()
        pruner.maybe_prune(optimizer, scheduler)    # the prepared objects stay the ones to use

* **DDP** (several processes, ``prepare`` wraps the model in ``DistributedDataParallel``) and one process: the
  pruner drives the model ``prepare`` returned (``backend_for`` picks the adapter); after the prune that
  object is the new DDP wrapper, and the prepared optimizer's torch optimizer is pruned in place.
* **DeepSpeed plugin**: ``accelerator.backward`` runs the engine's backward AND its step, so the observation
  moves inside it (accelerate's engine wrapper is replaced by one that observes between the two; the loop's
  own ``pruner.observe()`` is then a no-op); after the prune the prepared engine object is rebound to the
  rebuilt engine and the prepared optimizer wrapper to its optimizer, so every prepared object stays valid.
* A job of several processes whose model ``prepare`` did not wrap (e.g. an FSDP config that accelerate does
  not enable on this device) is a ``gradpruner:`` error, not two independent prunes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gradpruner_ds.backends import backend_for, is_deepspeed_engine
from gradpruner_ds.config import GradPrunerConfig
from gradpruner_ds.pruner import Continue, GradPruner

__all__ = ["AcceleratedPruner", "for_accelerator", "observing_engine_wrapper"]


def observing_engine_wrapper(engine: Any, pruner: GradPruner) -> Any:
    """accelerate's ``DeepSpeedEngineWrapper`` with GradPruner's observation between backward and step."""
    from accelerate.utils.deepspeed import DeepSpeedEngineWrapper

    class ObservingEngineWrapper(DeepSpeedEngineWrapper):
        def backward(self, loss: Any, sync_gradients: bool = True, **kwargs: Any) -> None:
            self.engine.set_gradient_accumulation_boundary(is_boundary=sync_gradients)
            self.engine.backward(loss, **kwargs)
            if sync_gradients:
                pruner.observe()  # reduced (ZeRO) gradient shards, before DeepSpeed clips and steps
                self.engine.step()

    return ObservingEngineWrapper(engine)


class AcceleratedPruner:
    """A :class:`GradPruner` on the objects ``Accelerator.prepare`` returned (see the module docstring); every
    other attribute is the pruner's."""

    def __init__(self, accelerator: Any, pruner: GradPruner, engine: Any = None) -> None:
        self.accelerator = accelerator
        self.pruner = pruner
        self.engine = engine  # the prepared DeepSpeed engine, or None

    def observe(self) -> None:
        """After ``accelerator.backward`` (and clipping), before ``optimizer.step()``; under the DeepSpeed plugin
        the observation already ran inside ``accelerator.backward`` and this does nothing."""
        if self.engine is None:
            self.pruner.observe()

    def maybe_prune(self, optimizer: Any = None, lr_scheduler: Any = None) -> Continue:
        """After every optimizer step. Returns the prepared objects, which stay the ones to use after a prune."""
        if self.engine is None:
            return self.pruner.maybe_prune(optimizer, lr_scheduler)
        cutting = self.pruner.cutting
        # the torch scheduler under accelerate's wrapper follows the new optimizer (DeepSpeed steps it only
        # where it did before: accelerate hands it to the engine on some setups, steps it itself on others)
        self.pruner.maybe_prune(self.engine, getattr(lr_scheduler, "scheduler", lr_scheduler))
        if cutting:
            backend: Any = self.pruner.backend
            backend.rebind(self.engine)  # the prepared engine object drives the rebuilt engine
            if optimizer is not None and hasattr(optimizer, "optimizer"):
                optimizer.optimizer = self.engine.optimizer  # accelerate's DeepSpeedOptimizerWrapper
        return Continue(optimizer, lr_scheduler)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pruner, name)


def for_accelerator(
    accelerator: Any,
    model: Any,
    config: GradPrunerConfig | Mapping[str, Any],
    *,
    total_steps: int | None = None,
    ds_config: Mapping[str, Any] | None = None,
) -> AcceleratedPruner:
    """A GradPruner on the ``model`` (or DeepSpeed engine) ``accelerator.prepare`` returned."""
    cfg = config if isinstance(config, GradPrunerConfig) else GradPrunerConfig.from_dict(config)
    if is_deepspeed_engine(model):
        plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
        ds = dict(ds_config or getattr(plugin, "deepspeed_config", None) or {})
        pruner = GradPruner(
            model.module, cfg, total_steps=total_steps, backend=backend_for(model, ds_config=ds)
        )
        accelerator.deepspeed_engine_wrapped = observing_engine_wrapper(model, pruner)
        return AcceleratedPruner(accelerator, pruner, engine=model)
    return AcceleratedPruner(accelerator, GradPruner(model, cfg, total_steps=total_steps))
