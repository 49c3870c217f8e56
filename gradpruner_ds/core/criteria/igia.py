"""Criteria that read the IGIA statistic (``gradpruner_ds.statistics.igia``): the paper's score and its variants.

The table has ``steps + 2`` rows and one column per observed matrix:

* rows ``0 .. steps-1``: partial ``||G_i||_F^2`` of each matrix at each observed step;
* row ``steps``: partial ``sum(F_W * W**2)`` (second-order saliency; zeros when not needed);
* row ``steps + 1``: partial ``sum(W**2)`` (weight scale; zeros when not needed).

Every entry is a sum over the entries of a matrix, so the tables of disjoint shards add up to the table of
the whole model: one all-reduce (SUM) per observation window gives exact global scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from gradpruner_ds.core.criteria import ScoreContext, get_criterion, register_criterion
from gradpruner_ds.core.igia import IGIAAccumulator, Key


def _register(name: str, doc: str, needs_saliency: bool = False, needs_weight_norm: bool = False):  # type: ignore[no-untyped-def]
    return register_criterion(
        name, doc, reads=("igia",), needs_saliency=needs_saliency, needs_weight_norm=needs_weight_norm
    )


def _per_layer(values_k: torch.Tensor, keys: Sequence[Key], num_layers: int, only=None) -> torch.Tensor:
    out = torch.zeros(num_layers, dtype=torch.float64)
    for col, (layer, name) in enumerate(keys):
        if only is None or name in only:
            out[layer] += values_k[col]
    return out


def _steps(table: torch.Tensor) -> torch.Tensor:
    return table[:-2]


@_register(
    "igia_sum",
    "Paper (method.md): S_j = sum over the layer's linear sublayers of sum(F_W), F_W = mean_i G_i**2. "
    "Faithful to arXiv 2601.19503; reproduces the paper.",
)
def _igia_sum(table: torch.Tensor, keys: Sequence[Key], ctx: ScoreContext) -> torch.Tensor:
    steps = _steps(table)
    return _per_layer(steps.sum(0) / max(steps.shape[0], 1), keys, ctx.num_layers)


@_register(
    "igia_norm_sum",
    "Reference-code variant: S_j = sum over steps and sublayers of the unsquared Frobenius norm ||G_i||_F.",
)
def _igia_norm_sum(table: torch.Tensor, keys: Sequence[Key], ctx: ScoreContext) -> torch.Tensor:
    return _per_layer(_steps(table).clamp_min(0).sqrt().sum(0), keys, ctx.num_layers)


@_register(
    "igia_relative",
    "Scale-normalised IGIA: sum(F_W) over the layer divided by sum(W**2) over the layer, removing the "
    "per-layer weight/gradient scale that makes the raw sum fall with depth.",
    needs_weight_norm=True,
)
def _igia_relative(table: torch.Tensor, keys: Sequence[Key], ctx: ScoreContext) -> torch.Tensor:
    steps = _steps(table)
    num = _per_layer(steps.sum(0) / max(steps.shape[0], 1), keys, ctx.num_layers)
    den = _per_layer(table[-1], keys, ctx.num_layers)
    return num / den.clamp_min(torch.finfo(torch.float64).tiny)


@_register(
    "obd",
    "Second-order saliency (Optimal Brain Damage with IGIA as a diagonal Fisher): the estimated loss "
    "increase of zeroing the layer, sum(F_W * W**2) over all linear sublayers.",
    needs_saliency=True,
)
def _obd(table: torch.Tensor, keys: Sequence[Key], ctx: ScoreContext) -> torch.Tensor:
    return _per_layer(table[-2], keys, ctx.num_layers)


@_register(
    "obd_residual",
    "Second-order saliency restricted to the sublayers that write into the residual stream "
    "(o_proj, down_proj): sum(F_W * W**2).",
    needs_saliency=True,
)
def _obd_residual(table: torch.Tensor, keys: Sequence[Key], ctx: ScoreContext) -> torch.Tensor:
    return _per_layer(table[-2], keys, ctx.num_layers, only=set(ctx.residual_writers))


def partial_table(
    acc: IGIAAccumulator,
    criterion: str,
    weights: Mapping[Key, torch.Tensor] | None = None,
) -> torch.Tensor:
    """This process's partial statistics table (float64 [steps + 2, len(keys)]) for ``criterion``.

    ``weights`` maps each key to the local piece of its base weight, laid out like the IGIA piece
    (only read when the criterion needs the weights).
    """
    crit = get_criterion(criterion)
    n = len(acc.keys)
    saliency = torch.zeros(n, dtype=torch.float64)
    wsq = torch.zeros(n, dtype=torch.float64)
    if crit.needs_saliency or crit.needs_weight_norm:
        if weights is None:
            raise AssertionError(f"criterion {criterion!r} needs the weights")
        if crit.needs_saliency:
            saliency = acc.weighted_sums(weights)
        if crit.needs_weight_norm:
            col = {k: i for i, k in enumerate(acc.keys)}
            for key, w in weights.items():
                wsq[col[key]] = w.detach().double().square().sum().item()
    return torch.cat([acc.sq_norm_table(), saliency[None], wsq[None]], dim=0)
