"""In-job recovery by self-distillation after the prune.

The model just before the prune is the best teacher the pruned model can have, and it is already in the
job: :class:`Distiller` keeps a frozen copy of it (no gradients, no optimizer state, eval mode) from the
prune on, and for ``distill_steps`` optimizer steps adds ``T^2 * KL(teacher || student)`` on the same
batch to the task loss:

    loss = (1 - weight) * task_loss + weight * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))

averaged over the positions the task loss trains (``labels != -100``, shifted like the causal-LM loss;
the attention mask when there are no labels). Then the teacher is freed.

The teacher is laid out like the student (the engine adapter's ``make_teacher``): one process and
DeepSpeed ZeRO-1/2 keep whole weights (a whole copy), FSDP2 keeps each rank's shard (a copy of the
``fully_shard``-ed model: each rank holds its rows of the teacher, gathered layer by layer in its forward
exactly like the student's), ZeRO-3 keeps each rank's slice of every parameter (``Zero3Teacher``: a module
built on the meta device whose forward gathers one decoder layer at a time and frees it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradpruner_ds.backends import local_tensor
from gradpruner_ds.config import RecoveryConfig
from gradpruner_ds.diagnostics import release_memory
from gradpruner_ds.log import get_logger

log = get_logger("recovery")


def distill_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Mean over masked positions of ``T^2 * KL(softmax(t / T) || softmax(s / T))`` (fp32)."""
    t = temperature
    log_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # [batch, positions]
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1.0) * (t * t)


class Distiller:
    """The frozen pre-prune teacher and the distillation term for the first ``distill_steps`` steps."""

    def __init__(self, config: RecoveryConfig, teacher: nn.Module) -> None:
        """``teacher``: the frozen pre-prune model laid out like the student (``Backend.make_teacher``)."""
        self.config = config
        self.teacher: nn.Module | None = teacher
        self.teacher.eval()
        self.teacher.requires_grad_(False)
        self.steps_done = 0
        self._losses_this_step = 0  # loss() calls since the last step_done(): 0 means no distillation ran
        self._warned = False

    def announce(self) -> None:
        """Log the distillation's start (at the prune)."""
        c = self.config
        log.info(
            "recovery: distilling the pre-prune model into the pruned one for %d steps: loss = (1 - %g) * task "
            "loss + %g * T^2 * KL(teacher || student), T = %g (the loss logged meanwhile is this sum); teacher "
            "%.1f MiB on this rank",
            c.distill_steps, c.weight, c.weight, c.temperature, self.teacher_bytes() / 2**20,
        )  # fmt: skip

    @property
    def active(self) -> bool:
        return self.teacher is not None

    def teacher_bytes(self) -> int:
        """Memory the teacher's weights take on this rank (what recovery costs until it is freed); a weight
        shared by two modules (tied embeddings and head) counts once."""
        if self.teacher is None:
            return 0
        seen: dict[int, int] = {}
        for t in self.teacher.state_dict().values():
            local = local_tensor(t)
            seen[local.untyped_storage().data_ptr()] = local.untyped_storage().nbytes()
        return sum(seen.values())

    def loss(
        self, task_loss: torch.Tensor, student_logits: torch.Tensor, batch: Mapping[str, Any]
    ) -> torch.Tensor:
        """``task_loss`` with the distillation term added (unchanged once the teacher is freed)."""
        if self.teacher is None:
            return task_loss
        self._losses_this_step += 1
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        with torch.no_grad():
            teacher_logits = self.teacher(**inputs).logits
        labels = batch.get("labels")
        if labels is not None:  # the positions the causal-LM loss trains: logits[t] predicts labels[t + 1]
            mask = labels[:, 1:] != -100
            s, t = student_logits[:, :-1], teacher_logits[:, :-1]
        else:
            mask = batch.get("attention_mask", torch.ones(student_logits.shape[:2], dtype=torch.bool))
            s, t = student_logits, teacher_logits
        kl = distill_kl(s, t, mask, self.config.temperature)
        w = self.config.weight
        return (1.0 - w) * task_loss + w * kl

    def step_done(self) -> None:
        """One optimizer step of the pruned model is done; the teacher goes after ``distill_steps``."""
        if self.teacher is None:
            return
        if not self._losses_this_step and not self._warned:
            self._warned = True
            log.warning(
                "recovery is configured but this step after the prune added no distillation term: call "
                "loss = pruner.distill(out.loss, out.logits, batch) on every micro-batch (with the HF Trainer: "
                "add_gradpruner(trainer, ...) adds it, a GradPrunerCallback passed in callbacks=[...] cannot); "
                "the teacher is freed after %d steps either way",
                self.config.distill_steps,
            )
        self._losses_this_step = 0
        self.steps_done += 1
        if self.steps_done >= self.config.distill_steps:
            self.teacher = None
            release_memory()
            log.info("recovery: %d distillation steps done, teacher freed", self.steps_done)

    def state_dict(self) -> dict[str, Any]:
        """Steps done and (while it lives) the teacher's weights: resuming mid-distillation needs them."""
        teacher = (
            None
            if self.teacher is None
            else {k: local_tensor(v).detach().clone() for k, v in self.teacher.state_dict().items()}
        )
        return {"steps_done": self.steps_done, "teacher": teacher}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps_done = int(state["steps_done"])
        if state["teacher"] is None or self.steps_done >= self.config.distill_steps:
            self.teacher = None
            return
        assert self.teacher is not None
        saved = state["teacher"]
        with torch.no_grad():  # into this rank's pieces (sharded teachers hold their shard only)
            for k, v in self.teacher.state_dict().items():
                local_tensor(v).copy_(saved[k])
        log.info(
            "recovery resumed: %d of %d steps done, teacher restored (%.1f MiB on this rank)",
            self.steps_done, self.config.distill_steps, self.teacher_bytes() / 2**20,
        )  # fmt: skip
