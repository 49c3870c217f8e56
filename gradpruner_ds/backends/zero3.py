# DeepSpeed attaches its partitioning state (ds_tensor, ds_numel, ds_shape) to Parameter objects at run time:
# mypy: disable-error-code="attr-defined"
"""DeepSpeed ZeRO-3: every parameter is partitioned into flat slices of ``ceil(numel / world)`` entries per
rank (``p.ds_tensor``; padding at the end of the last rank). ``safe_get_local_grad(p)`` is this rank's slice
of the reduced gradient between ``engine.backward`` and ``engine.step``; ``safe_get/set_local_fp32_param`` and
``safe_get/set_local_optimizer_state`` address the fp32 master and Adam state of the same slice. Same-named
sublayers of different layers have the same shape, hence the same slices: the merge is shard-local, and
at the same world size the rebuilt engine keeps every slice, so the state is carried with local copies."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gradpruner_ds.backends.deepspeed import DeepSpeedBackend
from gradpruner_ds.consensus import all_gather
from gradpruner_ds.core.igia import Key, product_flat_slice
from gradpruner_ds.peft_support import is_peft, teacher_name, teacher_refusal, unmerged_lora_layers


class Zero3Backend(DeepSpeedBackend):
    """ZeRO-3 pieces: a parameter's slice is ``[rank * part, rank * part + valid)``."""

    teacher_refused: str | None = None

    def __init__(self, engine: Any, ds_config: Mapping[str, Any]) -> None:
        super().__init__(engine, ds_config)
        self.teacher_refused = self.refusal(engine.module)

    @staticmethod
    def refusal(module: nn.Module) -> str | None:
        """Why no teacher can be built for ``module`` under ZeRO-3 (None: it can): as under FSDP2, the
        teacher is rebuilt from the (base) model's class and config, plain LoRA adapters merged in."""
        return teacher_refusal(module)

    def make_teacher(self, model: nn.Module) -> nn.Module:
        """A frozen teacher partitioned like the student (:class:`Zero3Teacher`): this rank's slices only."""
        teacher = Zero3Teacher(model, self.group, self.timeout_s)
        teacher.requires_grad_(False)
        return teacher

    def _z3_valid(self, p: nn.Parameter) -> int:
        """Entries of ``p.ds_tensor`` that belong to the parameter (the rest is padding)."""
        part = p.ds_tensor.numel()
        return max(0, min(part, p.ds_numel - self.rank * part))

    def piece(self, p: nn.Parameter) -> tuple[int, int]:
        return self.rank * p.ds_tensor.numel(), self._z3_valid(p)

    def local_grad(self, p: nn.Parameter) -> torch.Tensor | None:
        from deepspeed.utils import safe_get_local_grad

        g = safe_get_local_grad(p)
        return None if g is None else g.reshape(-1)[: self._z3_valid(p)]

    def grad_piece(self, p: nn.Parameter) -> torch.Tensor:
        g = self.local_grad(p)
        if g is None:
            raise AssertionError("no local gradient: call observe() between engine.backward and engine.step")
        return g

    def whole_shape(self, p: nn.Parameter) -> torch.Size:
        return p.ds_shape

    def global_numel(self, p: nn.Parameter) -> int:
        return int(p.ds_numel)

    def local_weights(self, params: Mapping[Key, nn.Parameter]) -> dict[Key, torch.Tensor]:
        """Copies of the fp32 master slices (frozen LoRA base weights: their only copy, ``ds_tensor``)."""
        from deepspeed.utils import safe_get_local_fp32_param

        out = {}
        for k, p in params.items():
            if p.requires_grad:
                out[k] = safe_get_local_fp32_param(p).reshape(-1)[: self._z3_valid(p)].clone()
            else:
                out[k] = p.ds_tensor.reshape(-1)[: self._z3_valid(p)].float().clone()
        return out

    def store_weight(self, param: nn.Parameter, local_piece: torch.Tensor) -> None:
        """Write the merged slice into the fp32 master and the low-precision shard."""
        valid = self._z3_valid(param)
        param.ds_tensor.data.reshape(-1)[:valid].copy_(local_piece.to(param.ds_tensor.dtype))
        if param.requires_grad:
            from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

            master = safe_get_local_fp32_param(param).reshape(-1).clone()
            master[:valid] = local_piece
            safe_set_local_fp32_param(param, master)
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        if getattr(param, "ds_persist", False) or param.ds_status == ZeroParamStatus.AVAILABLE:
            self._refresh_whole(param)

    def _refresh_whole(self, param: nn.Parameter) -> None:
        """A parameter ZeRO-3 keeps whole on every rank besides its slice (a "persistent" one, under
        ``stage3_param_persistence_threshold``): the forward reads that whole copy and nothing refreshes it from
        the slices of a frozen parameter (a LoRA base weight), so it is re-assembled from every rank's
        edited slice here (an all-gather: every rank stores the same parameters in the same order)."""
        whole = _assemble(
            param.ds_tensor.detach(), param.ds_shape, int(param.ds_numel), self.group, self.timeout_s
        )
        param.data.copy_(whole.to(param.data.dtype))

    def transform_weight(self, param: nn.Parameter, fn: Callable[[torch.Tensor], torch.Tensor]) -> int:
        """The whole fp32 weight assembled from every rank's master slice (frozen: its ``ds_tensor`` slice), one
        all-gather of this matrix; ``fn`` on every rank; this rank's slice of the result stored in every copy."""
        from deepspeed.utils import safe_get_local_fp32_param

        part, valid = param.ds_tensor.numel(), self._z3_valid(param)
        src = safe_get_local_fp32_param(param) if param.requires_grad else param.ds_tensor
        piece = torch.zeros(part, dtype=torch.float32)
        piece[:valid] = src.reshape(-1)[:valid].float()
        whole = _assemble(piece, param.ds_shape, int(param.ds_numel), self.group, self.timeout_s)
        new = fn(whole).float().reshape(-1)
        start = self.piece(param)[0]
        self.store_weight(param, new[start : start + valid].clone())
        return part * 4 * (self.world_size - 1)

    def reset_optimizer_state(self, stepper: Any, params: Sequence[nn.Parameter]) -> None:
        """Zero this rank's slices of the moments of ``params`` in the (rebuilt) engine's optimizer."""
        from deepspeed.utils import safe_get_local_optimizer_state, safe_set_local_optimizer_state

        for p in params:
            if not p.requires_grad:
                continue
            for key in ("exp_avg", "exp_avg_sq"):
                value = safe_get_local_optimizer_state(p, key)
                if value is not None:
                    safe_set_local_optimizer_state(p, torch.zeros_like(value), key)

    # the base class's apply_merge (shard-local, through local_weights / store_weight) is exact here

    def kept_groups(self, gone: set[int], n_groups: int) -> list[list[nn.Parameter]]:
        opt = self.engine.optimizer  # ZeRO-3 splits each client group into sub-groups
        kept: list[list[nn.Parameter]] = [[] for _ in range(n_groups)]
        for i, sub in enumerate(opt.fp16_groups):
            kept[opt.sub_group_to_group_id[i]].extend(p for p in sub if id(p) not in gone)
        return kept

    def flat_partitions(self) -> list[torch.Tensor]:
        return list(self.engine.optimizer.fp32_partitioned_groups_flat)

    def read_state(self, p: nn.Parameter, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        out = {"fp32": safe_get_local_fp32_param(p).clone()}
        for k in keys:
            out[k] = safe_get_local_optimizer_state(p, k).clone()
        return out

    def write_state(self, entry: dict[str, Any], keys: Sequence[str]) -> None:
        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

        p = entry["param"]
        safe_set_local_fp32_param(p, entry["fp32"])
        for k in keys:
            safe_set_local_optimizer_state(p, entry[k], k)


class Zero3Teacher(nn.Module):
    """The distillation teacher under ZeRO-3, partitioned like the student: each rank keeps a copy of its own
    slice of every parameter (``ds_tensor``), and the teacher's forward gathers one decoder layer at a time
    (the embeddings, final norm and head for the whole forward) and frees it after the layer ran -- what
    ZeRO-3 does for the student, without an engine (no optimizer, no gradients, no DeepSpeed hooks).

    The module itself is built on the meta device from the student's class and config (a peft student's base
    model, its plain LoRA adapters merged into the slices: :meth:`_merge_lora`); ``state_dict()`` is this
    rank's slices (what a checkpoint saves while the teacher lives)."""

    inner: nn.Module

    def __init__(self, model: nn.Module, group: Any, timeout_s: float | None) -> None:
        super().__init__()
        self.timeout_s = timeout_s
        import copy

        from gradpruner_ds.arch import decoder_layers

        self.group = group
        peft = is_peft(model)
        base = model.get_base_model() if peft else model  # type: ignore[operator]
        with torch.device("meta"):
            inner = type(base)(copy.deepcopy(base.config))
        inner.eval()
        object.__setattr__(self, "inner", inner)  # not a submodule: its (meta) parameters are not state
        self.shapes: dict[str, tuple[torch.Size, int]] = {}
        for name, p in model.named_parameters():  # this rank's slices, copied (the student trains on)
            if ".lora_" not in name:
                t = teacher_name(name, peft)
                self.register_buffer(_key(t), p.ds_tensor.detach().clone())
                self.shapes[t] = (p.ds_shape, int(p.ds_numel))
        if peft:
            self._merge_lora(model)
        student_buffers = {teacher_name(n, peft): b for n, b in model.named_buffers()}
        for name, _ in inner.named_buffers():  # rotary tables and the like: whole on every rank
            mod, _, attr = name.rpartition(".")
            inner.get_submodule(mod)._buffers[attr] = student_buffers[name].detach().clone()
        # every place a parameter sits (tied weights sit in two), grouped by decoder layer
        places: dict[str, list[tuple[nn.Module, str]]] = {}
        for name, _ in inner.named_parameters(remove_duplicate=False):
            mod, _, attr = name.rpartition(".")
            places.setdefault(name, []).append((inner.get_submodule(mod), attr))
        canonical = {id(p): n for n, p in inner.named_parameters()}
        alias = {n: canonical[id(p)] for n, p in inner.named_parameters(remove_duplicate=False)}
        self.places = {
            n: [pl for a, pls in places.items() if alias[a] == n for pl in pls] for n in self.shapes
        }
        layers = decoder_layers(inner)
        by_layer: dict[int, list[str]] = {id(layer): [] for layer in layers}
        layer_of = {id(m): id(layer) for layer in layers for m in layer.modules()}
        outside: list[str] = []
        for n in self.shapes:
            owner = layer_of.get(id(self.places[n][0][0]))
            (by_layer[owner] if owner is not None else outside).append(n)
        for layer in layers:
            names = by_layer[id(layer)]
            layer.register_forward_pre_hook(lambda m, a, names=names: self._gather(names))
            layer.register_forward_hook(lambda m, a, o, names=names: self._release(names))
        self.outside = outside

    def _merge_lora(self, model: nn.Module) -> None:
        """Plain LoRA adapters merged into this rank's slice of each base weight: ``W + scaling * B @ A`` on
        the entries of the flattened ``W`` the slice holds (only the rows of ``B`` they touch; ``A`` and ``B``,
        small, gathered whole -- a collective, in the same module order on every rank)."""
        from deepspeed import zero

        rank = torch.distributed.get_rank(self.group)
        with torch.no_grad():
            for name, m, adapters in unmerged_lora_layers(model):
                w: Any = m.get_submodule("base_layer").weight
                piece = getattr(self, _key(teacher_name(name, True) + ".weight"))
                start = rank * piece.numel()
                n = max(0, min(piece.numel(), int(w.ds_numel) - start))
                for a_weight, b_weight, scaling in adapters:
                    with zero.GatheredParameters([a_weight, b_weight]):
                        delta = product_flat_slice(b_weight.data, a_weight.data, start, n) * scaling
                        piece[:n] += delta.to(piece.dtype)

    def _gather(self, names: list[str]) -> None:
        for n in names:
            shape, numel = self.shapes[n]
            full = _assemble(getattr(self, _key(n)), shape, numel, self.group, self.timeout_s)
            for mod, attr in self.places[n]:
                mod._parameters[attr] = nn.Parameter(full, requires_grad=False)

    def _release(self, names: list[str]) -> None:
        for n in names:
            shape, _ = self.shapes[n]
            empty = nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False)
            for mod, attr in self.places[n]:
                mod._parameters[attr] = empty

    def forward(self, **inputs: Any) -> Any:
        self._gather(self.outside)
        try:
            with torch.no_grad():
                return self.inner(**inputs)
        finally:
            self._release(self.outside)


def _assemble(
    shard: torch.Tensor, shape: torch.Size, numel: int, group: Any, timeout_s: float | None
) -> torch.Tensor:
    """The whole parameter from every rank's flat ZeRO-3 slice (an all-gather over ``group``, bounded)."""
    pieces = all_gather(shard.reshape(-1).contiguous(), timeout_s, group, "a ZeRO-3 weight gather")
    return torch.cat(pieces)[:numel].view(shape)


def _key(name: str) -> str:
    """A parameter name as a buffer name (no dots)."""
    return name.replace(".", "__")
