"""PyTorch FSDP2 (``fully_shard``) adapter.

Where things are (torch 2.13, checked by tests/dist/test_fsdp2.py):

* every parameter of a ``fully_shard``-ed module is a DTensor with placement ``Shard(0)``: rank r holds
  rows ``[r * ceil(d0 / W), ...)`` of dim 0, i.e. one contiguous flat slice of the flattened matrix.
  Same-named sublayers of different layers have the same shape, so their shards line up and the merge
  is shard-local, applied in place to the local shard (``to_local()`` is a view of the sharded storage).
* after ``loss.backward()`` the gradients are reduce-scattered DTensors; ``p.grad.to_local()`` is this
  rank's reduced shard. ``torch.nn.utils.clip_grad_norm_`` works on them (global norm), so the user
  clips before ``observe()`` exactly as in one process.

The distillation teacher (``recovery``) is a second ``fully_shard``-ed copy of the model built the same way
(same classes, same FSDP units, the same device mesh and mixed-precision policy) on the meta device, then
filled from each rank's own shards: every rank holds its rows of the teacher, nothing is gathered outside
the teacher's own forward. FSDP modules cannot be deep-copied, hence the rebuild. A peft LoRA student's
teacher is its base model's class with the adapters merged in on this rank's rows (``W + scaling * B @ A``;
``A``, r x in, gathered whole); other adapter kinds are refused (``teacher_refused``).

Continuing after the surgery needs no re-sharding: each decoder layer is its own FSDP unit and the kept
parameters keep their shards, optimizer state included (the optimizer is pruned in place). Only the
root's lazy-init bookkeeping (the list of FSDP states in its tree) is reset, so the next forward
re-collects the kept units and the dropped ones are released.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradpruner_ds.backends.sharded import ShardedBackend
from gradpruner_ds.core.igia import Key
from gradpruner_ds.diagnostics import release_memory
from gradpruner_ds.errors import user_error
from gradpruner_ds.peft_support import is_peft, teacher_name, teacher_refusal, unmerged_lora_layers


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _plain_class(m: nn.Module) -> type:
    """The model class under FSDP2's dynamic ``FSDP<cls>`` subclass."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(m)
    if not isinstance(m, FSDPModule):
        return cls
    return next(c for c in cls.__mro__[1:] if not issubclass(c, FSDPModule))


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
        if not hasattr(model, "_get_fsdp_state"):
            raise user_error(
                "the FSDP2 backend needs the root model wrapped with fully_shard",
                type(model).__name__,
                "apply fully_shard to each decoder layer, then to the root model",
            )
        self.model = model
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.teacher_refused = teacher_refusal(model)

    # ---- this rank's pieces ----------------------------------------------------------------------------
    def piece(self, p: nn.Parameter) -> tuple[int, int]:
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

    def grad_piece(self, p: nn.Parameter) -> torch.Tensor:
        if p.grad is None:
            raise AssertionError("no gradient: call observe() after backward, before zero_grad")
        return _local(p.grad)

    def whole_shape(self, p: nn.Parameter) -> tuple[int, ...]:
        return tuple(p.shape)

    def local_weights(self, params: Mapping[Key, nn.Parameter]) -> dict[Key, torch.Tensor]:
        """Views of the local shards: in-place edits change the sharded parameters."""
        return {k: _local(p.data).reshape(-1) for k, p in params.items()}

    def global_numel(self, p: nn.Parameter) -> int:
        return p.numel()

    def transform_weight(self, param: nn.Parameter, fn: Callable[[torch.Tensor], torch.Tensor]) -> int:
        """The whole weight (one all-gather of this matrix), ``fn`` on every rank, this rank's rows written back
        into its shard."""
        with torch.no_grad():
            whole = param.data.full_tensor() if hasattr(param.data, "full_tensor") else param.data
            new = fn(whole)
            local = _local(param.data)
            start = self.piece(param)[0] // max(1, param.numel() // max(1, param.shape[0]))
            local.copy_(new[start : start + local.shape[0]].to(local.dtype))
        return local.numel() * local.element_size() * (self.world_size - 1)

    @staticmethod
    def local(t: torch.Tensor) -> torch.Tensor:
        return _local(t)

    def load_optimizer_state(self, optimizer: Any, saved: Mapping[str, Any] | None) -> None:
        """The saved local pieces into the optimizer's state, made DTensors laid out like their parameters (the
        same world size and sharding as the run that saved them)."""
        if saved is None:
            return
        from torch.distributed.tensor import DTensor

        params = [p for g in optimizer.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            entry = saved["state"].get(str(i))
            if entry is None:
                continue
            state = {}
            for k, v in entry.items():
                if torch.is_tensor(v) and isinstance(p.data, DTensor) and v.dim() > 0:
                    v = DTensor.from_local(v.to(_local(p.data).device), p.data.device_mesh, p.data.placements)
                state[k] = v
            optimizer.state[p] = state
        for group, hp in zip(optimizer.param_groups, saved["param_groups"], strict=True):
            group.update({k: v for k, v in hp.items() if k != "params"})

    def lora_slices(self, params: Mapping[Key, nn.Parameter]) -> dict[Key, tuple[int, int]] | None:
        return {k: self.piece(p) for k, p in params.items()}

    # ---- the distillation teacher ----------------------------------------------------------------------
    def make_teacher(self, model: nn.Module) -> nn.Module:
        """A frozen copy of the ``fully_shard``-ed ``model``, sharded like it (module docstring)."""
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if self.teacher_refused is not None:
            raise AssertionError(self.teacher_refused)  # GradPruner checked this before any work

        peft = is_peft(model)
        base = model.get_base_model() if peft else model  # type: ignore[operator]

        units: dict[str, Any] = {name: m for name, m in model.named_modules() if isinstance(m, FSDPModule)}
        for unit in units.values():  # the sharded parameters (a forward leaves the root's unsharded)
            unit.reshard()
        first = next(p for p in model.parameters())
        mesh = first.device_mesh  # type: ignore[attr-defined]
        with torch.device("meta"):
            teacher = _plain_class(base)(copy.deepcopy(base.config))
        teacher.to(dtype=first.dtype)
        t_modules = dict(teacher.named_modules())
        sharded: set[str] = set()
        for name, unit in sorted(units.items(), key=lambda kv: -kv[0].count(".")):  # children before parents
            t = teacher_name(name, peft)
            if t in sharded:
                continue
            sharded.add(t)
            t_unit: nn.Module = t_modules[t]
            if not peft and _plain_class(unit) is not type(t_unit):
                raise AssertionError(f"teacher module {t!r} is a {type(t_unit).__name__}")
            fully_shard(t_unit, mesh=mesh, mp_policy=unit._get_fsdp_state()._mp_policy)
        teacher.to_empty(device=_local(first).device)
        t_params = dict(teacher.named_parameters())
        t_buffers = dict(teacher.named_buffers())
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_" not in name:
                    _local(t_params[teacher_name(name, peft)].data).copy_(_local(p.data))
            for name, b in model.named_buffers():
                t_buffers[teacher_name(name, peft)].copy_(b)
            if peft:  # LoRA merged in: W + scaling * B @ A, on this rank's rows (A is r x in: gathered whole)
                for name, _, adapters in unmerged_lora_layers(model):
                    w = _local(t_params[teacher_name(name, peft) + ".weight"].data)
                    for a_weight, b_weight, scaling in adapters:
                        b_rows = _local(b_weight.data)
                        a_full = a_weight.data
                        a_full = a_full.full_tensor() if hasattr(a_full, "full_tensor") else a_full
                        w.add_((b_rows.float() @ a_full.float() * scaling).to(w.dtype))
        teacher.requires_grad_(False)
        return teacher

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
