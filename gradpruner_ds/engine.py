"""The engine contract: everything :class:`~gradpruner_ds.pruner.GradPruner` asks of a training engine.

One implementation per engine, each in ``gradpruner_ds/backends/`` (:func:`gradpruner_ds.backends.backend_for`
picks it from the objects a training loop holds): plain PyTorch (``backends/plain.py``), DeepSpeed ZeRO-1/2/3
(``backends/zero12.py``, ``backends/zero3.py`` on ``backends/deepspeed.py``), FSDP2 (``backends/fsdp2.py``).
Nothing outside ``gradpruner_ds/backends/`` touches an engine's internals or names an engine's type
(``tests/unit/test_layering.py``). The sharded engines' shared hooks are written, abstract, in
``backends/sharded.py`` (:class:`~gradpruner_ds.backends.sharded.ShardedBackend`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from gradpruner_ds.core.igia import Key
from gradpruner_ds.core.merge import MergeRule
from gradpruner_ds.core.plan import PrunePlan

MergeGroup = tuple[Key, Sequence[tuple[Key, torch.Tensor]]]
"""(target matrix, [(merged matrix, this rank's piece of its top-p mask), ...])."""


@runtime_checkable
class EngineAdapter(Protocol):
    """The engine contract: everything :class:`~gradpruner_ds.pruner.GradPruner` asks of a training engine.
    One implementation per engine (module docstring).

    Where the pieces are: ``local_grad`` / ``full_grads`` / ``lora_grads`` (this rank's reduced gradient
    pieces), ``local_weights`` / ``global_numel`` / ``lora_slices`` (this rank's weight pieces, laid out
    like the gradient pieces). Across ranks: ``all_reduce_sum_``, ``all_true``, ``check_settings``,
    ``check_plan``, ``check_same`` (each bounded by ``timeout_s``). The step: ``at_boundary``, ``step_check`` (finite
    gradients and the clip / loss-scale factor applied after the read). Changing the model:
    ``apply_merge`` / ``store_weight`` (every copy of a weight the engine keeps) and ``rebuild`` (carry the
    kept parameters' optimizer state into the engine over the pruned model; returns the objects the loop
    uses from then on) and ``reset_optimizer_state``. Recovery: ``make_teacher`` (a frozen copy of the model laid out like it) unless
    ``teacher_refused`` says why this engine cannot. Reporting: ``log_events``.
    """

    rank: int
    world_size: int
    timeout_s: float | None
    teacher_refused: str | None

    def at_boundary(self) -> bool: ...
    def all_reduce_sum_(self, t: torch.Tensor) -> None: ...
    def all_true(self, flag: bool) -> bool: ...
    def check_settings(self, settings: dict[str, Any], timeout_s: float) -> None: ...
    def check_plan(self, plan: PrunePlan, timeout_s: float) -> None: ...
    def step_check(
        self,
        observed: Iterable[torch.Tensor],
        norms: torch.Tensor | None = None,
        params: Collection[nn.Parameter] = (),
    ) -> tuple[bool, float]: ...
    def local_grad(self, p: nn.Parameter) -> torch.Tensor | None: ...
    def full_grads(self, params: Mapping[Key, nn.Parameter]) -> dict[Key, torch.Tensor]: ...
    def lora_grads(
        self, factors: Mapping[Key, tuple[nn.Parameter, nn.Parameter]]
    ) -> dict[Key, tuple[torch.Tensor, torch.Tensor]]: ...
    def local_weights(self, params: Mapping[Key, nn.Parameter]) -> dict[Key, torch.Tensor]: ...
    def global_numel(self, p: nn.Parameter) -> int: ...
    def lora_slices(self, params: Mapping[Key, nn.Parameter]) -> dict[Key, tuple[int, int]] | None: ...
    def apply_merge(
        self,
        params: Mapping[Key, nn.Parameter],
        groups: Sequence[MergeGroup],
        merge_rule: MergeRule,
        sign_consistent: bool = True,
    ) -> dict[Key, tuple[int, int]]: ...
    def store_weight(self, param: nn.Parameter, local_piece: torch.Tensor) -> None: ...
    def transform_weight(self, param: nn.Parameter, fn: Callable[[torch.Tensor], torch.Tensor]) -> int: ...
    def reset_optimizer_state(self, stepper: Any, params: Sequence[nn.Parameter]) -> None: ...
    def check_same(self, digest: str, what: str) -> None: ...
    def log_events(self, events: Mapping[str, float], step: int) -> None: ...
    def make_teacher(self, model: nn.Module) -> nn.Module: ...
    def rebuild(
        self, model: nn.Module, removed_params: list[nn.Parameter], optimizer: Any, lr_scheduler: Any
    ) -> tuple[Any, Any]: ...
