"""Layer-importance criteria: pure functions of a statistic's global table, grouped by the statistic they read
(``igia.py``: the IGIA / OBD family; ``hidden_states.py``: ShortGPT block influence, angular distance;
``layer_gates.py``: the layer-gate Fisher; ``static.py``: criteria that read no data). Every criterion returns
"higher = more important"; the lowest-scoring layers are pruned. :func:`register_criterion` adds one (like
:func:`gradpruner_ds.arch.register_arch` adds a model family); docs/criteria.md has every formula.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from gradpruner_ds.core.igia import Key

CriterionFn = Callable[[torch.Tensor, Sequence[Key], "ScoreContext"], torch.Tensor]
"""``fn(global table of the statistic it reads, the table's matrix keys, context) -> per-layer scores``."""


@dataclass(frozen=True)
class Criterion:
    """A registered layer-importance criterion."""

    name: str
    doc: str
    fn: CriterionFn
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
"""Every registered criterion, by name."""


def register_criterion(
    name: str,
    doc: str,
    *,
    reads: tuple[str, ...] = ("igia",),
    needs_saliency: bool = False,
    needs_weight_norm: bool = False,
    spans: Callable[[int], tuple[int, ...]] | None = None,
) -> Callable[[CriterionFn], CriterionFn]:
    """Decorator: register ``fn`` as the criterion ``name`` (``criterion: name`` in the config then selects it).
    ``reads``: the statistics it reads (``"igia"``, ``"hidden_states"``, ``"layer_gates"``, or none); see
    :class:`Criterion` for the options."""

    def wrap(fn: CriterionFn) -> CriterionFn:
        CRITERIA[name] = Criterion(
            name, doc, fn, reads=reads, needs_saliency=needs_saliency, needs_weight_norm=needs_weight_norm,
            spans=spans,
        )  # fmt: skip
        return fn

    return wrap


def get_criterion(name: str) -> Criterion:
    """The registered criterion called ``name`` (AssertionError if unknown: config validates names)."""
    if name not in CRITERIA:
        raise AssertionError(f"unknown criterion {name!r}")
    return CRITERIA[name]


def layer_scores(table: torch.Tensor, keys: Sequence[Key], criterion: str, ctx: ScoreContext) -> list[float]:
    """Per-layer scores (higher = more important) from the GLOBAL (all-reduced) table."""
    scores = get_criterion(criterion).fn(table, keys, ctx)
    return [float(s) for s in scores]


# the built-in criteria register themselves on import
from gradpruner_ds.core.criteria import hidden_states, igia, layer_gates, static  # noqa: E402, F401
