"""Hidden-state similarity of blocks of layers: the statistic of ShortGPT block influence and Gromov angular distance.

For every counted training forward it compares the residual-stream hidden state entering a block of ``s``
consecutive layers with the one leaving it, per token, and accumulates additive sums:

* ``sum over tokens of (1 - cos(h_l, h_{l+s}))``        (block influence, ShortGPT)
* ``sum over tokens of arccos(cos(h_l, h_{l+s})) / pi``  (angular distance, Gromov et al.)
* ``number of tokens``

where ``h_l`` is the input of decoder layer ``l`` and ``h_{l+s}`` the output of layer ``l+s-1``.

Table layout (float64, ``[2 * len(spans) + 1, num_layers]``): for span index ``i`` row ``2i`` holds the
(1 - cos) sums and row ``2i + 1`` the angular sums of the block that STARTS at layer ``l`` (zero where the
block would run past the last layer); the last row holds the number of tokens seen by layer ``l`` (equal
in every column after whole forwards). Which forwards count, padding and steps: :mod:`.hooks`.

Memory: references to at most ``max(spans) + 1`` hidden states during a forward (held by autograd anyway)
plus one normalised copy (the last layer output, reused as the next layer's input).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gradpruner_ds.errors import user_error
from gradpruner_ds.statistics.base import BuildContext
from gradpruner_ds.statistics.hooks import LayerHookStatistic

__all__ = ["HiddenStateStatistic", "cos_stats", "pair_stats", "table_rows"]


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


class HiddenStateStatistic(LayerHookStatistic):
    """Block similarity sums for the block lengths ``spans`` (1 = single layers, for block influence; ``n`` =
    the pruning budget, for the angular criterion)."""

    name = "hidden_states"

    def __init__(self, model: nn.Module, spans: Sequence[int]) -> None:
        spans = tuple(sorted({int(s) for s in spans}))
        super().__init__(model, 2 * len(spans) + 1)
        if not spans or spans[0] < 1 or spans[-1] > self.num_layers:
            self.close()
            raise user_error(
                f"activation block spans must lie in [1, {self.num_layers}]",
                spans,
                "use a pruning budget smaller than the number of decoder layers",
            )
        self.spans = spans
        self._states: dict[int, torch.Tensor] = {}
        self._unit_out: tuple[torch.Tensor, torch.Tensor] | None = None  # (last output, normalised)

    @classmethod
    def build(cls, ctx: BuildContext) -> HiddenStateStatistic:
        assert ctx.criterion.spans is not None
        return cls(ctx.model, ctx.criterion.spans(ctx.budget))

    def _forward_begun(self) -> None:
        self._states = {}
        self._unit_out = None

    @staticmethod
    def _unit(h: torch.Tensor) -> torch.Tensor:
        """``h / ||h||`` per token, in fp32 (the cosine of two states is then a dot product)."""
        h = h.float()
        return h / torch.linalg.vector_norm(h, dim=-1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def _layer(self, idx: int, h_in: torch.Tensor, h_out: torch.Tensor, mask: torch.Tensor | None) -> None:
        h_in, h_out = h_in.detach(), h_out.detach()
        if idx == 0:
            self._states = {}
            self._unit_out = None
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

    def check(self, table: torch.Tensor) -> None:
        if float(table[-1].sum()) == 0.0:
            raise user_error(
                "the hidden-state criteria read the hidden states of the window's training forwards, but "
                "GradPruner saw none that counts",
                "0 tokens",
                "run the forward with gradients enabled inside the window (not under torch.no_grad), "
                "and call observe() once per optimizer step after backward",
            )

    def _settings(self) -> dict[str, Any]:
        return {"spans": list(self.spans)}

    def close(self) -> None:
        super().close()
        self._states = {}
        self._unit_out = None
