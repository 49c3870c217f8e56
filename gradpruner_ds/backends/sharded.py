"""What the sharded engines (DeepSpeed ZeRO, FSDP2) have in common: collectives over their process
group, and assembling the small LoRA factor gradients from every rank's piece in one all-reduce.

A subclass says where this rank's piece of a parameter is (``piece``: offset and length in the
flattened parameter), how to read its reduced gradient piece (``grad_piece``) and the parameter's
whole shape (``whole_shape``)."""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradpruner_ds import consensus as gdist
from gradpruner_ds.backends.plain import Backend
from gradpruner_ds.core.igia import Key
from gradpruner_ds.core.merge import MergeRule, merge_
from gradpruner_ds.core.plan import PrunePlan
from gradpruner_ds.engine import MergeGroup


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

    # ---- replicated weights (ZeRO-1/2, DDP): edits computed whole, identically on every rank ----------------
    def whole_value(self, p: nn.Parameter) -> torch.Tensor:
        """The whole fp32 value of a replicated weight (overridden where the fp32 copy is partitioned)."""
        return p.data.float().clone()

    def store_whole(self, p: nn.Parameter, value: torch.Tensor) -> None:
        """Write a whole new value into every copy the engine keeps of a replicated weight."""
        p.data.copy_(value.to(p.dtype))

    def merge_whole(
        self,
        params: Mapping[Key, nn.Parameter],
        groups: Sequence[MergeGroup],
        merge_rule: MergeRule,
        sign_consistent: bool,
    ) -> dict[Key, tuple[int, int]]:
        """Each target merged whole, one matrix at a time, identically on every rank: the masks assembled from
        the ranks' pieces (one all-reduce each), the values from :meth:`whole_value`, the result stored with
        :meth:`store_whole`. The mask pieces are disjoint over ranks and the whole merge ran on every rank, so only
        rank 0 reports its merged count: the all-reduced counts are the global ones."""
        counts: dict[Key, tuple[int, int]] = {}
        for tkey, sources in groups:
            tp = params[tkey]
            target = self.whole_value(tp)
            pairs = []
            for skey, mask_piece in sources:
                sp = params[skey]
                full_mask = torch.zeros(sp.numel(), dtype=torch.uint8)
                start, numel = self.piece(sp)
                full_mask[start : start + numel] = mask_piece.to(torch.uint8)
                self.all_reduce_sum_(full_mask)
                pairs.append((self.whole_value(sp), full_mask.view(sp.shape).bool()))
            added = merge_(target, pairs, merge_rule, sign_consistent)
            for (skey, mask_piece), n_added in zip(sources, added, strict=True):
                counts[skey] = (int(mask_piece.sum()), n_added if self.rank == 0 else 0)
            self.store_whole(tp, target)
        return counts

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
