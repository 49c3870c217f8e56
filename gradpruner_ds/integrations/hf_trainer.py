"""GradPruner inside a Hugging Face ``Trainer``: one process, DeepSpeed ZeRO-1/2/3, or FSDP2.

    trainer = Trainer(model=model, args=args, train_dataset=ds)
    add_gradpruner(trainer, {"window_fraction": 0.01, "prune_ratio": 0.3})
    trainer.train()

Under a DeepSpeed config the block may also live in the DeepSpeed config (``"gradpruner": {...}``) and
``add_gradpruner(trainer)`` reads it from there. What happens in ``trainer.train()``:

* **Observation.** One process / FSDP2: ``on_pre_optimizer_step`` (after the Trainer's clipping, before
  the optimizer step; FSDP2's reduce-scatter has run, so every rank reads its own shard). DeepSpeed:
  the engine reduces, clips and steps inside ``accelerator.backward``, so the callback replaces
  accelerate's engine wrapper with one that observes between ``engine.backward`` and ``engine.step``
  (ZeRO's reduced shards, as in ``for_deepspeed``).
* **Prune** in ``on_step_end`` once the window is complete, in place: one process / FSDP2 keep the
  Trainer's optimizer and scheduler objects (kept parameters keep their state); DeepSpeed gets a new
  engine over the pruned module with fp32 masters, Adam moments, step, LR schedule and counters carried
  (``DeepSpeedBackend.rebuild``). The Trainer's loop holds the engine in a local variable, so the old
  engine object is turned into the new one (:func:`rebind_engine`): every holder of it (the loop,
  ``trainer.model_wrapped``, ``trainer.deepspeed``, accelerate) trains the pruned model from the next step.
* **Save.** At the end of training the pruned model is written with ``save_pretrained``-compatible files
  to ``<output_dir>/gradpruner_final`` (rank 0 writes; ZeRO-3 is gathered one layer at a time; FSDP2
  gathers a full state dict onto CPU).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from gradpruner_ds.backends.base import Backend
from gradpruner_ds.config import GradPrunerConfig, load_config
from gradpruner_ds.errors import user_error
from gradpruner_ds.log import get_logger
from gradpruner_ds.pruner import GradPruner

log = get_logger("hf_trainer")

__all__ = ["GradPrunerCallback", "add_gradpruner", "rebind_engine"]


def _torch_optimizer(optimizer: Any) -> Any:
    """accelerate wraps the torch optimizer (AcceleratedOptimizer.optimizer)."""
    return getattr(optimizer, "optimizer", optimizer)


def rebind_engine(old: Any, new: Any) -> None:
    """Make the (torn-down) engine object ``old`` the engine ``new``: both share one attribute dict.

    ``DeepSpeedBackend.rebuild`` returns a new ``DeepSpeedEngine``; code that holds the old object (the
    Trainer's inner loop keeps it in a local variable) would otherwise call a shell. After this call
    ``old`` and ``new`` are two names of one engine state: every attribute read or written through
    either (including by the new engine's hooks, which are bound to ``new``) is the same.
    """
    if type(old) is not type(new):
        raise TypeError(f"cannot rebind a {type(old).__name__} to a {type(new).__name__}")
    object.__setattr__(old, "__dict__", new.__dict__)


def _observing_engine_wrapper(engine: Any, pruner: GradPruner) -> Any:
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


class GradPrunerCallback(TrainerCallback):
    """Observe, prune and keep training inside ``Trainer.train()``.

    ``config``: a ``GradPrunerConfig`` or its dict; None under DeepSpeed reads the ``"gradpruner"`` block
    of the Trainer's DeepSpeed config. ``trainer``: required under DeepSpeed (the callback must reach
    the accelerator and the engine); :func:`add_gradpruner` passes it.
    """

    def __init__(
        self,
        config: GradPrunerConfig | Mapping[str, Any] | None = None,
        *,
        trainer: Any = None,
        save_final: bool = True,
    ) -> None:
        if config is None or isinstance(config, GradPrunerConfig):
            self.config = config
        else:
            self.config = GradPrunerConfig.from_dict(config)
        self.trainer = trainer
        self.save_final = save_final
        self.pruner: GradPruner | None = None
        self._deepspeed = False

    # ---- start -----------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None):
            self._begin_deepspeed(args, state)
            return
        if self.config is None:
            raise user_error(
                "GradPrunerCallback needs a config when the Trainer runs without DeepSpeed",
                None,
                'pass GradPrunerCallback({"prune_ratio": 0.3, ...}) or add_gradpruner(trainer, {...})',
            )
        backend: Backend
        if hasattr(model, "_get_fsdp_state"):
            from gradpruner_ds.backends.fsdp2 import FSDP2Backend

            backend = FSDP2Backend(model)
        else:
            backend = Backend()
            if getattr(args, "world_size", 1) > 1:
                raise user_error(
                    "GradPrunerCallback supports one process, DeepSpeed ZeRO-1/2/3 or FSDP2 (fully_shard) sharding",
                    f"world_size {args.world_size} with neither",
                    "use a DeepSpeed config, an FSDP2-sharded model (fully_shard / DistributedConfig), or one process",
                )
        self.config = self._with_output_dir(self.config, args)
        self.pruner = GradPruner(model, self.config, total_steps=state.max_steps, backend=backend)

    def _begin_deepspeed(self, args: Any, state: Any) -> None:
        from gradpruner_ds.backends.deepspeed import for_deepspeed

        trainer = self.trainer
        if trainer is None:
            raise user_error(
                "GradPrunerCallback under DeepSpeed needs the Trainer (to reach the engine and the accelerator)",
                "GradPrunerCallback(...) without trainer=",
                "add it with gradpruner_ds.integrations.hf_trainer.add_gradpruner(trainer, config)",
            )
        engine = trainer.model_wrapped
        ds_config = dict(trainer.accelerator.state.deepspeed_plugin.deepspeed_config)
        cfg = self.config if self.config is not None else load_config(ds_config)
        assert cfg is not None
        self.config = self._with_output_dir(cfg, args)
        self.pruner = for_deepspeed(engine, ds_config, total_steps=state.max_steps, config=self.config)
        trainer.accelerator.deepspeed_engine_wrapped = _observing_engine_wrapper(engine, self.pruner)
        self._deepspeed = True

    @staticmethod
    def _with_output_dir(cfg: GradPrunerConfig, args: Any) -> GradPrunerConfig:
        if cfg.output_dir is not None:
            return cfg
        return cfg.model_copy(update={"output_dir": str(Path(args.output_dir) / "gradpruner")})

    # ---- window and prune ------------------------------------------------------------------------
    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.pruner is not None and not self._deepspeed:
            self.pruner.observe()

    def on_step_end(
        self,
        args: Any,
        state: Any,
        control: Any,
        optimizer: Any = None,
        lr_scheduler: Any = None,
        **kwargs: Any,
    ) -> None:
        if self.pruner is None or not self.pruner.ready:
            return
        if not self._deepspeed:
            self.pruner.maybe_prune(_torch_optimizer(optimizer), lr_scheduler)
            return
        trainer = self.trainer
        old = trainer.model_wrapped
        # the scheduler DeepSpeed holds (the Trainer's, handed to deepspeed.initialize) is carried
        new, _ = self.pruner.maybe_prune(old, None)
        rebind_engine(old, new)
        backend: Any = self.pruner.backend  # a DeepSpeedBackend
        backend.engine = old  # one object from here on, whichever name is used
        trainer.optimizer.optimizer = old.optimizer  # accelerate's DeepSpeedOptimizerWrapper

    # ---- end -------------------------------------------------------------------------------------
    def on_train_end(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: Any = None,
        processing_class: Any = None,
        **kwargs: Any,
    ) -> None:
        if not self.save_final or self.pruner is None or self.pruner.plan is None:
            return
        out = Path(args.output_dir) / "gradpruner_final"
        backend: Any = self.pruner.backend
        if self._deepspeed:
            from gradpruner_ds.export import save_pretrained_layerwise

            save_pretrained_layerwise(
                self.pruner.model, out, processing_class, rank=backend.rank, zero3=backend.stage == 3
            )
        elif backend.world_size > 1:
            # FSDP2 model sharded by transformers (DistributedConfig): its save_pretrained gathers the
            # full state dict on CPU (a collective: every rank calls it) and rank 0 writes
            if getattr(model.config, "distributed_config", None) is None:
                log.warning("FSDP2 model not sharded by transformers: save it with trainer.save_model()")
                return
            model.save_pretrained(out)
            if processing_class is not None and backend.rank == 0:
                processing_class.save_pretrained(out)
        else:
            model.save_pretrained(out)
            if processing_class is not None:
                processing_class.save_pretrained(out)
        log.info("pruned model saved to %s", out)


def add_gradpruner(
    trainer: Any, config: GradPrunerConfig | Mapping[str, Any] | None = None, *, save_final: bool = True
) -> GradPrunerCallback:
    """Add a :class:`GradPrunerCallback` bound to ``trainer`` (works for every engine); returns it.

    The block is validated now, before any training work: ``config``, or else the ``"gradpruner"``
    block of the Trainer's DeepSpeed config (``TrainingArguments.deepspeed``: a path or a dict)."""
    if config is None:
        ds = getattr(trainer.args, "deepspeed", None)
        if not ds:
            raise user_error(
                "add_gradpruner needs a config when the Trainer runs without DeepSpeed",
                None,
                'pass add_gradpruner(trainer, {"prune_ratio": 0.3, ...})',
            )
        config = load_config(ds)
    cb = GradPrunerCallback(config, trainer=trainer, save_final=save_final)
    trainer.add_callback(cb)
    return cb
