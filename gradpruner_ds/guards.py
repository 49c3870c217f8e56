"""What GradPruner checks of the loop that drives it, so a misuse is a message instead of a quiet wrong result:

* ``observe()`` finds this rank's gradients (after the backward, before ``zero_grad``): otherwise a
  ``gradpruner:`` error naming the order of the calls;
* ``observe()`` once per optimizer step: a second call before ``maybe_prune()`` (a loop with gradient
  accumulation calling it per micro-batch) shortens the window; warned once, naming the fix;
* a run that reaches its last step (``total_steps``) without the prune it was configured for: warned, and the
  report says so (``"pruned": false`` with the reason);
* a model wrapped (``fully_shard``, DDP in a job of several processes) after GradPruner was built with the
  one-process adapter: a ``gradpruner:`` error at the first observed step, naming the fix.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from gradpruner_ds.engine import EngineAdapter
from gradpruner_ds.errors import user_error
from gradpruner_ds.log import get_logger

log = get_logger("guards")


class LoopGuard:
    """The per-step bookkeeping of the checks above (one per pruner)."""

    def __init__(self, total_steps: int | None) -> None:
        self.total_steps = total_steps
        self.observes_this_step = 0
        self.observes = 0
        self.warned_twice = False
        self.ended = False

    def observed(self, model: nn.Module, backend: EngineAdapter) -> None:
        """An observe() at an accumulation boundary of a window or repair phase: its gradients must exist here,
        and it must be the step's only one."""
        if backend.world_size == 1:
            _check_not_wrapped_since(model)
        if not any(backend.local_grad(p) is not None for p in model.parameters() if p.requires_grad):
            raise user_error(
                "observe() found no gradient on this rank: it reads the step's gradients",
                "every trainable parameter's .grad is None",
                "call observe() after loss.backward() (and clipping) and before optimizer.zero_grad(); under "
                "DeepSpeed between engine.backward(loss) and engine.step()",
            )
        self.observes_this_step += 1
        self.observes += 1
        if self.observes_this_step > 1 and not self.warned_twice:
            self.warned_twice = True
            log.warning(
                "observe() was called %d times in one optimizer step (no maybe_prune() between them): each call "
                "counts a step of the window, so the window ends early. Call observe() once per optimizer step, "
                "after the last micro-batch's backward, and maybe_prune() after every optimizer step",
                self.observes_this_step,
            )

    def step_done(self, steps_done: int, pruned: bool, enabled: bool) -> dict[str, Any] | None:
        """``maybe_prune`` was called: the step's count restarts. At the run's last step without the prune:
        the warning, and the report entry it returns (else None)."""
        self.observes_this_step = 0
        if self.ended or not enabled or pruned or self.total_steps is None or steps_done < self.total_steps:
            return None
        self.ended = True
        why = (
            "observe() was never called" if self.observes == 0 else f"observe() counted {self.observes} steps"
        )
        log.warning(
            "the run reached its last step (%d) without the prune it was configured for (%s): the model was "
            "NOT pruned. Call observe() once per optimizer step inside the window (after backward, before "
            "zero_grad) and maybe_prune() after every step, with a window shorter than the run",
            steps_done,
            why,
        )
        return {"pruned": False, "why": f"the run ended after {steps_done} steps without the prune: {why}"}


def _check_not_wrapped_since(model: nn.Module) -> None:
    """The one-process adapter, yet the model's parameters are sharded now, or the job has several processes."""
    import torch.distributed as dist

    from gradpruner_ds.backends import local_tensor

    sharded = any(local_tensor(p) is not p for p in model.parameters())
    several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if sharded or several:
        raise user_error(
            "the model was wrapped (or the job became distributed) after GradPruner was built with the one-process "
            "adapter: each rank would measure and prune on its own",
            "sharded parameters" if sharded else f"{dist.get_world_size()} processes",
            "build GradPruner after wrapping, on the wrapped model (fully_shard / DDP / deepspeed.initialize / "
            "accelerator.prepare); it picks the engine's adapter from it",
        )
