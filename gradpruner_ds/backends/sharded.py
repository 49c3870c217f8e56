"""What the sharded engines (DeepSpeed ZeRO, FSDP2) have in common: collectives over their process
group, and assembling the small LoRA factor gradients from every rank's piece in one all-reduce.

A subclass says where this rank's piece of a parameter is (``piece``: offset and length in the
flattened parameter), how to read its reduced gradient piece (``grad_piece``) and the parameter's
whole shape (``whole_shape``)."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradpruner_ds import consensus as gdist
from gradpruner_ds.backends.plain import Backend
from gradpruner_ds.core.igia import Key
from gradpruner_ds.core.plan import PrunePlan


class ShardedBackend(Backend, abc.ABC):
    """Collectives over ``self.group`` and the LoRA-factor assembly shared by the sharded engines.

    The written hooks every sharded engine implements (abstract): ``piece`` (where this rank's piece of a
    parameter lies in the flattened parameter), ``grad_piece`` (this rank's reduced gradient piece of a
    trainable parameter; an error where it must exist and does not -- unlike the contract's ``local_grad``,
    which answers None) and ``whole_shape`` (the parameter's unsharded shape)."""

    group: dist.ProcessGroup | None = None

    def all_reduce_sum_(self, t: torch.Tensor) -> None:
        gdist.all_reduce_sum_(t, self.group, self.timeout_s)

    def check_settings(self, settings: dict[str, Any], timeout_s: float) -> None:
        self.timeout_s = timeout_s
        gdist.check_same_settings(settings, timeout_s, self.group)

    def all_true(self, flag: bool) -> bool:
        t = torch.tensor([0 if flag else 1], dtype=torch.int64)
        self.all_reduce_sum_(t)
        return int(t.item()) == 0

    def check_plan(self, plan: PrunePlan, timeout_s: float) -> None:
        gdist.check_same_plan(plan, timeout_s, self.group)

    def check_same(self, digest: str, what: str) -> None:
        gdist.check_same_digest(digest, what, self.timeout_s, self.group)

    @abc.abstractmethod
    def piece(self, p: nn.Parameter) -> tuple[int, int]:
        """(offset, numel) of this rank's piece of ``p`` in the flattened parameter."""

    @abc.abstractmethod
    def grad_piece(self, p: nn.Parameter) -> torch.Tensor:
        """This rank's reduced gradient piece of a trainable parameter (empty where it holds none)."""

    @abc.abstractmethod
    def whole_shape(self, p: nn.Parameter) -> tuple[int, ...]:
        """The parameter's whole (unsharded) shape."""

    def lora_grads(
        self, factors: Mapping[Key, tuple[nn.Parameter, nn.Parameter]]
    ) -> dict[Key, tuple[torch.Tensor, torch.Tensor]]:
        """Whole ``(grad(B), grad(A))`` pairs: every rank writes its piece into a zero buffer at its
        offset; ONE all-reduce (SUM of disjoint pieces) assembles them all."""
        flat = [t for pair in factors.values() for t in (pair[1], pair[0])]  # B, A
        numels = [self.global_numel(p) for p in flat]
        buf = torch.zeros(sum(numels), dtype=torch.float32)
        offset = 0
        for p, n in zip(flat, numels, strict=True):
            start, numel = self.piece(p)
            if numel:
                buf[offset + start : offset + start + numel] = self.grad_piece(p).reshape(-1).float()
            offset += n
        self.all_reduce_sum_(buf)
        pieces, offset = [], 0
        for p, n in zip(flat, numels, strict=True):
            pieces.append(buf[offset : offset + n].view(self.whole_shape(p)))
            offset += n
        return {key: (pieces[2 * i], pieces[2 * i + 1]) for i, key in enumerate(factors)}


def teacher_refusal(model: nn.Module) -> str | None:
    """Why a sharded distillation teacher cannot be rebuilt for ``model`` (None: it can). Under FSDP2 and ZeRO-3
    the teacher is the base model's class built from its config, filled from each rank's own pieces; a peft
    model's plain LoRA adapters are merged into it (``W + scaling * B @ A``)."""
    if not hasattr(model, "peft_config"):
        return (
            None
            if hasattr(model, "config")
            else "the teacher is rebuilt from the model's config; it has none"
        )
    for name, m in model.named_modules():
        if hasattr(m, "lora_A") and hasattr(m, "base_layer"):
            plain = type(m).__name__ == "Linear" and not getattr(m, "fan_in_fan_out", False)
            if not plain or any(getattr(m, "use_dora", {}).values()) or getattr(m, "lora_embedding_A", None):
                return f"the LoRA layer {name!r} ({type(m).__name__}) is not a plain LoRA Linear"
        if type(m).__name__ == "ModulesToSaveWrapper":
            return f"peft's modules_to_save ({name!r}) are not supported"
    return None


def teacher_name(name: str, peft: bool) -> str:
    """A student's parameter or module name -> the rebuilt teacher's (peft's prefix and ``base_layer`` gone)."""
    if peft:
        name = (
            "" if name in ("", "base_model", "base_model.model") else name.removeprefix("base_model.model.")
        )
    return name.replace(".base_layer.", ".").removesuffix(".base_layer")
