"""Progressive removal (``stages > 1``): the budget removed in stages, each planned on the model as the previous
stages left it. A stage's plan is in the indices of the model it was made on; this module maps them back to
the original layers and folds a sequence of stage plans into one plan over the original model (what the
report shows, what the saved model records, what a resume replays on the dense model in one surgery)."""

from __future__ import annotations

from collections.abc import Sequence

from gradpruner_ds.core.plan import PrunePlan


def original_indices(num_layers: int, plans: Sequence[PrunePlan]) -> list[int]:
    """Original indices of the layers left after ``plans`` were applied in order to a model of ``num_layers``."""
    kept = list(range(num_layers))
    for plan in plans:
        if plan.num_layers != len(kept):
            raise AssertionError(f"a stage plan for {plan.num_layers} layers applied to {len(kept)}")
        kept = [kept[i] for i in plan.kept]
    return kept


def combine(plans: Sequence[PrunePlan], num_layers: int) -> PrunePlan:
    """One plan over the original ``num_layers`` layers equal to ``plans`` applied in order (a single plan is
    returned as it is). Its scores are, per original layer, the score of the last stage that scored it; its
    ``extra["stages"]`` lists each stage's step, removed original layers and plan digest."""
    if len(plans) == 1 and plans[0].num_layers == num_layers:
        return plans[0]
    kept = list(range(num_layers))
    scores = [0.0] * num_layers
    removed: list[int] = []
    stages = []
    for plan in plans:
        for local, orig in enumerate(kept):
            scores[orig] = plan.scores[local]
        gone = [kept[i] for i in plan.removed]
        removed.extend(gone)
        stages.append({"step": plan.step, "removed": sorted(gone), "plan_digest": plan.digest()})
        kept = [kept[i] for i in plan.kept]
    last = plans[-1]
    return PrunePlan(
        num_layers=num_layers,
        criterion=last.criterion,
        scores=tuple(scores),
        dropped=tuple(sorted(removed)),
        merged=(),
        targets=(),
        observed_steps=sum(p.observed_steps for p in plans),
        skipped_steps=sum(p.skipped_steps for p in plans),
        step=last.step,
        config_digest=last.config_digest,
        model_type=last.model_type,
        extra={**dict(last.extra), "stages": stages},
    )
