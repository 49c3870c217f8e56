"""Criteria that read the hidden-state statistic (``gradpruner_ds.statistics.hidden_states``): rows ``2i`` /
``2i+1`` hold the sums of (1 - cos) / arccos(cos)/pi of the block of length ``ctx.spans[i]`` starting at each
layer; the last row the token counts."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from gradpruner_ds.core.criteria import ScoreContext, register_criterion
from gradpruner_ds.core.igia import Key


def _span_means(table: torch.Tensor, ctx: ScoreContext, span: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (1 - cos) and mean angular distance of the blocks of length ``span`` (by start layer)."""
    if span not in ctx.spans:
        raise AssertionError(f"hidden-state table lacks span {span} (has {ctx.spans})")
    i = ctx.spans.index(span)
    count = table[-1].double().clamp_min(1.0)
    return table[2 * i].double() / count, table[2 * i + 1].double() / count


@register_criterion(
    "shortgpt_bi",
    "ShortGPT block influence (Men et al. 2024): BI_j = mean over tokens of 1 - cos(h_j, h_{j+1}), the "
    "hidden state entering and leaving layer j. Low BI = the layer barely changes the residual stream "
    "= pruned first. Needs forward hooks during the window (no gradients).",
    reads=("hidden_states",),
    spans=lambda budget: (1,),
)
def _shortgpt_bi(table: torch.Tensor, keys: Sequence[Key], ctx: ScoreContext) -> torch.Tensor:
    return _span_means(table, ctx, 1)[0][: ctx.num_layers]


@register_criterion(
    "angular",
    "Angular distance of a contiguous block (Gromov et al. 2024, 'The Unreasonable Ineffectiveness of "
    "the Deeper Layers'): for n = the budget, d(l) = mean over tokens of arccos(cos(h_l, h_{l+n})) / pi; "
    "the block [l*, l*+n) with the smallest d is removed. Score of layer j: d(l*) inside that block, "
    "otherwise the smallest d of any block containing j (kept strictly above d(l*)). Mean over all "
    "tokens (Gromov et al. used the last token only).",
    reads=("hidden_states",),
    spans=lambda budget: (max(1, budget),),
)
def _angular(table: torch.Tensor, keys: Sequence[Key], ctx: ScoreContext) -> torch.Tensor:
    n, num = max(1, ctx.budget), ctx.num_layers
    ang = _span_means(table, ctx, n)[1]
    starts = list(range(num - n + 1))
    best = min(starts, key=lambda start: (float(ang[start]), start))
    d_best = float(ang[best])
    above = math.nextafter(d_best, math.inf)
    scores = torch.empty(num, dtype=torch.float64)
    for j in range(num):
        if best <= j < best + n:
            scores[j] = d_best
        else:
            containing = [float(ang[s]) for s in starts if s <= j < s + n]
            scores[j] = max(min(containing), above)
    return scores
