"""Hidden-state statistics for the activation criteria (ShortGPT block influence, Gromov angular distance).

:class:`ActivationCollector` registers forward hooks on the decoder layers for the observation window.
For every training forward it compares the residual-stream hidden state entering a block of ``s``
consecutive layers with the one leaving it, per token, and accumulates ADDITIVE partial sums:

* ``sum over tokens of (1 - cos(h_l, h_{l+s}))``        (block influence, ShortGPT)
* ``sum over tokens of arccos(cos(h_l, h_{l+s})) / pi``  (angular distance, Gromov et al.)
* ``number of tokens``

where ``h_l`` is the input of decoder layer ``l`` and ``h_{l+s}`` the output of layer ``l+s-1``.
Padding positions (``attention_mask == 0`` of the model call) are excluded.

With ``gate_grads=True`` it also accumulates, per layer ``l`` and per sequence ``e`` of the batch, the
derivative of the loss with respect to a scalar gate on the layer's residual update
``h_{l+1} = h_l + a_l * f_l(h_l)`` at ``a_l = 1``: ``s_{l,e} = sum over the tokens of e of
<dL/dh_{l+1}, h_{l+1} - h_l>`` (read by a gradient hook on the layer output), as
``sum_e s_{l,e} ** 2`` (per-example empirical Fisher of the gate), ``sum_e s_{l,e}`` and the number of
sequences.

Table layout (float64, ``[2 * len(spans) + 4, num_layers]``): for span index ``i`` row ``2i`` holds the
(1 - cos) sums and row ``2i + 1`` the angular sums of the block that STARTS at layer ``l`` (zero where
the block would run past the last layer); rows ``-4, -3, -2`` hold the gate sums ``sum_e s**2``,
``sum_e s`` and the sequence count (zeros without ``gate_grads``); the last row holds the number of tokens seen by layer ``l`` (equal in every column after whole
forwards).
Every entry is a sum over tokens, so the tables of disjoint data shards (data-parallel ranks,
micro-batches) add up to the table of the whole batch: one all-reduce (SUM) gives exact global means.

Gradient checkpointing: the layer hooks count only inside the model's own forward (a pre/post hook pair on
the model), so a wrapper that recomputes a layer during the backward never counts it twice or out of
order; transformers' checkpointing (either ``use_reentrant`` mode) keeps module hooks outside the
recompute anyway, and the tables equal those without checkpointing (tested).

Steps: every forward adds into a PENDING table; :meth:`commit` (called by the pruner once per optimizer step,
when it knows whether the step's gradients were finite) adds it to the table or discards it, so the
statistics exclude exactly the steps the IGIA excludes. :meth:`table` is the committed table.

The hooks collect during forwards that build a graph (gradients enabled; in training mode also without,
for callers that measure under ``no_grad``), so a model left in eval mode by ``from_pretrained`` is still
measured and evaluation forwards under ``no_grad`` are not. They cost nothing once :meth:`remove` is called,
and keep references to at most ``max(spans) + 1`` hidden states during a forward (held by autograd
anyway) plus one normalised copy (the last layer output, reused as the next layer's input). On an
accelerator the sums stay on the device until :meth:`table` (no host sync per layer).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradpruner_ds.arch import decoder_layers, unwrap_model
from gradpruner_ds.errors import user_error

__all__ = [
    "ActivationCollector",
    "cos_stats",
    "pair_stats",
    "table_rows",
    "GATE_SQ_ROW",
    "GATE_SUM_ROW",
    "GATE_COUNT_ROW",
]

GATE_SQ_ROW, GATE_SUM_ROW, GATE_COUNT_ROW = -4, -3, -2
"""Rows of the gate statistics (counted from the end of the table)."""


def table_rows(span_index: int) -> tuple[int, int]:
    """Rows of the (1 - cos) sums and of the angular sums for the ``span_index``-th span."""
    return 2 * span_index, 2 * span_index + 1


def cos_stats(cos: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[sum(1 - cos), sum(arccos(cos) / pi), count]`` over per-token cosines (float64, on their device).

    ``mask`` (broadcastable to ``cos``, 1 = real token) excludes padding.
    """
    cos = cos.double().clamp(-1.0, 1.0)
    ang = torch.arccos(cos) / math.pi
    w = torch.ones_like(cos) if mask is None else mask.to(cos.dtype).expand_as(cos)
    return torch.stack([((1.0 - cos) * w).sum(), (ang * w).sum(), w.sum()])


