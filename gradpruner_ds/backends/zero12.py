# DeepSpeed attaches its partitioning state (_hp_mapping, _index_in_param_group) to Parameter objects:
# mypy: disable-error-code="attr-defined"
"""DeepSpeed ZeRO-1/2: the low-precision parameters are replicated; the fp32 master and the optimizer state
are flat partitions whose boundaries do not respect parameters, and ``p._hp_mapping`` names this rank's
fragment of each parameter (offsets differ from parameter to parameter). The fragment of the reduced
gradient is ``get_lp_grad_fragment``. Fragments of different parameters do not line up, so the merge and
the carried state are assembled one parameter at a time (sums of disjoint pieces)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gradpruner_ds.backends.deepspeed import DeepSpeedBackend
from gradpruner_ds.core.igia import Key
from gradpruner_ds.core.merge import MergeRule
from gradpruner_ds.engine import MergeGroup


class Zero12Backend(DeepSpeedBackend):
    """ZeRO-1/2 pieces: a parameter's fragment of the flat partition this rank owns."""

    def piece(self, p: nn.Parameter) -> tuple[int, int]:
        if not p.requires_grad:  # replicated frozen weight (LoRA base): split evenly, like ZeRO-3
            part = -(-p.numel() // self.world_size)
            return min(self.rank * part, p.numel()), max(0, min(part, p.numel() - self.rank * part))
        hm = getattr(p, "_hp_mapping", None)
        if hm is None:
            return 0, 0
        return hm.lp_fragment_address.start, hm.lp_fragment_address.numel

    def local_grad(self, p: nn.Parameter) -> torch.Tensor | None:
        return self.grad_piece(p)

    def grad_piece(self, p: nn.Parameter) -> torch.Tensor:
        hm = getattr(p, "_hp_mapping", None)
        if hm is None:
            return torch.zeros(0, dtype=torch.float32)
        g = hm.get_lp_grad_fragment(p._index_in_param_group).reshape(-1)
        start, numel = self.piece(p)
        if g.numel() == p.numel() and numel != p.numel():  # bf16 keeps a full accumulation buffer
            g = g.narrow(0, start, numel)
        return g

    def whole_shape(self, p: nn.Parameter) -> torch.Size:
        return p.shape

    def global_numel(self, p: nn.Parameter) -> int:
        return p.numel()

    def local_weights(self, params: Mapping[Key, nn.Parameter]) -> dict[Key, torch.Tensor]:
        """Views into this rank's fp32 master fragments (frozen weights: this rank's even split)."""
        out = {}
        for k, p in params.items():
            hm = getattr(p, "_hp_mapping", None)
            if hm is not None:
                out[k] = hm.get_hp_fragment().data.reshape(-1)
            else:
                start, numel = self.piece(p)
                out[k] = p.data.reshape(-1)[start : start + numel].float()
        return out

    def _full_fp32(self, p: nn.Parameter) -> torch.Tensor:
        """The whole fp32 value of one parameter from the ranks' master fragments."""
        hm = getattr(p, "_hp_mapping", None)
        if not p.requires_grad:
            return p.data.float().clone()  # frozen: replicated, never in the optimizer
        buf = torch.zeros(p.numel(), dtype=torch.float32)
        if hm is not None:
            start, numel = self.piece(p)
            buf[start : start + numel] = hm.get_hp_fragment().reshape(-1)
        self.all_reduce_sum_(buf)
        return buf.view(p.shape)

    def whole_value(self, p: nn.Parameter) -> torch.Tensor:
        return self._full_fp32(p).clone()

    def store_whole(self, p: nn.Parameter, value: torch.Tensor) -> None:
        """This rank's fp32 master fragment and the replicated low-precision copy."""
        hm = getattr(p, "_hp_mapping", None)
        if hm is not None:
            start, numel = self.piece(p)
            hm.get_hp_fragment().data.reshape(-1).copy_(value.reshape(-1)[start : start + numel])
        p.data.copy_(value.to(p.dtype))

    def apply_merge(
        self,
        params: Mapping[Key, nn.Parameter],
        groups: Sequence[MergeGroup],
        merge_rule: MergeRule,
        sign_consistent: bool = True,
    ) -> dict[Key, tuple[int, int]]:
        """Masks and fp32 values assembled from the fragments, the same merge on every rank (``merge_whole``)."""
        return self.merge_whole(params, groups, merge_rule, sign_consistent)

    def transform_weight(self, param: nn.Parameter, fn: Callable[[torch.Tensor], torch.Tensor]) -> int:
        """The whole fp32 value from the ranks' master fragments (one all-reduce of this matrix), ``fn`` on every
        rank, then this rank's master fragment and the replicated low-precision copy written."""
        whole = self._full_fp32(param)
        self.store_whole(param, fn(whole).float())
        return whole.numel() * 4 if param.requires_grad else 0

    def reset_optimizer_state(self, stepper: Any, params: Sequence[nn.Parameter]) -> None:
        """Zero this rank's fragments of the moments of ``params`` in the (rebuilt) engine's optimizer."""
        opt = stepper.optimizer
        if not any("exp_avg" in st for st in opt.optimizer.state.values()):
            return  # no moments yet
        self.link_state()
        for p in params:
            hm = getattr(p, "_hp_mapping", None)
            if hm is None:
                continue
            for key in ("exp_avg", "exp_avg_sq"):
                hm.get_optim_state_fragment(key).data.zero_()

    def kept_groups(self, gone: set[int], n_groups: int) -> list[list[nn.Parameter]]:
        kept: list[list[nn.Parameter]] = [[] for _ in range(n_groups)]
        for i, grp in enumerate(self.engine.optimizer.bit16_groups):
            kept[i].extend(p for p in grp if id(p) not in gone)
        return kept

    def flat_partitions(self) -> list[torch.Tensor]:
        return list(self.engine.optimizer.single_partition_of_fp32_groups)

    def link_state(self) -> None:
        """DeepSpeed links each fragment to the optimizer state once, right after the FIRST param group has
        stepped, so with several groups (the HF Trainer's decay / no-decay split) the later groups' fragments
        point at a still-empty state: link again whenever the state exists."""
        opt = self.engine.optimizer
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()

    def read_state(self, p: nn.Parameter, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        hm = p._hp_mapping
        if hm is None:
            return {}
        out = {"fp32": hm.get_hp_fragment().clone()}
        for k in keys:
            out[k] = hm.get_optim_state_fragment(k).clone()
        return out

    def write_state(self, entry: dict[str, Any], keys: Sequence[str]) -> None:
        """The fragments moved: assemble one parameter at a time from the old fragments of every rank."""
        p = entry["param"]
        old_start, old_numel = entry["frag"]
        hm = p._hp_mapping
        new_start, new_numel = self.piece(p)
        for key in ("fp32", *keys):
            buf = torch.zeros(p.numel(), dtype=torch.float32)
            if key in entry:
                buf[old_start : old_start + old_numel] = entry[key].reshape(-1)
            self.all_reduce_sum_(buf)
            if hm is not None:
                dst = hm.get_hp_fragment() if key == "fp32" else hm.get_optim_state_fragment(key)
                dst.data.reshape(-1).copy_(buf[new_start : new_start + new_numel])
