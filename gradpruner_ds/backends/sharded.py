"""What the sharded engines (DeepSpeed ZeRO, FSDP2) have in common: collectives over their process
group, and assembling the small LoRA factor gradients from every rank's piece in one all-reduce.

A subclass says where this rank's piece of a parameter is (``_frag``: offset and length in the
flattened parameter), how to read its reduced gradient piece (``_local_grad``) and the parameter's
whole shape (``_shape``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradpruner_ds import dist as gdist
from gradpruner_ds.backends.base import Backend
from gradpruner_ds.core.igia import Key
from gradpruner_ds.core.plan import PrunePlan


class ShardedBackend(Backend):
    """Collectives over ``self.group`` and the LoRA-factor assembly shared by the sharded engines."""

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

    def _frag(self, p: nn.Parameter) -> tuple[int, int]:
        raise NotImplementedError

    def _local_grad(self, p: nn.Parameter) -> torch.Tensor:
        raise NotImplementedError

    def _shape(self, p: nn.Parameter) -> tuple[int, ...]:
        raise NotImplementedError

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
            start, numel = self._frag(p)
            if numel:
                buf[offset + start : offset + start + numel] = self._local_grad(p).reshape(-1).float()
            offset += n
        self.all_reduce_sum_(buf)
        pieces, offset = [], 0
        for p, n in zip(flat, numels, strict=True):
            pieces.append(buf[offset : offset + n].view(self._shape(p)))
            offset += n
        return {key: (pieces[2 * i], pieces[2 * i + 1]) for i, key in enumerate(factors)}
