"""How the kept parameters' optimizer state crosses the surgery, per engine.

* One process and FSDP2 keep the torch optimizer object: the removed parameters leave its groups and state
  (:func:`prune_torch_optimizer_`); every kept parameter's state (Adam's ``exp_avg``, ``exp_avg_sq``, ``step``;
  FSDP2: its local shards) stays as it is, and the LR scheduler keeps pointing at the same optimizer.
* DeepSpeed needs a new engine over the pruned module (its flat fp32 partitions are built at
  ``deepspeed.initialize``): :class:`CarriedState` reads each kept parameter's fp32 master and moments before the
  old engine is torn down and writes them into the new one, through the stage's hooks (``read_state`` /
  ``write_state``: ZeRO-3 copies its slices locally, ZeRO-1/2 re-assembles each parameter, since its fragments
  move when the partitions shrink).
* ``repair``'s folded weights may have their moments reset afterwards: the adapter's ``reset_optimizer_state``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def prune_torch_optimizer_(optimizer: torch.optim.Optimizer, removed_params: list[nn.Parameter]) -> None:
    """Remove ``removed_params`` from a torch optimizer's groups and state, in place."""
    gone = {id(p) for p in removed_params}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in gone]
    for p in removed_params:
        optimizer.state.pop(p, None)


def adam_step(client: torch.optim.Optimizer) -> Any:
    """The step count of an Adam-style optimizer's state (0 before its first step)."""
    for st in client.state.values():
        if "step" in st:
            return st["step"].clone() if torch.is_tensor(st["step"]) else st["step"]
    return torch.tensor(0.0)


class CarriedState:
    """The kept parameters' fp32 masters, moments and step, read from a DeepSpeed engine before its teardown and
    written into its successor (``backend``: the stage's adapter, whose ``read_state`` / ``write_state`` /
    ``flat_partitions`` / ``link_state`` hooks know where the pieces are)."""

    def __init__(
        self, backend: Any, client: torch.optim.Optimizer, kept: Sequence[Sequence[nn.Parameter]]
    ) -> None:
        self.backend = backend
        self.step = adam_step(client)
        moments = any("exp_avg" in st for st in client.state.values())  # none before the first step
        self.keys: tuple[str, ...] = ("exp_avg", "exp_avg_sq") if moments else ()
        if moments:
            backend.link_state()
        self.entries = {
            id(p): {"param": p, "frag": backend.piece(p), **backend.read_state(p, self.keys)}
            for g in kept
            for p in g
        }

    def write(self, engine: Any) -> None:
        """Into the new engine: torch Adam creates its state lazily at the first step, so it is created here and
        filled with the carried pieces."""
        for flat in self.backend.flat_partitions():
            engine.optimizer.optimizer.state[flat] = {
                "step": self.step.clone() if torch.is_tensor(self.step) else self.step,
                "exp_avg": torch.zeros_like(flat),
                "exp_avg_sq": torch.zeros_like(flat),
            }
        self.backend.link_state()
        for entry in self.entries.values():
            self.backend.write_state(entry, self.keys)
        self.entries.clear()
