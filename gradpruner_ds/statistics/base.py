"""The statistic contract: what GradPruner measures during the observation window, one class per statistic.

A statistic owns its table layout, its per-step update, its reduction over ranks and its state. The pruner
drives every statistic the same way, once per optimizer step of the window::

    reads = [s.step_gradients() for s in stats]        # the gradients a statistic reads this step (or None)
    ok, scale = backend.step_check(...)                # one finite check over what was read, on every rank
    for s in stats: s.update(ok, scale)               # add the step (ok) or leave it out of every statistic

and once when the window ends: ``table = s.reduce(backend)`` (this rank's partial table, one SUM
all-reduce, a check that the window measured something), the table a criterion scores. Every table entry
is a sum over tokens, sequences or weight entries, so the partial tables of disjoint data or weight shards
add up to the table of the whole batch and model: one all-reduce gives exact global statistics.

A criterion declares the statistics it reads (``Criterion.reads``); only those are collected, plus IGIA
for the merge masks when ``num_merge > 0`` (:func:`gradpruner_ds.statistics.required`).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from gradpruner_ds.arch import ArchSpec
from gradpruner_ds.config import GradPrunerConfig
from gradpruner_ds.core.criteria import Criterion
from gradpruner_ds.core.igia import Key
from gradpruner_ds.engine import EngineAdapter


class StepGradients(NamedTuple):
    """The gradient pieces a statistic reads at this step, for the pruner's one finite check of the step."""

    tensors: Sequence[torch.Tensor]
    norms: torch.Tensor | None = None
    """:func:`gradpruner_ds.core.igia.sq_norms` of ``tensors`` when the statistic computed them anyway."""
    params: Sequence[nn.Parameter] = ()
    """The parameters whose gradients ``tensors`` are (the engine may need them for its clip factor)."""


@dataclass(frozen=True)
class BuildContext:
    """What a statistic may read when it is built for a pruner."""

    model: nn.Module
    spec: ArchSpec
    config: GradPrunerConfig
    backend: EngineAdapter
    criterion: Criterion
    window: int
    num_layers: int
    budget: int
    """Layers removed in total (dropped + merged)."""
    num_merge: int


class Statistic(abc.ABC):
    """One statistic of the observation window (see the module docstring for the protocol)."""

    name: ClassVar[str]
    """Its key in ``Criterion.reads``, in ``GradPruner.statistics`` and in the pruner's state."""
    keys: Sequence[Key] = ()
    """The table's columns when they are matrices (IGIA: (layer, sublayer)); else the columns are layers."""
    spans: tuple[int, ...] = ()
    """Block lengths of the table's row groups (hidden states), in row order."""

    @classmethod
    @abc.abstractmethod
    def build(cls, ctx: BuildContext) -> Statistic:
        """The statistic for the pruner described by ``ctx`` (``gradpruner:`` errors for unusable setups)."""

    def step_gradients(self) -> StepGradients | None:
        """The gradient pieces this statistic reads at the end of this optimizer step (read once here and
        kept for :meth:`update`), or None when it reads none (the pruner then checks the trainable
        gradients)."""
        return None

    @abc.abstractmethod
    def update(self, ok: bool, scale: float = 1.0) -> None:
        """End of an optimizer step: add it (``ok``: its gradients are finite on every rank; ``scale``: the
        clip / loss-scale factor the engine applies after the gradients were read) or leave it out."""

    @abc.abstractmethod
    def partial_table(self) -> torch.Tensor:
        """This rank's partial table (float64; tables of disjoint shards add up)."""

    def check(self, table: torch.Tensor) -> None:  # noqa: B027 - optional hook, no-op by default
        """Raise a ``gradpruner:`` error when the GLOBAL table shows the window measured nothing usable."""

    def reduce(self, backend: EngineAdapter) -> torch.Tensor:
        """The global table: this rank's partial table summed over ranks (one all-reduce), checked."""
        table = self.partial_table()
        backend.all_reduce_sum_(table)
        self.check(table)
        return table

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """This rank's measured state (tensors and JSON-able values) to resume the window exactly."""

    @abc.abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (AssertionError when it belongs to another setup)."""

    def pause(self, paused: bool) -> None:  # noqa: B027 - optional hook
        """While paused, forwards are not measured (``GradPruner.paused()``)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """The window is over: remove hooks, free buffers and every reference to model parameters."""
