"""One observation window: the statistics its criterion reads (built on the model as it is when the window
opens), the per-step finite check that decides which steps count, the scores and the plan of the window.

The pruner opens one window per stage (:mod:`gradpruner_ds.pruner`); the statistics are classes of
:mod:`gradpruner_ds.statistics`, the criteria of :mod:`gradpruner_ds.core.criteria`, the plan is
:func:`gradpruner_ds.core.plan.make_plan`, checked for agreement across ranks by the engine adapter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gradpruner_ds.arch import ArchSpec, decoder_layers, unwrap_model
from gradpruner_ds.config import GradPrunerConfig
from gradpruner_ds.core.criteria import ScoreContext, get_criterion, layer_scores
from gradpruner_ds.core.igia import Key, sq_norms
from gradpruner_ds.core.plan import PrunePlan, make_plan
from gradpruner_ds.engine import EngineAdapter
from gradpruner_ds.errors import user_error
from gradpruner_ds.log import get_logger
from gradpruner_ds.statistics import BuildContext, IGIAStatistic, Statistic, build_statistics

log = get_logger("window")


class Window:
    """The statistics and step counts of one observation window of ``length`` optimizer steps, removing
    ``budget`` layers of the model as it is now (``num_merge`` of them merged)."""

    def __init__(
        self,
        model: nn.Module,
        spec: ArchSpec,
        config: GradPrunerConfig,
        backend: EngineAdapter,
        *,
        length: int,
        budget: int,
        num_merge: int,
        start: int = 0,
        seed: int = 0,
    ) -> None:
        self.model, self.spec, self.config, self.backend = model, spec, config, backend
        self.length, self.budget, self.num_merge, self.start, self.seed = (
            length,
            budget,
            num_merge,
            start,
            seed,
        )
        self.steps_seen = 0
        self.observed_steps = 0  # steps whose statistics count (finite gradients)
        self.skipped_steps = 0  # steps left out (non-finite gradients / a skipped loss-scaler step)
        self.statistics: dict[str, Statistic] = {}
        if config.enabled:
            self.statistics = build_statistics(
                BuildContext(
                    model=model,
                    spec=spec,
                    config=config,
                    backend=backend,
                    criterion=get_criterion(config.effective_criterion),
                    window=length,
                    num_layers=len(decoder_layers(model)),
                    budget=budget,
                    num_merge=num_merge,
                )
            )

    @property
    def igia(self) -> IGIAStatistic | None:
        stat = self.statistics.get("igia")
        return stat if isinstance(stat, IGIAStatistic) else None

    @property
    def complete(self) -> bool:
        return self.steps_seen >= self.length

    # ---- one step -----------------------------------------------------------------------------------
    def observe(self) -> None:
        """End of one optimizer step: ONE finite check over the gradients the statistics read (or every
        trainable gradient), then every statistic counts the step or leaves it out."""
        reads = [r for stat in self.statistics.values() if (r := stat.step_gradients()) is not None]
        if not reads:  # no statistic reads gradients: the finite check of every trainable gradient
            ok, scale = gradients_finite(self.model, self.backend)
        elif len(reads) == 1:
            ok, scale = self.backend.step_check(reads[0].tensors, reads[0].norms, reads[0].params)
        else:
            ok, scale = self.backend.step_check(
                [t for r in reads for t in r.tensors], None, [p for r in reads for p in r.params]
            )
        for stat in self.statistics.values():  # every statistic counts the step iff its gradients are finite
            stat.update(ok, scale)
        if ok:
            self.observed_steps += 1
        else:
            self.skipped_steps += 1
            log.warning("step %d has non-finite gradients: not observed", self.steps_seen)
        self.steps_seen += 1

    # ---- the decision ---------------------------------------------------------------------------------
    def compute_scores(self) -> list[float]:
        """Global per-layer scores of the model as it is now: the criterion's statistic reduced over ranks
        (one SUM all-reduce of its packed partial table), then scored."""
        crit = get_criterion(self.config.effective_criterion)
        layers = len(decoder_layers(self.model))
        keys: list[Key] = []
        spans: tuple[int, ...] = ()
        if not crit.reads:  # no data: nothing to reduce
            table = torch.zeros(1, layers, dtype=torch.float64)
        else:
            (name,) = crit.reads
            stat = self.statistics[name]
            table = stat.reduce(self.backend)
            keys, spans = list(stat.keys), tuple(stat.spans)
        ctx = ScoreContext(
            layers,
            self.spec.residual_writers,
            budget=self.budget,
            spans=spans,
            seed=self.seed,
            given=tuple(self.config.layers_to_remove or ()),
        )
        return layer_scores(table, keys, crit.name, ctx)

    def check_observed(self) -> None:
        """A ``gradpruner:`` error when no step of the window counted (a warning when few did)."""
        if self.observed_steps == 0:
            raise user_error(
                "the observation window must contain at least one step with finite gradients",
                f"{self.skipped_steps} of {self.steps_seen} steps non-finite",
                "lower the learning rate / fix the loss scale, or lengthen window_steps",
            )
        if self.skipped_steps and self.observed_steps < (self.steps_seen + 1) // 2:
            log.warning(
                "only %d of %d observed steps had finite gradients: the scores rest on few steps "
                "(lengthen window_steps, or check the loss scale / learning rate)",
                self.observed_steps,
                self.steps_seen,
            )

    def make_plan(self, scores: Sequence[float], protect: Sequence[int], mode: str, step: int) -> PrunePlan:
        """``scores`` -> the frozen plan of this window (indices of the model as it is now), checked for
        agreement across ranks."""
        bad = {i: s for i, s in enumerate(scores) if not math.isfinite(s)}
        if bad:
            raise user_error(
                f"every layer score must be finite (criterion '{self.config.effective_criterion}')",
                f"non-finite scores of layers {bad}",
                "check the model for inf/nan activations or weights; GradPruner never ranks a non-finite score",
            )
        cfg = self.config
        plan = make_plan(
            scores,
            self.budget - self.num_merge,
            self.num_merge,
            criterion=cfg.effective_criterion,
            observed_steps=self.observed_steps,
            skipped_steps=self.skipped_steps,
            step=step,
            config_digest=cfg.config_digest(),
            model_type=str(getattr(unwrap_model(self.model).config, "model_type", "")),
            extra={
                "mode": mode,
                "keep_fraction": cfg.keep_fraction,
                "sign_consistent": cfg.sign_consistent,
                "merge_rule": cfg.merge_rule,
            },
            protect=protect,
        )
        self.backend.check_plan(plan, cfg.consensus_timeout_s)
        return plan

    # ---- state and lifetime ---------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        return {
            "steps_seen": self.steps_seen,
            "observed_steps": self.observed_steps,
            "skipped_steps": self.skipped_steps,
        }

    def load(self, counts: Mapping[str, Any], stats: Mapping[str, Any]) -> None:
        """Restore :meth:`counts` and every statistic's saved state (``gradpruner:`` error when the checkpoint
        collected other statistics)."""
        self.steps_seen = int(counts["steps_seen"])
        self.observed_steps = int(counts["observed_steps"])
        self.skipped_steps = int(counts["skipped_steps"])
        saved = {k for k, v in stats.items() if k not in ("recovery", "repair") and v is not None}
        if saved != set(self.statistics):
            raise user_error(
                "the checkpoint's statistics must be those this criterion collects",
                f"saved {sorted(saved)}, collected now {sorted(self.statistics)}",
                "resume with the gradpruner block of the run that saved it",
            )
        for name, stat in self.statistics.items():
            stat.load_state_dict(stats[name])

    def close(self, keep_igia: bool = False) -> None:
        """The window is over: every statistic removes its hooks and frees its state (IGIA stays while the
        merge still reads it, ``keep_igia``)."""
        for name in list(self.statistics):
            if not (keep_igia and name == "igia"):
                self.statistics.pop(name).close()


def gradients_finite(model: nn.Module, backend: EngineAdapter) -> tuple[bool, float]:
    """Whether every trainable gradient is finite on every rank (one read of each local piece), and the
    engine's clip / loss-scale factor."""
    params = [p for p in model.parameters() if p.requires_grad]
    pieces = [(p, g) for p in params if (g := backend.local_grad(p)) is not None]
    norms = sq_norms(g for _, g in pieces)
    return backend.step_check([g for _, g in pieces], norms, [p for p, _ in pieces])
