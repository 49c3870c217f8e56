"""Criteria that read the layer-gate statistic (``gradpruner_ds.statistics.layer_gates``): rows hold the sums of
s**2, of s, and the sequence count."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gradpruner_ds.core.criteria import ScoreContext, register_criterion
from gradpruner_ds.core.igia import Key


@register_criterion(
    "gate_fisher",
    "Layer-level Optimal Brain Damage (ours): put a scalar gate a_l on layer l's residual update, "
    "h_{l+1} = h_l + a_l * f_l(h_l). Its gradient per sequence e is s_{l,e} = sum over tokens of "
    "<dL/dh_{l+1}, h_{l+1} - h_l>; S_l = mean_e s_{l,e}**2 is the empirical Fisher of the gate, i.e. "
    "(x 1/2) the second-order estimate of the loss increase of setting a_l = 0 (removing the layer). "
    "Unlike the IGIA sums it is invariant to the residual-stream scale (dL/dh ~ 1/|h| is multiplied by "
    "the update, which grows with |h|). Needs forward + gradient hooks during the window.",
    reads=("layer_gates",),
)
def _gate_fisher(table: torch.Tensor, keys: Sequence[Key], ctx: ScoreContext) -> torch.Tensor:
    return (table[0].double() / table[2].double().clamp_min(1.0))[: ctx.num_layers]