def pair_stats(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`cos_stats` of two ``[..., hidden]`` tensors (``mask`` broadcastable to ``a.shape[:-1]``)."""
    return cos_stats(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8), mask)


class ActivationCollector:
    """Forward hooks on every decoder layer of ``model`` that accumulate the block statistics.

    ``spans``: block lengths to measure (1 = single layers, for block influence; ``n`` = the pruning
    budget, for the angular criterion). Call :meth:`table` for this process's partial table and
    :meth:`remove` when the window is over.
    """

    def __init__(self, model: nn.Module, spans: Sequence[int], gate_grads: bool = False) -> None:
        self.layers = decoder_layers(model)
        self.num_layers = len(self.layers)
        self.spans = tuple(sorted(set(int(s) for s in spans)))
        if not self.spans or self.spans[0] < 1 or self.spans[-1] > self.num_layers:
            raise user_error(
                f"activation block spans must lie in [1, {self.num_layers}]",
                self.spans,
                "use a pruning budget smaller than the number of decoder layers",
            )
        hf = unwrap_model(model)
        self.gate_grads = gate_grads
        self._table = torch.zeros(2 * len(self.spans) + 4, self.num_layers, dtype=torch.float64)
        self._pending = torch.zeros_like(self._table)  # this step's forwards until commit()
        self._mask: torch.Tensor | None = None
        self._states: dict[int, torch.Tensor] = {}
        self._unit_out: tuple[torch.Tensor, torch.Tensor] | None = None  # (last output, normalised)
        self._dev_pending: torch.Tensor | None = None  # pending sums on an accelerator, see _acc
        self.forwards = 0
        self.paused = False  # set by GradPruner.paused(): forwards are not measured
        self._in_model_forward = False
        self._gate_hooks_this_forward = 0
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
        self._gate_hooks_this_forward = 0

    def _end_forward(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._in_model_forward = False
        if self.gate_grads and torch.is_grad_enabled() and not self._gate_hooks_this_forward:
            raise user_error(
                "'gate_fisher' reads the gradient of each decoder layer's output, but this training forward "
                "produced no layer output that requires grad (a checkpointing wrapper that runs the layers "
                "without grad in the forward, e.g. reentrant checkpointing applied around the layer's __call__)",
                type(module).__name__,
                "use transformers' activation (gradient) checkpointing (either mode), disable the wrapper during "
                "the observation window, or use 'shortgpt_bi'",
            )

    def _token_mask(self, hidden: torch.Tensor) -> torch.Tensor | None:
        mask = self._mask
        if mask is None or tuple(mask.shape) != tuple(hidden.shape[:-1]):
            return None
        return mask.to(hidden.device)

    def _make_hook(self, idx: int):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            # only the model's own training forward: a checkpointing wrapper that recomputes the layer in
            # the backward (outside the model forward) must not count it twice or out of order
            if self.paused or not self._in_model_forward or not (module.training or torch.is_grad_enabled()):
                return
            h_in = kwargs.get("hidden_states", args[0] if args else None)
            h_out = output[0] if isinstance(output, tuple | list) else output
            if not isinstance(h_in, torch.Tensor) or not isinstance(h_out, torch.Tensor):
                return
            self._observe(idx, h_in.detach(), h_out.detach())
            if self.gate_grads and h_out.requires_grad:
                self._gate_hook(idx, h_out, h_in, self._token_mask(h_out))

        return hook

    @torch.no_grad()
    def _acc(self, device: torch.device) -> torch.Tensor:
        """Where this forward's sums go: the pending table on CPU; a float64 twin on an accelerator (no
        device-to-host copy, hence no sync, per layer; :meth:`commit` adds it in)."""
        if device.type == "cpu":
            return self._pending
        if self._dev_pending is None or self._dev_pending.device != device:
            if self._dev_pending is not None:
                self._pending += self._dev_pending.cpu()
            self._dev_pending = torch.zeros_like(self._table, device=device)
        return self._dev_pending

    @torch.no_grad()
    def commit(self, ok: bool) -> None:
        """End of an optimizer step: add its forwards' sums to the table (``ok``) or discard them (a step
        whose gradients were non-finite, or that a loss scaler skipped). Pending tables are zeroed in place:
        gradient hooks of this step's graph hold them."""
        if ok:
            self._table += self._pending
            if self._dev_pending is not None:
                self._table += self._dev_pending.cpu()
        self._pending.zero_()
        if self._dev_pending is not None:
            self._dev_pending.zero_()

    @staticmethod
    def _unit(h: torch.Tensor) -> torch.Tensor:
        """``h / ||h||`` per token, in fp32 (the cosine of two states is then a dot product)."""
        h = h.float()
        return h / torch.linalg.vector_norm(h, dim=-1, keepdim=True).clamp_min(1e-8)

    def _observe(self, idx: int, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        if idx == 0:
            self._states = {}
            self._unit_out = None
            self.forwards += 1
        mask = self._token_mask(h_out)
        self._states[idx] = h_in
        end = idx + 1  # h_out is the state at boundary idx + 1
        # the previous layer's output is (normally) this layer's input: normalised once, reused
        last = self._unit_out
        u_in = last[1] if last is not None and last[0] is h_in else None
        u_out = self._unit(h_out)
        acc = self._acc(h_out.device)
        for si, span in enumerate(self.spans):
            start = end - span
            if start < 0 or start not in self._states:
                continue
            if span == 1:
                if u_in is None:
                    u_in = self._unit(h_in)
                u_start = u_in
            else:
                u_start = self._unit(self._states[start])
            stats = cos_stats((u_start * u_out).sum(-1), mask)
            r_bi, r_ang = table_rows(si)
            acc[r_bi, start] += stats[0]
            acc[r_ang, start] += stats[1]
        acc[-1, idx] += mask.sum() if mask is not None else float(h_out.shape[:-1].numel())
        self._unit_out = (h_out, u_out)
        # keep only the states a later block can still start from
        oldest = end - self.spans[-1] + 1
        for k in [k for k in self._states if k < oldest]:
            del self._states[k]
        if idx == self.num_layers - 1:
            self._states = {}
            self._unit_out = None

    def _gate_hook(
        self, idx: int, h_out: torch.Tensor, h_in: torch.Tensor, mask: torch.Tensor | None
    ) -> None:
        delta = (h_out.detach() - h_in.detach()).float()
        table = self._acc(h_out.device)

        def on_grad(grad: torch.Tensor) -> None:
            if not self._handles:  # removed: a backward after the window records nothing
                return
            prod = (grad.detach().float() * delta).sum(-1)  # [batch, tokens]
            if mask is not None:
                prod = prod * mask.to(prod.dtype)
            per_seq = prod.reshape(prod.shape[0], -1).sum(-1).double() if prod.dim() > 1 else prod.double()
            table[GATE_SQ_ROW, idx] += per_seq.square().sum()
            table[GATE_SUM_ROW, idx] += per_seq.sum()
            table[GATE_COUNT_ROW, idx] += float(per_seq.numel())

        h_out.register_hook(on_grad)  # lives and dies with this forward's graph
        self._gate_hooks_this_forward += 1

    # ---- results --------------------------------------------------------------------------------
    def table(self) -> torch.Tensor:
        """This process's partial table of the committed steps (a CPU copy; layout: module docstring)."""
        return self._table.clone()

    def state_dict(self) -> dict[str, Any]:
        """The committed partial table and the spans it was collected for (resume inside the window)."""
        return {"table": self._table.clone(), "spans": list(self.spans), "gate_grads": self.gate_grads}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the spans and gate setting must match this collector's)."""
        if list(state["spans"]) != list(self.spans) or bool(state["gate_grads"]) != self.gate_grads:
            raise AssertionError("activation statistics of another criterion / budget")
        if tuple(state["table"].shape) != tuple(self._table.shape):
            raise AssertionError("activation table of another model")
        self._table = state["table"].clone().to(torch.float64)
        self.commit(False)

    def remove(self) -> None:
        """Remove every hook and free the buffered states (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._states = {}
        self._unit_out = None
        self._mask = None
        self._in_model_forward = False

    @property
    def active(self) -> bool:
        """True while the hooks are registered."""
        return bool(self._handles)
