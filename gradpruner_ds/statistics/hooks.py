"""What the hidden-state statistics share: forward hooks on every decoder layer, counted only inside the
model's own training forward, and a pending table committed once per optimizer step.

* Which forwards count: those that build a graph (gradients enabled; in training mode also without, for
  callers that measure under ``no_grad``), so a model left in eval mode by ``from_pretrained`` is still
  measured and evaluation forwards under ``no_grad`` are not. The layer hooks count only between a
  pre/post hook pair on the model, so a checkpointing wrapper that recomputes a layer during the backward
  (outside the model forward) never counts it twice or out of order; transformers' checkpointing (either
  ``use_reentrant`` mode) keeps module hooks outside the recompute anyway.
* Padding: the ``attention_mask`` of the model call (2-D, 1 = real token) is captured by the model
  pre-hook and excludes padding positions.
* Steps: every forward adds into a PENDING table; :meth:`update` (once per optimizer step, when the
  pruner knows whether the step's gradients were finite) adds it to the table or discards it, so every
  statistic excludes exactly the steps IGIA excludes. On an accelerator the pending sums stay on the
  device (a float64 twin, no host sync per layer) until the commit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradpruner_ds.arch import decoder_layers, unwrap_model
from gradpruner_ds.statistics.base import Statistic


class LayerHookStatistic(Statistic):
    """Base of the statistics read from decoder-layer forwards: a ``[rows, num_layers]`` float64 table.

    Subclasses implement :meth:`_layer` (called for every counted layer forward with the layer index, its
    input and output hidden states and the token mask) and may override :meth:`_forward_done`.
    """

    rows: int

    def __init__(
        self,
        model: nn.Module,
        rows: int,
        *,
        shape: tuple[int, ...] | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.layers = decoder_layers(model)
        self.num_layers = len(self.layers)
        self.rows = rows
        # ``[rows, num_layers]`` unless a subclass lays its table out otherwise (``shape``)
        self._table = torch.zeros(shape or (rows, self.num_layers), dtype=dtype)
        self._pending = torch.zeros_like(self._table)  # this step's forwards until update()
        self._dev_pending: torch.Tensor | None = None  # pending sums on an accelerator, see _acc
        self._mask: torch.Tensor | None = None
        self._in_model_forward = False
        self.paused = False
        self.forwards = 0  # model forwards counted
        hf = unwrap_model(model)
        self._handles: list[RemovableHandle] = [
            hf.register_forward_pre_hook(self._begin_forward, with_kwargs=True),
            hf.register_forward_hook(self._end_forward),
        ]
        for idx, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(self._make_hook(idx), with_kwargs=True))

    # ---- hooks ----------------------------------------------------------------------------------
    def _begin_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]
        self._mask = mask.detach() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self._in_model_forward = True
        self._forward_begun()

    def _end_forward(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._in_model_forward = False
        self._forward_done(module)

    def _forward_begun(self) -> None:
        """A model forward starts (before any layer)."""

    def _forward_done(self, module: nn.Module) -> None:
        """A model forward ended."""

    def token_mask(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The model call's attention mask when it matches ``hidden``'s token dimensions, else None."""
        mask = self._mask
        if mask is None or tuple(mask.shape) != tuple(hidden.shape[:-1]):
            return None
        return mask.to(hidden.device)

    def _make_hook(self, idx: int):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if self.paused or not self._in_model_forward or not (module.training or torch.is_grad_enabled()):
                return
            h_in = kwargs.get("hidden_states", args[0] if args else None)
            h_out = output[0] if isinstance(output, tuple | list) else output
            if not isinstance(h_in, torch.Tensor) or not isinstance(h_out, torch.Tensor):
                return
            if idx == 0:
                self.forwards += 1
            self._layer(idx, h_in, h_out, self.token_mask(h_out))

        return hook

    def _layer(self, idx: int, h_in: torch.Tensor, h_out: torch.Tensor, mask: torch.Tensor | None) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def _acc(self, device: torch.device) -> torch.Tensor:
        """Where this forward's sums go: the pending table on CPU; a float64 twin on an accelerator."""
        if device.type == "cpu":
            return self._pending
        if self._dev_pending is None or self._dev_pending.device != device:
            if self._dev_pending is not None:
                self._pending += self._dev_pending.cpu()
            self._dev_pending = torch.zeros_like(self._table, device=device)
        return self._dev_pending

    # ---- the statistic protocol ------------------------------------------------------------------
    @torch.no_grad()
    def update(self, ok: bool, scale: float = 1.0) -> None:
        """Add the step's forwards to the table (``ok``) or discard them. Pending tables are zeroed in place:
        gradient hooks of this step's graph hold them."""
        if ok:
            self._table += self._pending
            if self._dev_pending is not None:
                self._table += self._dev_pending.cpu()
        self._pending.zero_()
        if self._dev_pending is not None:
            self._dev_pending.zero_()

    def partial_table(self) -> torch.Tensor:
        """This rank's partial table of the committed steps (a CPU copy)."""
        return self._table.clone()

    def _settings(self) -> dict[str, Any]:
        """What the table was collected for (checked on load)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"table": self._table.clone(), **self._settings()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key, value in self._settings().items():
            if state.get(key) != value:
                raise AssertionError(
                    f"{self.name} statistics of another setup ({key}: {state.get(key)} != {value})"
                )
        if tuple(state["table"].shape) != tuple(self._table.shape):
            raise AssertionError(f"{self.name} table of another model")
        self._table = state["table"].clone().to(self._table.dtype)
        self.update(False)

    def pause(self, paused: bool) -> None:
        self.paused = paused

    def close(self) -> None:
        """Remove every hook and free the buffered states (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._mask = None
        self._in_model_forward = False

    @property
    def active(self) -> bool:
        """True while the hooks are registered."""
        return bool(self._handles)
