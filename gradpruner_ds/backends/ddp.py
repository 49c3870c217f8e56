"""PyTorch DDP (``torch.nn.parallel.DistributedDataParallel``) adapter.

Every rank holds the whole model and, after the backward, the whole averaged gradient (DDP's all-reduce).
So that one SUM all-reduce of partial tables stays exact, each rank reads only its own even slice of every
replicated gradient and weight (``piece``: ``ceil(numel / world)`` entries per rank, as ZeRO-3 slices): the
IGIA sums of the slices add up to the whole matrix's, with no second reduction of the gradients. The hidden
-state and repair sums come from each rank's own micro-batches and add up over ranks as they are.

Changing the model: the merge and the repair's fold are computed on the whole, replicated weights,
identically on every rank (masks assembled from the slices in one all-reduce), so every replica stays
equal. After the surgery DDP's buckets name removed parameters: the wrapper is rebuilt over the same module
with the same settings and the user's DDP object is rebound to it in place (the training loop's variable,
``accelerate``'s reference and the pruner's own drive the new wrapper); the torch optimizer is pruned in
place, its kept state carried.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradpruner_ds.backends.sharded import ShardedBackend
from gradpruner_ds.core.igia import Key
from gradpruner_ds.core.merge import MergeRule
from gradpruner_ds.engine import MergeGroup


class DDPBackend(ShardedBackend):
    """GradPruner on a model wrapped with ``DistributedDataParallel`` (replicated weights and gradients)."""

    def __init__(self, ddp: nn.Module) -> None:
        self.ddp = ddp
        self.group = getattr(ddp, "process_group", None)
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)

    # ---- this rank's slice of replicated tensors --------------------------------------------------------
    def piece(self, p: nn.Parameter) -> tuple[int, int]:
        part = -(-p.numel() // self.world_size)
        start = min(self.rank * part, p.numel())
        return start, max(0, min(part, p.numel() - start))

    def grad_piece(self, p: nn.Parameter) -> torch.Tensor:
        if p.grad is None:
            raise AssertionError("no gradient: call observe() after backward, before zero_grad")
        start, n = self.piece(p)
        return p.grad.reshape(-1)[start : start + n]

    def local_grad(self, p: nn.Parameter) -> torch.Tensor | None:
        return None if p.grad is None else self.grad_piece(p)

    def whole_shape(self, p: nn.Parameter) -> tuple[int, ...]:
        return tuple(p.shape)

    def full_grads(self, params: Mapping[Key, nn.Parameter]) -> dict[Key, torch.Tensor]:
        out = {}
        for key, p in params.items():
            if p.grad is None:
                raise AssertionError(
                    f"no gradient for {key}: call observe() after backward, before zero_grad"
                )
            out[key] = self.grad_piece(p)
        return out

    def local_weights(self, params: Mapping[Key, nn.Parameter]) -> dict[Key, torch.Tensor]:
        """Views of this rank's slices of the replicated weights (read only: edits go through apply_merge)."""
        out = {}
        for k, p in params.items():
            start, n = self.piece(p)
            out[k] = p.data.reshape(-1)[start : start + n]
        return out

    def lora_slices(self, params: Mapping[Key, nn.Parameter]) -> dict[Key, tuple[int, int]] | None:
        return {k: self.piece(p) for k, p in params.items()}

    # ---- changing the replicated weights -------------------------------------------------------------
    def apply_merge(
        self,
        params: Mapping[Key, nn.Parameter],
        groups: Sequence[MergeGroup],
        merge_rule: MergeRule,
        sign_consistent: bool = True,
    ) -> dict[Key, tuple[int, int]]:
        """Each target merged whole, identically on every rank, the masks assembled from the ranks' slices, the
        replicated weights read as they are (``merge_whole``)."""
        return self.merge_whole(params, groups, merge_rule, sign_consistent)

    def transform_weight(self, param: nn.Parameter, fn: Callable[[torch.Tensor], torch.Tensor]) -> int:
        """The replicated weight is whole on every rank: ``fn`` runs identically everywhere, nothing is sent."""
        return super().transform_weight(param, fn)

    def make_teacher(self, model: nn.Module) -> nn.Module:
        """A frozen whole copy of the wrapped module (every rank holds the whole model anyway)."""
        inner = model.module if model is self.ddp else model
        return super().make_teacher(inner)  # type: ignore[arg-type]

    # ---- continuing after the surgery ----------------------------------------------------------------
    def rebuild(
        self, model: nn.Module, removed_params: list[nn.Parameter], optimizer: Any, lr_scheduler: Any
    ) -> tuple[Any, Any]:
        """The torch optimizer pruned in place (kept state carried); a new DDP wrapper over the pruned module
        with the old one's settings, and the old object rebound to it."""
        from torch.nn.parallel import DistributedDataParallel

        optimizer, lr_scheduler = super().rebuild(model, removed_params, optimizer, lr_scheduler)
        old: Any = self.ddp
        kwargs: dict[str, Any] = {
            "device_ids": old.device_ids,
            "output_device": old.output_device,
            "broadcast_buffers": old.broadcast_buffers,
            "process_group": old.process_group,
            "bucket_cap_mb": old.bucket_bytes_cap / (1024 * 1024),
            "find_unused_parameters": old.find_unused_parameters,
            "gradient_as_bucket_view": old.gradient_as_bucket_view,
        }
        module = old.module
        new = DistributedDataParallel(module, **kwargs)
        object.__setattr__(old, "__dict__", new.__dict__)  # the user's object is the new wrapper
        removed_params.clear()
        return optimizer, lr_scheduler
