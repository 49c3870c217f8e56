"""Layer-gate gradients: the statistic of the ``gate_fisher`` criterion.

Per layer ``l`` and per sequence ``e`` of the batch: the derivative of the loss with respect to a scalar
gate on the layer's residual update ``h_{l+1} = h_l + a_l * f_l(h_l)`` at ``a_l = 1``,
``s_{l,e} = sum over the tokens of e of <dL/dh_{l+1}, h_{l+1} - h_l>``, read by a gradient hook on the
layer output during the backward of a counted forward (padding excluded).

Table layout (float64, ``[3, num_layers]``): row 0 ``sum_e s**2`` (per-example empirical Fisher of the
gate), row 1 ``sum_e s``, row 2 the number of sequences. Sums over sequences: the tables of disjoint data
shards add up. Which forwards count and steps: :mod:`.hooks`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gradpruner_ds.errors import user_error
from gradpruner_ds.statistics.base import BuildContext
from gradpruner_ds.statistics.hooks import LayerHookStatistic

SQ_ROW, SUM_ROW, COUNT_ROW = 0, 1, 2


class LayerGateStatistic(LayerHookStatistic):
    """Per-sequence gate gradients of every decoder layer (forward hooks + one gradient hook per layer)."""

    name = "layer_gates"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, 3)
        self._hooks_this_forward = 0

    @classmethod
    def build(cls, ctx: BuildContext) -> LayerGateStatistic:
        return cls(ctx.model)

    def _forward_begun(self) -> None:
        self._hooks_this_forward = 0

    def _forward_done(self, module: nn.Module) -> None:
        if torch.is_grad_enabled() and not self.paused and not self._hooks_this_forward:
            raise user_error(
                "'gate_fisher' reads the gradient of each decoder layer's output, but this training forward "
                "produced no layer output that requires grad (a checkpointing wrapper that runs the layers "
                "without grad in the forward, e.g. reentrant checkpointing applied around the layer's __call__)",
                type(module).__name__,
                "use transformers' activation (gradient) checkpointing (either mode), disable the wrapper during "
                "the observation window, or use 'shortgpt_bi'",
            )

    def _layer(self, idx: int, h_in: torch.Tensor, h_out: torch.Tensor, mask: torch.Tensor | None) -> None:
        if not h_out.requires_grad:
            return
        delta = (h_out.detach() - h_in.detach()).float()
        table = self._acc(h_out.device)

        def on_grad(grad: torch.Tensor) -> None:
            if not self._handles:  # closed: a backward after the window records nothing
                return
            prod = (grad.detach().float() * delta).sum(-1)  # [batch, tokens]
            if mask is not None:
                prod = prod * mask.to(prod.dtype)
            per_seq = prod.reshape(prod.shape[0], -1).sum(-1).double() if prod.dim() > 1 else prod.double()
            table[SQ_ROW, idx] += per_seq.square().sum()
            table[SUM_ROW, idx] += per_seq.sum()
            table[COUNT_ROW, idx] += float(per_seq.numel())

        h_out.register_hook(on_grad)  # lives and dies with this forward's graph
        self._hooks_this_forward += 1

    def check(self, table: torch.Tensor) -> None:
        if float(table[COUNT_ROW].sum()) == 0.0:
            raise user_error(
                "'gate_fisher' reads the layer-gate gradients of the window's training steps, but GradPruner "
                "saw none that counts",
                "0 sequences",
                "run forward and backward with gradients enabled inside the window, and call observe() once "
                "per optimizer step after backward",
            )

    def _settings(self) -> dict[str, Any]:
        return {}
