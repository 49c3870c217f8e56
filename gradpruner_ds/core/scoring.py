"""Layer scores from IGIA statistics: one packed table of partial sums, summed over shards once.

The table has ``steps + 2`` rows and one column per observed matrix:

* rows ``0 .. steps-1``: partial ``||G_i||_F^2`` of each matrix at each observed step;
* row ``steps``: partial ``sum(F_W * W**2)`` (second-order saliency; zeros when not needed);
* row ``steps + 1``: partial ``sum(W**2)`` (weight scale; zeros when not needed).

Every entry is a sum over the entries of a matrix, so the tables of disjoint shards add up to the
table of the whole model: one all-reduce (SUM) per observation window gives exact global scores.
Every criterion returns "higher = more important"; the lowest-scoring layers are pruned.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gradpruner_ds.core.igia import IGIAAccumulator, Key


@dataclass(frozen=True)
class Criterion:
    """A registered layer-importance criterion."""

    name: str
    doc: str
    fn: Callable[[torch.Tensor, Sequence[Key], ScoreContext], torch.Tensor]
    reads: tuple[str, ...] = ("igia",)
    """The statistics it reads (``gradpruner_ds.statistics``): "igia" (gradient statistics, the table
    above), "hidden_states" (block similarity sums), "layer_gates" (layer-gate gradients); () for criteria
    that need no data. Only these are collected (plus IGIA for the masks of a merge). ``fn`` receives the
    global table of its one statistic (an empty table when it reads none)."""
    needs_saliency: bool = False
    """IGIA option: the table's saliency row ``sum(F_W * W**2)`` is filled."""
    needs_weight_norm: bool = False
    """IGIA option: the table's weight-scale row ``sum(W**2)`` is filled."""
    spans: Callable[[int], tuple[int, ...]] | None = None
    """"hidden_states" option: the block lengths to collect, given the budget (layers removed)."""


@dataclass(frozen=True)
class ScoreContext:
    """What a criterion may read besides the table: the model shape."""

    num_layers: int
    residual_writers: tuple[str, ...]
    budget: int = 0
    """Layers removed in total (dropped + merged); read by block criteria ('angular')."""
    spans: tuple[int, ...] = ()
    """Block lengths of a hidden-state table, in its row order (``gradpruner_ds.statistics.hidden_states``)."""
    seed: int = 0
    """Seed of the 'random' criterion (identical on every rank)."""
    given: tuple[int, ...] = ()
    """Layers of a plan given by hand (the 'given' criterion)."""


CRITERIA: dict[str, Criterion] = {}


def _register(name: str, doc: str, needs_saliency: bool = False, needs_weight_norm: bool = False):
    def wrap(fn: Callable[[torch.Tensor, Sequence[Key], ScoreContext], torch.Tensor]):
        CRITERIA[name] = Criterion(
            name, doc, fn, reads=("igia",), needs_saliency=needs_saliency, needs_weight_norm=needs_weight_norm
        )
        return fn

    return wrap


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


def get_criterion(name: str) -> Criterion:
    """The registered criterion called ``name`` (AssertionError if unknown: config validates names)."""
    if name not in CRITERIA:
        raise AssertionError(f"unknown criterion {name!r}")
    return CRITERIA[name]


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


def layer_scores(table: torch.Tensor, keys: Sequence[Key], criterion: str, ctx: ScoreContext) -> list[float]:
    """Per-layer scores (higher = more important) from the GLOBAL (all-reduced) table."""
    scores = get_criterion(criterion).fn(table, keys, ctx)
    return [float(s) for s in scores]


# ---- criteria that do not read IGIA --------------------------------------------------------------
# "hidden_states" criteria read the table of gradpruner_ds.statistics.HiddenStateStatistic (rows 2i / 2i+1:
# sums of (1 - cos) / arccos(cos)/pi of the block of length ctx.spans[i] starting at each layer; last row:
# token counts); "layer_gates" criteria the table of LayerGateStatistic (rows: sums of s**2, of s, the
# sequence count); criteria that read nothing get an empty table.


def _register_other(
    name: str,
    doc: str,
    reads: tuple[str, ...],
    spans: Callable[[int], tuple[int, ...]] | None = None,
) -> Callable[[Callable[[torch.Tensor, Sequence[Key], ScoreContext], torch.Tensor]], Any]:
    def wrap(fn: Callable[[torch.Tensor, Sequence[Key], ScoreContext], torch.Tensor]):
        CRITERIA[name] = Criterion(name, doc, fn, reads=reads, spans=spans)
        return fn

    return wrap


def _span_means(table: torch.Tensor, ctx: ScoreContext, span: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (1 - cos) and mean angular distance of the blocks of length ``span`` (by start layer)."""
    if span not in ctx.spans:
        raise AssertionError(f"hidden-state table lacks span {span} (has {ctx.spans})")
    i = ctx.spans.index(span)
    count = table[-1].double().clamp_min(1.0)
    return table[2 * i].double() / count, table[2 * i + 1].double() / count


@_register_other(
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


@_register_other(
    "shortgpt_bi",
    "ShortGPT block influence (Men et al. 2024): BI_j = mean over tokens of 1 - cos(h_j, h_{j+1}), the "
    "hidden state entering and leaving layer j. Low BI = the layer barely changes the residual stream "
    "= pruned first. Needs forward hooks during the window (no gradients).",
    reads=("hidden_states",),
    spans=lambda budget: (1,),
)
def _shortgpt_bi(table: torch.Tensor, keys: Sequence[Key], ctx: ScoreContext) -> torch.Tensor:
    return _span_means(table, ctx, 1)[0][: ctx.num_layers]


@_register_other(
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


@_register_other(
    "reverse",
    "Reverse order (the ShortGPT paper's baseline): S_j = L - j, so the last n layers (the final one "
    "included) are removed. Needs no data.",
    reads=(),
)
def _reverse(table: torch.Tensor, keys: Sequence[Key], ctx: ScoreContext) -> torch.Tensor:
    return torch.arange(ctx.num_layers, 0, -1, dtype=torch.float64)


@_register_other(
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


@_register_other(
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


@_register_other(
    "random",
    "Random layers: S = a random permutation of 1..L drawn from torch.Generator seeded with the "
    "ScoreContext seed (GradPruner(seed=...)); identical on every rank. A baseline, not a method.",
    reads=(),
)
def _random(table: torch.Tensor, keys: Sequence[Key], ctx: ScoreContext) -> torch.Tensor:
    gen = torch.Generator().manual_seed(int(ctx.seed))
    return (torch.randperm(ctx.num_layers, generator=gen) + 1).double()
