# DeepSpeed attaches its partitioning state (ds_tensor, ds_numel, ds_shape) to Parameter objects at run time:
# mypy: disable-error-code="attr-defined"
"""DeepSpeed ZeRO-3: every parameter is partitioned into flat slices of ``ceil(numel / world)`` entries per
rank (``p.ds_tensor``; padding at the end of the last rank). ``safe_get_local_grad(p)`` is this rank's slice
of the reduced gradient between ``engine.backward`` and ``engine.step``; ``safe_get/set_local_fp32_param`` and
``safe_get/set_local_optimizer_state`` address the fp32 master and Adam state of the same slice. Same-named
sublayers of different layers have the same shape, hence the same slices: the merge is shard-local, and
at the same world size the rebuilt engine keeps every slice, so the state is carried with local copies."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gradpruner_ds.backends.deepspeed import DeepSpeedBackend
from gradpruner_ds.core.igia import Key


class Zero3Backend(DeepSpeedBackend):
    """ZeRO-3 pieces: a parameter's slice is ``[rank * part, rank * part + valid)``."""

    teacher_refused = (
        "a distillation teacher sharded like the student under ZeRO-3 is not implemented (ZeRO-3's partitioned "
        "parameters cannot be copied as a module)"
    )

    def _z3_valid(self, p: nn.Parameter) -> int:
        """Entries of ``p.ds_tensor`` that belong to the parameter (the rest is padding)."""
        part = p.ds_tensor.numel()
        return max(0, min(part, p.ds_numel - self.rank * part))

    def _frag(self, p: nn.Parameter) -> tuple[int, int]:
        return self.rank * p.ds_tensor.numel(), self._z3_valid(p)

    def local_grad(self, p: nn.Parameter) -> torch.Tensor | None:
        from deepspeed.utils import safe_get_local_grad

        g = safe_get_local_grad(p)
        return None if g is None else g.reshape(-1)[: self._z3_valid(p)]

    def _local_grad(self, p: nn.Parameter) -> torch.Tensor:
        g = self.local_grad(p)
        if g is None:
            raise AssertionError("no local gradient: call observe() between engine.backward and engine.step")
        return g

    def _shape(self, p: nn.Parameter) -> torch.Size:
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

    # the base class's apply_merge (shard-local, through local_weights / store_weight) is exact here

    def _kept_groups(self, gone: set[int], n_groups: int) -> list[list[nn.Parameter]]:
        opt = self.engine.optimizer  # ZeRO-3 splits each client group into sub-groups
        kept: list[list[nn.Parameter]] = [[] for _ in range(n_groups)]
        for i, sub in enumerate(opt.fp16_groups):
            kept[opt.sub_group_to_group_id[i]].extend(p for p in sub if id(p) not in gone)
        return kept

    def _flat_partitions(self) -> list[torch.Tensor]:
        return list(self.engine.optimizer.fp32_partitioned_groups_flat)

    def _read_state(self, p: nn.Parameter, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        out = {"fp32": safe_get_local_fp32_param(p).clone()}
        for k in keys:
            out[k] = safe_get_local_optimizer_state(p, k).clone()
        return out

    def _write_state(self, entry: dict[str, Any], keys: Sequence[str]) -> None:
        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

        p = entry["param"]
        safe_set_local_fp32_param(p, entry["fp32"])
        for k in keys:
            safe_set_local_optimizer_state(p, entry[k], k)
