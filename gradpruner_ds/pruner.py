"""GradPruner inside a training loop: observe the first steps, plan, (repair,) merge, cut, and go on.

Usage with any engine (plain PyTorch shown; ``gradpruner_ds.backends.backend_for`` adapts DeepSpeed / FSDP2)::

    pruner = GradPruner(model, config, total_steps=num_steps)
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        pruner.observe()                    # after backward and clipping, before the optimizer step
        optimizer.step(); scheduler.step(); optimizer.zero_grad()
        optimizer, scheduler = pruner.maybe_prune(optimizer, scheduler)

The run's phases, per stage (one stage unless ``stages > 1``): the observation window (:mod:`.window`), the
plan, the repair phase (``repair``: :mod:`.repair`), then the cut: the merge (:mod:`.merging`), the fold of the
repair maps, the surgery (:mod:`.surgery`) and the engine's rebuild with the kept parameters' optimizer state
(the adapter's ``rebuild``); the distillation after it (``recovery``: :mod:`.recovery`); the report
(:mod:`.report`). Progressive removal's bookkeeping is :mod:`.stages`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from gradpruner_ds.arch import ArchSpec, decoder_layers, get_arch, unwrap_model
from gradpruner_ds.backends import backend_for, check_backend
from gradpruner_ds.config import GradPrunerConfig
from gradpruner_ds.core.plan import PrunePlan
from gradpruner_ds.diagnostics import rss_bytes
from gradpruner_ds.engine import EngineAdapter
from gradpruner_ds.errors import user_error
from gradpruner_ds.guards import LoopGuard
from gradpruner_ds.log import get_logger
from gradpruner_ds.merging import merge_layers
from gradpruner_ds.recovery import Distiller
from gradpruner_ds.repair import Repairer, refusal
from gradpruner_ds.report import PruneReport, check_report_dir
from gradpruner_ds.resume import Resumable
from gradpruner_ds.stages import combine, original_indices
from gradpruner_ds.statistics import IGIAStatistic, Statistic
from gradpruner_ds.surgery import apply_surgery, count_params
from gradpruner_ds.window import Window, gradients_finite

__all__ = ["Continue", "DisabledPruner", "GradPruner", "apply_surgery", "count_params"]

log = get_logger("pruner")


class Continue(NamedTuple):
    """What ``maybe_prune`` returns on every engine: the objects the training loop uses from now on. It
    unpacks like the pair it was given (``optimizer, scheduler = pruner.maybe_prune(optimizer, scheduler)``)."""

    stepper: Any
    """What the loop calls ``.step()`` on: the torch optimizer (one process, FSDP2: the same object, pruned in
    place), or the DeepSpeed engine (a new engine after the prune)."""
    lr_scheduler: Any
    """The LR scheduler (the same object; its schedule continues)."""


class GradPruner(Resumable):
    """Observes a window of optimizer steps, plans, (repairs,) merges and cuts the model in place; with
    ``stages > 1`` does so once per stage on the model the previous stage left.

    ``model`` is an HF CausalLM (or a peft-wrapped one) of a registered family. ``total_steps`` (the
    run's optimizer steps) is needed for ``window_fraction`` and checks the schedule fits in the run.
    """

    def __init__(
        self,
        model: nn.Module,
        config: GradPrunerConfig | Mapping[str, Any],
        *,
        total_steps: int | None = None,
        backend: EngineAdapter | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(config, GradPrunerConfig):  # the block as a dict: validated like a config file's
            config = GradPrunerConfig.from_dict(config)
        self.config = config
        self.seed = seed  # only read by the 'random' criterion
        self.model = model
        if backend is None:  # the adapter of what the model is (DDP, FSDP2, one process)
            backend = backend_for(model)
        else:
            check_backend(model, backend)
        self.backend: EngineAdapter = backend
        # before any other collective: every rank runs the same settings (a mismatch names the field)
        self.backend.check_settings(
            {**config.model_dump(), "total_steps": total_steps, "seed": seed}, config.consensus_timeout_s
        )
        self.spec: ArchSpec = get_arch(model)
        self.prior = _earlier_prune(model, config)
        """The record of a prune made before this run (``prune_again``), None for a model never pruned."""
        self.num_layers = len(decoder_layers(model))
        """Decoder layers of the model as it was given (the original, dense model)."""
        self.window = config.resolve_window(total_steps)
        self.num_drop, self.num_merge = config.resolve_budget(self.num_layers)
        self.budgets = config.stage_budgets(self.num_layers)
        """Layers removed at each stage (one entry without progressive removal)."""
        if config.enabled and config.output_dir is not None and self.backend.rank == 0:
            check_report_dir(Path(config.output_dir))
        self._check_recovery_and_repair(total_steps)
        self.distiller: Distiller | None = None
        self.repairer: Repairer | None = None
        """The repair phase (``repair``): from a stage's plan to its cut, while its maps are fitted."""
        self.stage = 0
        self.stage_plans: list[PrunePlan] = []
        """The plans of the stages cut so far, each in the layer indices of the model it was made on."""
        self.plan: PrunePlan | None = None
        """The whole prune in the original layer indices, once every stage is cut (None before)."""
        self._wait = 0  # steps until the next stage's window opens
        self._steps_done = 0  # maybe_prune calls: optimizer steps of the run so far
        self._resumed_stage: Mapping[str, Any] | None = None  # a later stage's state, loaded after the replay
        self._paused = False
        self._warned_eval = False
        self._bar: Any = None
        self._report = PruneReport(config.output_dir, config.plot, self.backend.rank, config.stages)
        self._guard = LoopGuard(total_steps)
        # last (no hook may outlive a failed check above): the statistics of the first window
        self.win = self._new_window()
        igia = self.igia
        self.mode = igia.mode if igia is not None else "none"
        """How gradients are read: "full", "lora" (peft adapters), or "none" (no statistic reads them)."""
        stages = f" in {config.stages} stages {self.budgets}, {config.stage_interval} steps apart"
        log.info(
            "observing %d steps (collecting: %s; criterion %s); then removing %d of %d layers (%d dropped, %d merged)%s",
            self.window, ", ".join(self.statistics) or "no statistics", config.effective_criterion,
            self.num_drop + self.num_merge, self.num_layers, self.num_drop, self.num_merge,
            stages if config.stages > 1 else "",
        )  # fmt: skip

    def _check_recovery_and_repair(self, total_steps: int | None) -> None:
        config, recovery = self.config, self.config.recovery
        if config.enabled and recovery is not None and total_steps is not None:
            left = total_steps - self.window
            if recovery.distill_steps > left and self.backend.rank == 0:
                log.warning(
                    "recovery.distill_steps is %d but only %d steps follow the prune (%d steps, window %d): the "
                    "teacher is kept, and distilled from, until the end of the run",
                    recovery.distill_steps, left, total_steps, self.window,
                )  # fmt: skip
        if config.enabled and recovery is not None and self.backend.teacher_refused is not None:
            raise user_error(
                f"recovery (in-job distillation) needs a teacher laid out like the student: {self.backend.teacher_refused}",
                type(self.backend).__name__,
                "remove the 'recovery' sub-block, or train a model whose teacher can be rebuilt: a transformers "
                "model with plain LoRA adapters or none (one process and ZeRO-1/2 take any model)",
            )
        if config.enabled and config.repair is not None and (why := refusal(self.spec)) is not None:
            raise user_error(
                "repair folds a linear map into the MLP writer of the kept layer below each removed run",
                why,
                "remove the 'repair' sub-block for this model",
            )

    # ---- the current window -------------------------------------------------------------------------
    def _new_window(self) -> Window:
        """The current stage's window, its statistics built on the model as it is now."""
        return Window(
            self.model, self.spec, self.config, self.backend, length=self.window, budget=self.budgets[self.stage],
            num_merge=self.num_merge, start=self._steps_done, seed=self.seed,
        )  # fmt: skip

    @property
    def statistics(self) -> dict[str, Statistic]:
        """The statistics the current window collects (empty outside a window)."""
        return self.win.statistics

    @property
    def igia(self) -> IGIAStatistic | None:
        """The IGIA statistic while it is collected (an IGIA criterion, or the masks of a merge), else None."""
        return self.win.igia

    @property
    def steps_seen(self) -> int:
        return self.win.steps_seen

    @property
    def observed_steps(self) -> int:
        return self.win.observed_steps

    @property
    def skipped_steps(self) -> int:
        return self.win.skipped_steps

    @property
    def whole(self) -> PrunePlan | None:
        """The prune so far in original layer indices: :attr:`plan` once done (also with ``observe_only``), the
        stages cut so far before that, None before the first cut."""
        if self.plan is not None:
            return self.plan
        return combine(self.stage_plans, self.num_layers) if self.stage_plans else None

    @property
    def current_layers(self) -> list[int]:
        """Original indices of the decoder layers the model has now."""
        return original_indices(self.num_layers, self.stage_plans)

    @property
    def report(self) -> dict[str, Any] | None:
        """The prune's report (what ``gradpruner_report.json`` holds), None before the first cut."""
        return self._report.data

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Steps run inside the block are not observed: their forwards are not measured and ``observe()``
        does nothing (e.g. extra forwards with gradients that are not training steps, or a side-by-side
        timing of plain and observed steps, benchmarks/speed/run.py)."""
        self._paused = True
        stats = [*self.statistics.values(), *self._repair_statistic()]
        for stat in stats:
            stat.pause(True)
        try:
            yield
        finally:
            self._paused = False
            for stat in stats:
                stat.pause(False)

    def _repair_statistic(self) -> list[Statistic]:
        return [self.repairer.statistic] if self.repairer is not None and self.repairer.statistic else []

    # ---- where the run is ------------------------------------------------------------------------------
    def _active(self) -> bool:
        return self.config.enabled and self.plan is None and self._wait == 0

    @property
    def observing(self) -> bool:
        """True while an observation window, or the repair phase after it, is open."""
        if not self._active():
            return False
        return not self.repairer.done if self.repairer is not None else not self.win.complete

    @property
    def repairing(self) -> bool:
        """True during a repair phase: the stage's plan is made, the model not cut yet, the maps being fitted."""
        return self.repairer is not None

    @property
    def ready(self) -> bool:
        """True when the next ``maybe_prune`` acts: a window is complete (it plans, and cuts unless a repair
        phase follows), or a repair phase is (it cuts)."""
        if not self._active():
            return False
        return self.repairer.done if self.repairer is not None else self.win.complete

    @property
    def cutting(self) -> bool:
        """True when the next ``maybe_prune`` acts on the model (removes layers, or with ``observe_only`` makes the
        final plan): :attr:`ready`, except at a window's end when a repair phase starts there instead."""
        return self.ready and (self.config.repair is None or self.repairer is not None)

    # ---- observation --------------------------------------------------------------------------------
    def observe(self) -> None:
        """End of one optimizer step of a window (or repair phase): check the step's gradients are finite on
        every rank, accumulate IGIA from them (when the criterion or a merge reads it) and commit the step's
        hidden-state (or repair) sums, or leave the step out of every statistic. Call after backward (and
        clipping), before the optimizer step, once per optimizer step. A no-op outside them or while paused."""
        if not self.observing or self._paused or not self.backend.at_boundary():
            return
        self._guard.observed(self.model, self.backend)
        self._warn_eval_mode()
        if self.repairer is not None:  # the repair phase: the step's sums count iff its gradients are finite
            ok, _ = gradients_finite(self.model, self.backend)
            for stat in self._repair_statistic():
                stat.update(ok)
            self.repairer.step(ok)
            if not ok:
                log.warning("repair step %d has non-finite gradients: not counted", self.repairer.steps_seen)
            self._progress(self.repairer.steps_seen, self.repairer.config.steps, "gradpruner: repair")
            return
        self.win.observe()
        self._progress(self.win.steps_seen, self.window, "gradpruner: observing")

    def _warn_eval_mode(self) -> None:
        if self._warned_eval or unwrap_model(self.model).training:
            return
        self._warned_eval = True
        log.warning(
            "the model is in eval mode during the observation window (from_pretrained returns it so): dropout "
            "is off while GradPruner measures; call model.train() before training if that is not intended"
        )

    def _progress(self, done: int, total: int, desc: str) -> None:
        if not self.config.progress_bar or self.backend.rank != 0:
            return
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=done - 1, desc=desc, unit="step", leave=False)
        self._bar.update(1)
        if done >= total:
            self._bar.close()
            self._bar = None

    # ---- the decision ---------------------------------------------------------------------------------
    def compute_scores(self) -> list[float]:
        """Global per-layer scores of the model as it is now (:meth:`Window.compute_scores`)."""
        return self.win.compute_scores()

    def make_plan(self, step: int | None = None) -> PrunePlan:
        """Scores -> the frozen plan of the current stage (in the indices of the model as it is now), checked
        for agreement across ranks."""
        current = self.current_layers
        protect = [current.index(i) for i in self.config.protect_layers]
        step = self.win.start + self.win.steps_seen if step is None else step
        self.win.check_observed()
        return self.win.make_plan(self.compute_scores(), protect, self.mode, step)

    # ---- the whole prune ----------------------------------------------------------------------------
    def maybe_prune(self, optimizer: Any = None, lr_scheduler: Any = None) -> Continue:
        """Call once per optimizer step with what the loop steps (the torch optimizer, or the DeepSpeed
        engine) and the LR scheduler. Plans and cuts when a window (or repair phase) is complete, opens the
        next stage's window when its time comes, and returns the objects to use from now on
        (:class:`Continue`). Also times the steps before and after the first cut for the report."""
        self._steps_done += 1
        self._report.tick(pruned=bool(self.stage_plans))
        ended = self._guard.step_done(self._steps_done, self.plan is not None, self.config.enabled)
        if ended is not None:
            self._report.write_not_pruned(ended)
        if self.stage_plans and self.distiller is not None:  # one more step of the pruned model done
            self.distiller.step_done()
        if self._wait > 0:
            self._wait -= 1
            if self._wait == 0:
                self.win = self._new_window()
            return Continue(optimizer, lr_scheduler)
        if not self.ready:
            return Continue(optimizer, lr_scheduler)
        out = Continue(*self.prune(optimizer, lr_scheduler))
        self._report.timer.restart()  # the next interval is a plain step of the smaller model
        return out

    def prune(self, optimizer: Any = None, lr_scheduler: Any = None) -> tuple[Any, Any]:
        """Plan the current stage, (repair,) merge, remove its layers and rebuild the optimizer; training
        continues after it. With ``repair`` the window's end only plans and opens the repair phase; the cut
        comes at its end. With ``observe_only`` the plan and the report are made and nothing else changes."""
        t0 = time.perf_counter()
        repair = self.config.repair
        if repair is not None and self.repairer is None:  # the window ends: plan, then the repair phase
            plan = self.make_plan()
            self.win.close()
            self.repairer = Repairer(repair, self.model, self.spec, self.backend, plan)
            return optimizer, lr_scheduler
        plan = self.repairer.plan if self.repairer is not None else self.make_plan()
        self.win.close(keep_igia=True)  # the hooks end with the window; the merge reads IGIA
        params_before = count_params(self.model, self.backend)
        rss_before = rss_bytes()
        if self.config.observe_only:
            self.plan = plan
            self.win.close()
            removed = sum(count_params(decoder_layers(self.model)[i], self.backend) for i in plan.removed)
            params_after = params_before - removed
            extra: dict[str, Any] = {"observe_only": True, "merge": []}
        else:
            if self.config.recovery is not None:  # the teacher: the model just before the cut
                self.distiller = Distiller(self.config.recovery, self.backend.make_teacher(self.model))
                self.distiller.announce()
            extra = merge_layers(plan, self.igia, self.spec, self.config, self.backend)
            folded: list[nn.Parameter] = []
            if self.repairer is not None:
                extra["repair"], folded = self.repairer.fold()
                self.repairer = None
            before = self.current_layers
            optimizer, lr_scheduler = self._cut(plan, optimizer, lr_scheduler)
            if folded and repair is not None and repair.optimizer_state == "reset":
                self.backend.reset_optimizer_state(optimizer, folded)
            params_after = count_params(self.model, self.backend)
            extra["removed_original"] = [before[i] for i in plan.removed]
        extra["memory"] = {"rss_bytes_before": rss_before, "rss_bytes_after": rss_bytes()}
        if self.distiller is not None and self.config.recovery is not None:
            extra["recovery"] = {
                **self.config.recovery.model_dump(),
                "teacher_bytes": self.distiller.teacher_bytes(),
            }
        entry = {"stage": self.stage, "plan": plan.to_dict(), "params_before": params_before,
                 "params_after": params_after, "prune_s": time.perf_counter() - t0, **extra}  # fmt: skip
        self._report.add_cut(self.whole or plan, entry, extra)
        self._report.write()
        self.backend.log_events(self.events(), self._steps_done)
        log.info(
            "%s layers %s%s; parameters %d -> %d (%.1f%%)",
            "observe_only: would prune" if self.config.observe_only else "pruned",
            extra.get("removed_original", list(plan.removed)),
            f" at stage {self.stage + 1} of {self.config.stages}" if self.config.stages > 1 else "",
            params_before, params_after, 100.0 * params_after / params_before,
        )  # fmt: skip
        if self.plan is None and not self.config.observe_only:  # more stages follow
            self.stage += 1
            self._wait = self.config.stage_interval - self.window - (repair.steps if repair else 0)  # type: ignore[operator]
            if self._wait == 0:
                self.win = self._new_window()
        return optimizer, lr_scheduler

    @property
    def distilling(self) -> bool:
        """True from a cut until ``recovery.distill_steps`` steps later (the teacher is alive)."""
        return self.distiller is not None and self.distiller.active

    def distill(self, loss: torch.Tensor, logits: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """The training loss to backpropagate: ``loss`` plus, during the ``recovery.distill_steps`` steps after
        the prune, the self-distillation term from the pre-prune teacher on the same ``batch``. Call it on
        every micro-batch: ``loss = pruner.distill(out.loss, out.logits, batch)``."""
        if self.distiller is None or not self.distiller.active:
            return loss
        return self.distiller.loss(loss, logits, batch)

    def events(self) -> dict[str, float]:
        """Scalar events of the prune for experiment trackers (``gradpruner/...``): see
        :func:`gradpruner_ds.report.tracker_events` (empty before the first cut)."""
        return self._report.events()

    def _cut(self, plan: PrunePlan, optimizer: Any, lr_scheduler: Any) -> tuple[Any, Any]:
        """Remove the stage plan's layers, forget every reference to them, rebuild the optimizer/engine."""
        self.stage_plans.append(plan)
        whole = combine(self.stage_plans, self.num_layers)
        if len(self.stage_plans) == len(self.budgets):
            self.plan = whole
        removed_params = apply_surgery(self.model, plan, whole, self.prior)
        self.win.close()  # frees the IGIA state; no reference to removed parameters may survive
        return self.backend.rebuild(self.model, removed_params, optimizer, lr_scheduler)


def _earlier_prune(model: nn.Module, config: GradPrunerConfig) -> dict[str, Any] | None:
    """The config record of a prune made before (a ``gradpruner:`` error unless ``prune_again``)."""
    record = getattr(unwrap_model(model).config, "gradpruner", None)
    if record and config.enabled and not config.prune_again:
        raise user_error(
            "the model was already pruned (its config records a prune: a second one would overwrite that record)",
            {k: record.get(k) for k in ("original_num_layers", "kept_layers")},
            'start from the dense model, or set "prune_again": true to prune it further (the record keeps both)',
        )
    return dict(record) if record else None


class DisabledPruner:
    """What a training loop holds when GradPruner is off (``--gradpruner`` not given): the same calls as
    :class:`GradPruner`, each a no-op, so the loop needs no branch."""

    plan: PrunePlan | None = None
    observing = False
    repairing = False
    ready = False
    cutting = False
    distilling = False

    def observe(self) -> None:
        """Nothing is observed."""

    def maybe_prune(self, optimizer: Any = None, lr_scheduler: Any = None) -> Continue:
        """Nothing is pruned: returns its arguments."""
        return Continue(optimizer, lr_scheduler)

    def distill(self, loss: torch.Tensor, logits: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """No recovery: returns ``loss``."""
        return loss
