"""The statistics GradPruner measures during the observation window, one class each (contract: :mod:`.base`).

========================  ============================================  =====================================
name                      class                                         read by
========================  ============================================  =====================================
``igia``                  :class:`.igia.IGIAStatistic`                  igia_* and obd* criteria; merge masks
``hidden_states``         :class:`.hidden_states.HiddenStateStatistic`  shortgpt_bi, angular
``layer_gates``           :class:`.layer_gates.LayerGateStatistic`      gate_fisher
========================  ============================================  =====================================

Static criteria (``reverse``, ``last_layers``, ``random``, ``given``) read none.
"""

from __future__ import annotations

from gradpruner_ds.core.criteria import Criterion
from gradpruner_ds.statistics.base import BuildContext, Statistic, StepGradients
from gradpruner_ds.statistics.hidden_states import HiddenStateStatistic
from gradpruner_ds.statistics.igia import IGIAStatistic
from gradpruner_ds.statistics.layer_gates import LayerGateStatistic

__all__ = [
    "STATISTICS",
    "BuildContext",
    "HiddenStateStatistic",
    "IGIAStatistic",
    "LayerGateStatistic",
    "Statistic",
    "StepGradients",
    "build_statistics",
    "required",
]

STATISTICS: dict[str, type[Statistic]] = {
    cls.name: cls for cls in (IGIAStatistic, HiddenStateStatistic, LayerGateStatistic)
}


def required(criterion: Criterion, num_merge: int) -> tuple[str, ...]:
    """The statistics a pruner collects: those the criterion reads, plus IGIA for the masks of a merge."""
    names = list(criterion.reads)
    if num_merge > 0 and "igia" not in names:
        names.append("igia")
    unknown = [n for n in names if n not in STATISTICS]
    if unknown:
        raise AssertionError(f"criterion {criterion.name!r} reads unknown statistics {unknown}")
    return tuple(names)


def build_statistics(ctx: BuildContext) -> dict[str, Statistic]:
    """Build every statistic :func:`required` names for ``ctx`` (in that order)."""
    built: dict[str, Statistic] = {}
    try:
        for name in required(ctx.criterion, ctx.num_merge):
            built[name] = STATISTICS[name].build(ctx)
    except BaseException:
        for stat in built.values():  # no hook may outlive a failed construction
            stat.close()
        raise
    return built
