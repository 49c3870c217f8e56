"""PyTorch FSDP2 (``fully_shard``) adapter.

Where things are (torch 2.13, checked by tests/dist/test_fsdp2.py):

* every parameter of a ``fully_shard``-ed module is a DTensor with placement ``Shard(0)``: rank r holds
  rows ``[r * ceil(d0 / W), ...)`` of dim 0, i.e. one contiguous flat slice of the flattened matrix.
  Same-named sublayers of different layers have the same shape, so their shards line up and the merge
  is shard-local, applied in place to the local shard (``to_local()`` is a view of the sharded storage).
* after ``loss.backward()`` the gradients are reduce-scattered DTensors; ``p.grad.to_local()`` is this
  rank's reduced shard. ``torch.nn.utils.clip_grad_norm_`` works on them (global norm), so the user
  clips before ``observe()`` exactly as in one process.

Continuing after the surgery needs no re-sharding: each decoder layer is its own FSDP unit and the kept
parameters keep their shards, optimizer state included (the optimizer is pruned in place). Only the
root's lazy-init bookkeeping (the list of FSDP states in its tree) is reset, so the next forward
re-collects the kept units and the dropped ones are released.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradpruner_ds.backends.sharded import ShardedBackend
from gradpruner_ds.core.igia import Key
from gradpruner_ds.diagnostics import release_memory
from gradpruner_ds.errors import user_error


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def is_fsdp2(model: Any) -> bool:
    """True when ``model`` is the root of an FSDP2 (``fully_shard``) tree."""
    return hasattr(model, "_get_fsdp_state")


@contextlib.contextmanager
def gather_full(params: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """The whole values of DTensor parameters on every rank (one all-gather each: a collective)."""
    yield [p.full_tensor() if hasattr(p, "full_tensor") else p for p in params]


class FSDP2Backend(ShardedBackend):
    """GradPruner on a model sharded with ``torch.distributed.fsdp.fully_shard`` (``Shard(0)``)."""

    def __init__(self, model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_initialized():
            raise user_error(
                "the FSDP2 backend needs an initialized process group",
                "none",
                "call torch.distributed.init_process_group first",
            )
        if not is_fsdp2(model):
            raise user_error(
                "the FSDP2 backend needs the root model wrapped with fully_shard",
                type(model).__name__,
                "apply fully_shard to each decoder layer, then to the root model",
            )
        self.model = model
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    # ---- this rank's pieces ----------------------------------------------------------------------------
    def _frag(self, p: nn.Parameter) -> tuple[int, int]:
        """(offset, numel) of this rank's rows of ``p`` in the flattened parameter."""
        rows = p.shape[0]
        chunk = -(-rows // self.world_size)
        row_start = min(self.rank * chunk, rows)
        local = _local(p.data)
        return row_start * (p.numel() // rows if rows else 0), local.numel()

    def full_grads(self, params: Mapping[Key, nn.Parameter]) -> dict[Key, torch.Tensor]:
        out = {}
        for key, p in params.items():
            if p.grad is None:
                raise AssertionError(
                    f"no gradient for {key}: call observe() after backward, before zero_grad"
                )
            out[key] = _local(p.grad).reshape(-1)
        return out

    def local_grad(self, p: nn.Parameter) -> torch.Tensor | None:
        return None if p.grad is None else _local(p.grad)

    def _local_grad(self, p: nn.Parameter) -> torch.Tensor:
        if p.grad is None:
            raise AssertionError("no gradient: call observe() after backward, before zero_grad")
        return _local(p.grad)

    def _shape(self, p: nn.Parameter) -> tuple[int, ...]:
        return tuple(p.shape)

    def local_weights(self, params: Mapping[Key, nn.Parameter]) -> dict[Key, torch.Tensor]:
        """Views of the local shards: in-place edits change the sharded parameters."""
        return {k: _local(p.data).reshape(-1) for k, p in params.items()}

    def global_numel(self, p: nn.Parameter) -> int:
        return p.numel()

    def lora_slices(self, params: Mapping[Key, nn.Parameter]) -> dict[Key, tuple[int, int]] | None:
        return {k: self._frag(p) for k, p in params.items()}

    # ---- continuing after the surgery ----------------------------------------------------------------
    def rebuild(
        self, model: nn.Module, removed_params: list[nn.Parameter], optimizer: Any, lr_scheduler: Any
    ) -> tuple[Any, Any]:
        """Prune the optimizer in place (kept state carried as is) and reset the root's lazy init."""
        optimizer, lr_scheduler = super().rebuild(model, removed_params, optimizer, lr_scheduler)
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPStateContext

        root_state = self.model._get_fsdp_state()  # type: ignore[operator]
        for m in self.model.modules():
            get_state = getattr(m, "_get_fsdp_state", None)
            if get_state is not None:
                get_state()._is_root = None
        root_state._state_ctx = FSDPStateContext()
        removed_params.clear()
        release_memory()
        return optimizer, lr_scheduler
