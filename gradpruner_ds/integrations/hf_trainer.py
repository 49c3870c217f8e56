"""GradPruner as a Hugging Face ``Trainer`` callback (one process, DDP-free CPU/GPU, or FSDP2).

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[GradPrunerCallback({"window_fraction": 0.01, "prune_ratio": 0.3})])
    trainer.train()

The callback observes IGIA in ``on_pre_optimizer_step`` (after the Trainer's gradient clipping, before
the optimizer step), prunes in place in ``on_step_end`` once the window is complete (the Trainer keeps
its model, optimizer and scheduler objects: kept parameters keep their optimizer state, the dropped
ones leave the optimizer), and at the end of training writes the pruned model with ``save_pretrained``
to ``<output_dir>/gradpruner_final`` (single process).

Under a DeepSpeed config the Trainer's inner loop holds the engine in a local variable and steps it
inside ``accelerator.backward``, so the engine cannot be replaced mid-loop: use
``gradpruner_ds.for_deepspeed`` in your own loop (``launch/train.py``) instead; the callback refuses
DeepSpeed with a clear error rather than doing something wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from gradpruner_ds.backends.base import Backend
from gradpruner_ds.config import GradPrunerConfig
from gradpruner_ds.errors import user_error
from gradpruner_ds.log import get_logger
from gradpruner_ds.pruner import GradPruner

log = get_logger("hf_trainer")


def _torch_optimizer(optimizer: Any) -> Any:
    """accelerate wraps the torch optimizer (AcceleratedOptimizer.optimizer)."""
    return getattr(optimizer, "optimizer", optimizer)


class GradPrunerCallback(TrainerCallback):
    """Observe, prune and keep training inside ``Trainer.train()``."""

    def __init__(self, config: GradPrunerConfig | Mapping[str, Any], *, save_final: bool = True) -> None:
        self.config = config if isinstance(config, GradPrunerConfig) else GradPrunerConfig.from_dict(config)
        self.save_final = save_final
        self.pruner: GradPruner | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None):
            raise user_error(
                "GradPrunerCallback cannot replace the DeepSpeed engine inside Trainer's loop",
                "a DeepSpeed config",
                "use gradpruner_ds.for_deepspeed in a training loop (see launch/train.py), or FSDP2 / one process",
            )
        backend: Backend
        if hasattr(model, "_get_fsdp_state"):
            from gradpruner_ds.backends.fsdp2 import FSDP2Backend

            backend = FSDP2Backend(model)
        else:
            backend = Backend()
            if getattr(args, "world_size", 1) > 1:
                raise user_error(
                    "GradPrunerCallback supports one process or FSDP2 (fully_shard) sharding",
                    f"world_size {args.world_size} without FSDP2",
                    "enable FSDP2 (fsdp_version 2) or run one process",
                )
        if self.config.output_dir is None:
            self.config = self.config.model_copy(
                update={"output_dir": str(Path(args.output_dir) / "gradpruner")}
            )
        self.pruner = GradPruner(model, self.config, total_steps=state.max_steps, backend=backend)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.pruner is not None:
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
        if self.pruner is not None and self.pruner.ready:
            self.pruner.maybe_prune(_torch_optimizer(optimizer), lr_scheduler)

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
        if self.pruner.backend.world_size > 1:
            log.info("sharded model: save it with trainer.save_model() (gathers the FSDP state dict)")
            return
        out = Path(args.output_dir) / "gradpruner_final"
        model.save_pretrained(out)
        if processing_class is not None:
            processing_class.save_pretrained(out)
        log.info("pruned model saved to %s", out)
