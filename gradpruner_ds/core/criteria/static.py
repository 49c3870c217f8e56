"""Criteria that read no data: fixed orders, a plan given by hand, and random layers (baselines)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gradpruner_ds.core.criteria import ScoreContext, register_criterion
from gradpruner_ds.core.igia import Key


@register_criterion(
    "reverse",
    "Reverse order (the ShortGPT paper's baseline): S_j = L - j, so the last n layers (the final one "
    "included) are removed. Needs no data.",
    reads=(),
)
def _reverse(table: torch.Tensor, keys: Sequence[Key], ctx: ScoreContext) -> torch.Tensor:
    return torch.arange(ctx.num_layers, 0, -1, dtype=torch.float64)


@register_criterion(
    "last_layers",
    "Last layers before the final one (Lu et al., 'Reassessing Layer Pruning in LLMs', ICLR 2026: a "
    "simple rule that beat most importance scores): S_j = L - j for j < L - 1 and S_{L-1} = L + 1, so the "
    "n layers just below the final layer are removed and the final layer is kept. Needs no data.",
    reads=(),
)
def _last_layers(table: torch.Tensor, keys: Sequence[Key], ctx: ScoreContext) -> torch.Tensor:
    scores = torch.arange(ctx.num_layers, 0, -1, dtype=torch.float64)
    scores[-1] = ctx.num_layers + 1
    return scores


@register_criterion(
    "given",
    "A plan given by hand (config 'layers_to_remove'): S_j = 0 for the listed layers, 1 for the others. "
    "Set through 'layers_to_remove', not as a criterion name.",
    reads=(),
)
def _given(table: torch.Tensor, keys: Sequence[Key], ctx: ScoreContext) -> torch.Tensor:
    scores = torch.ones(ctx.num_layers, dtype=torch.float64)
    for j in ctx.given:
        scores[j] = 0.0
    return scores


@register_criterion(
    "random",
    "Random layers: S = a random permutation of 1..L drawn from torch.Generator seeded with the "
    "ScoreContext seed (GradPruner(seed=...)); identical on every rank. A baseline, not a method.",
    reads=(),
)
def _random(table: torch.Tensor, keys: Sequence[Key], ctx: ScoreContext) -> torch.Tensor:
    gen = torch.Generator().manual_seed(int(ctx.seed))
    return (torch.randperm(ctx.num_layers, generator=gen) + 1).double()
