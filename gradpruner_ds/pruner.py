"""GradPruner inside a training loop: observe the first steps, plan, merge, cut, and go on.

Usage with any engine (plain PyTorch shown; ``gradpruner_ds.backends`` adapts DeepSpeed / FSDP2)::

    pruner = GradPruner(model, config, total_steps=num_steps)
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        pruner.observe()                    # after backward and clipping, before the optimizer step
        optimizer.step(); scheduler.step(); optimizer.zero_grad()
        optimizer, scheduler = pruner.maybe_prune(optimizer, scheduler)
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from gradpruner_ds.arch import ArchSpec, decoder_layers, get_arch, unwrap_model
from gradpruner_ds.backends.plain import Backend
from gradpruner_ds.config import GradPrunerConfig
from gradpruner_ds.core.igia import Key, sq_norms
from gradpruner_ds.core.plan import PrunePlan, make_plan
from gradpruner_ds.core.scoring import ScoreContext, get_criterion, layer_scores
from gradpruner_ds.diagnostics import rss_bytes
from gradpruner_ds.engine import EngineAdapter
from gradpruner_ds.errors import user_error
from gradpruner_ds.log import get_logger
from gradpruner_ds.merging import merge_layers
from gradpruner_ds.recovery import Distiller
from gradpruner_ds.repair import Repairer, refusal
from gradpruner_ds.report import StepTimer, build_report, check_report_dir, tracker_events, write_report
from gradpruner_ds.stages import combine, original_indices
from gradpruner_ds.statistics import BuildContext, IGIAStatistic, Statistic, build_statistics
from gradpruner_ds.surgery import remove_layers

log = get_logger("pruner")

STEP_TIMES = 5
"""Steps timed after the prune for the report's step-time ratio."""


def count_params(model: nn.Module, backend: EngineAdapter | None = None) -> int:
    """Number of parameters of the model as it is saved (whole tensors, also when the engine shards them):
    peft LoRA adapters are not counted, since the saved model has them merged into the weights they adapt."""
    total = 0
    for name, p in model.named_parameters():
        if ".lora_" not in name:
            total += backend.global_numel(p) if backend is not None else p.numel()  # type: ignore[arg-type]
    return total


class Continue(NamedTuple):
    """What ``maybe_prune`` returns on every engine: the objects the training loop uses from now on. It
    unpacks like the pair it was given (``optimizer, scheduler = pruner.maybe_prune(optimizer, scheduler)``)."""

    stepper: Any
    """What the loop calls ``.step()`` on: the torch optimizer (one process, FSDP2: the same object, pruned in
    place), or the DeepSpeed engine (a new engine after the prune)."""
    lr_scheduler: Any
    """The LR scheduler (the same object; its schedule continues)."""


class GradPruner:
    """Observes a window of optimizer steps, plans, (repairs,) merges and cuts the model in place; with
    ``stages > 1`` does so once per stage on the model the previous stage left.

    ``model`` is an HF CausalLM (or a peft-wrapped one) of a registered family. ``total_steps`` (the
    run's optimizer steps) is needed for ``window_fraction`` and checks the schedule fits in the run.
    """

    def __init__(
        self,
        model: nn.Module,
        config: GradPrunerConfig,
        *,
        total_steps: int | None = None,
        backend: EngineAdapter | None = None,
        seed: int = 0,
    ) -> None:
        self.config = config
        self.seed = seed  # only read by the 'random' criterion
        self.model = model
        self.backend: EngineAdapter = backend or Backend()
        # before any other collective: every rank runs the same settings (a mismatch names the field)
        self.backend.check_settings(
            {**config.model_dump(), "total_steps": total_steps, "seed": seed}, config.consensus_timeout_s
        )
        self.spec: ArchSpec = get_arch(model)
        self.num_layers = len(decoder_layers(model))
        """Decoder layers of the model as it was given (the original, dense model)."""
        self.window = config.resolve_window(total_steps)
        self.num_drop, self.num_merge = config.resolve_budget(self.num_layers)
        self.budgets = config.stage_budgets(self.num_layers)
        """Layers removed at each stage (one entry without progressive removal)."""
        if config.enabled and config.output_dir is not None and self.backend.rank == 0:
            check_report_dir(Path(config.output_dir))
        self.distiller: Distiller | None = None
        self._check_recovery_and_repair(total_steps)
        self.repairer: Repairer | None = None
        """The repair phase (``repair``): from a stage's plan to its cut, while its maps are fitted."""
        self.stage = 0
        self.stage_plans: list[PrunePlan] = []
        """The plans of the stages cut so far, each in the layer indices of the model it was made on."""
        self._wait = 0  # steps until the next stage's window opens
        self._window_start = 0  # optimizer steps done when the current window opened
        self._steps_done = 0  # maybe_prune calls: optimizer steps of the run so far
        self._resumed_stage: Mapping[str, Any] | None = (
            None  # a later stage's saved state, loaded after replay
        )
        self.statistics: dict[str, Statistic] = {}
        self.steps_seen = self.observed_steps = self.skipped_steps = 0
        self._paused = False
        self._timer = StepTimer(STEP_TIMES)
        self._warned_eval = False
        self.plan: PrunePlan | None = None
        """The whole prune in the original layer indices, once every stage is cut (None before)."""
        self.report: dict[str, Any] | None = None
        self._stage_reports: list[dict[str, Any]] = []
        self._bar: Any = None
        # last (no hook may outlive a failed check above): the statistics of the first window
        self._open_window()
        igia = self.igia
        self.mode = igia.mode if igia is not None else "none"
        """How gradients are read: "full", "lora" (peft adapters), or "none" (no statistic reads them)."""
        log.info(
            "observing %d steps (collecting: %s; criterion %s); then removing %d of %d layers (%d dropped, %d merged)%s",
            self.window,
            ", ".join(self.statistics) or "no statistics",
            config.effective_criterion,
            self.num_drop + self.num_merge,
            self.num_layers,
            self.num_drop,
            self.num_merge,
            f" in {config.stages} stages {self.budgets}, {config.stage_interval} steps apart"
            if config.stages > 1
            else "",
        )

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

    # ---- statistics ---------------------------------------------------------------------------------
    @property
    def igia(self) -> IGIAStatistic | None:
        """The IGIA statistic while it is collected (an IGIA criterion, or the masks of a merge), else None."""
        stat = self.statistics.get("igia")
        return stat if isinstance(stat, IGIAStatistic) else None

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

    def _open_window(self) -> None:
        """Build the statistics of the current stage's window on the model as it is now (nothing when disabled)."""
        self.steps_seen = self.observed_steps = self.skipped_steps = 0
        self._window_start = self._steps_done
        if not self.config.enabled:
            return
        self.statistics = build_statistics(
            BuildContext(
                model=self.model,
                spec=self.spec,
                config=self.config,
                backend=self.backend,
                criterion=get_criterion(self.config.effective_criterion),
                window=self.window,
                num_layers=len(decoder_layers(self.model)),
                budget=self.budgets[self.stage],
                num_merge=self.num_merge,
            )
        )

    def _close_statistics(self, keep_igia: bool = False) -> None:
        """The window is over: every statistic removes its hooks and frees its state (IGIA stays while the
        merge still reads it, ``keep_igia``)."""
        for name in list(self.statistics):
            if not (keep_igia and name == "igia"):
                self.statistics.pop(name).close()

    def _repair_statistic(self) -> list[Statistic]:
        return [self.repairer.statistic] if self.repairer is not None and self.repairer.statistic else []

    # ---- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything this rank's pruner measured and decided: step counts, the plans once made, and this
        rank's piece of every statistic it collects (IGIA, hidden-state sums, repair sums). Tensors and
        JSON-able values only; :mod:`gradpruner_ds.checkpoint` writes it without pickle."""
        repairer = self.repairer
        return {
            "config_digest": self.config.config_digest(),
            "num_layers": self.num_layers,
            "world_size": self.backend.world_size,
            "steps_seen": self.steps_seen,
            "observed_steps": self.observed_steps,
            "skipped_steps": self.skipped_steps,
            "plan": json.loads(self.plan.to_json()) if self.plan is not None else None,
            "stage": self.stage,
            "stages": [json.loads(p.to_json()) for p in self.stage_plans] if self.plan is None else [],
            "wait": self._wait,
            "window_start": self._window_start,
            "steps_done": self._steps_done,
            "repair": None
            if repairer is None
            else {"plan": json.loads(repairer.plan.to_json()), **repairer.state_dict()},
            "statistics": {
                **{name: stat.state_dict() for name, stat in self.statistics.items()},
                "recovery": self.distiller.state_dict()
                if self.distiller is not None and self.distiller.active
                else None,
                "repair": repairer.statistic_state() if repairer is not None else None,
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> PrunePlan | None:
        """Restore :meth:`state_dict` into this (dense, unpruned) pruner. Returns the plan whose surgery the
        caller replays (:meth:`replay`) when the saved run had cut layers (all stages, or the stages done so
        far: the rest of the state is restored after that surgery), else None."""
        if state["config_digest"] != self.config.config_digest():
            raise user_error(
                "the gradpruner block must be the same as when the checkpoint was saved",
                "config digest differs",
                "resume with the original gradpruner settings",
            )
        if state["num_layers"] != self.num_layers:
            raise user_error(
                "the checkpoint was saved for a model with another number of decoder layers",
                f"{state['num_layers']} in the checkpoint, {self.num_layers} now",
                "build the same (dense) model as the run that saved the checkpoint",
            )
        if self.plan is not None or self.stage_plans:
            raise AssertionError("load_state_dict needs the dense (unpruned) pruner")
        recovery = (state.get("statistics") or {}).get("recovery")
        if recovery is not None and self.config.recovery is not None:  # resumed during the distillation
            # the dense model's copy, then the saved teacher weights
            self.distiller = Distiller(self.config.recovery, self.backend.make_teacher(self.model))
            self.distiller.load_state_dict(recovery)
        if state["plan"] is not None:
            plan = PrunePlan.from_dict(state["plan"])
            self._steps_done = int(state.get("steps_done", 0))
            if self.config.observe_only:  # nothing was cut: the plan is the run's result, not a surgery
                self.plan = plan
                self._close_statistics()
                return None
            return plan
        if state["world_size"] != self.backend.world_size:
            raise user_error(
                "resuming inside the observation window or the repair phase needs the same world size (their "
                "statistics are saved per rank shard)",
                f"saved with {state['world_size']} ranks, now {self.backend.world_size}",
                "resume with the original number of ranks, or restart the window",
            )
        stages = [PrunePlan.from_dict(d) for d in state.get("stages", [])]
        if stages:  # between stages, or inside a later stage: that stage's state after the replayed surgery
            self._resumed_stage = state
            return combine(stages, self.num_layers)
        self._restore_stage(state)
        return None

    def _restore_stage(self, state: Mapping[str, Any]) -> None:
        """The current stage's counters and statistics (its window, or its repair phase) from a saved state; a
        later stage's window statistics are built first, on the (replayed) pruned model."""
        self.stage = int(state.get("stage", 0))
        self._wait = int(state.get("wait", 0))
        if state.get("repair") is None and self._wait == 0 and not self.statistics:
            self._open_window()
        self._steps_done = int(state.get("steps_done", 0))
        self._window_start = int(state.get("window_start", 0))
        self.steps_seen = int(state["steps_seen"])
        self.observed_steps = int(state["observed_steps"])
        self.skipped_steps = int(state["skipped_steps"])
        stats = state.get("statistics") or {}
        pending = state.get("repair")
        if pending is not None:  # saved during the repair phase: its plan and sums
            if self.config.repair is None:
                raise user_error(
                    "the checkpoint was saved during the repair phase of a run with a 'repair' sub-block",
                    "no repair sub-block now",
                    "resume with the gradpruner block of the run that saved it",
                )
            plan = PrunePlan.from_dict(pending["plan"])
            self.backend.check_plan(plan, self.config.consensus_timeout_s)
            self._close_statistics()
            self.repairer = Repairer(self.config.repair, self.model, self.spec, self.backend, plan)
            self.repairer.load_state_dict(pending, stats.get("repair"))
            return
        if self._wait > 0:  # between stages: no window is open
            self._close_statistics()
            return
        saved = {k for k, v in stats.items() if k not in ("recovery", "repair") and v is not None}
        if saved != set(self.statistics):
            raise user_error(
                "the checkpoint's statistics must be those this criterion collects",
                f"saved {sorted(saved)}, collected now {sorted(self.statistics)}",
                "resume with the gradpruner block of the run that saved it",
            )
        for name, stat in self.statistics.items():
            stat.load_state_dict(stats[name])

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

    # ---- where the run is ------------------------------------------------------------------------------
    def _active(self) -> bool:
        return self.config.enabled and self.plan is None and self._wait == 0

    @property
    def observing(self) -> bool:
        """True while an observation window, or the repair phase after it, is open."""
        if not self._active():
            return False
        return not self.repairer.done if self.repairer is not None else self.steps_seen < self.window

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
        return self.repairer.done if self.repairer is not None else self.steps_seen >= self.window

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
        self._warn_eval_mode()
        if self.repairer is not None:  # the repair phase: the step's sums count iff its gradients are finite
            ok, _ = self._gradients_finite()
            for stat in self._repair_statistic():
                stat.update(ok)
            self.repairer.step(ok)
            if not ok:
                log.warning("repair step %d has non-finite gradients: not counted", self.repairer.steps_seen)
            self._progress(self.repairer.steps_seen, self.repairer.config.steps, "gradpruner: repair")
            return
        reads = [r for stat in self.statistics.values() if (r := stat.step_gradients()) is not None]
        if not reads:  # no statistic reads gradients: the finite check of every trainable gradient
            ok, scale = self._gradients_finite()
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
        self._progress(self.steps_seen, self.window, "gradpruner: observing")

    def _gradients_finite(self) -> tuple[bool, float]:
        """Whether every trainable gradient is finite on every rank (one read of each local piece)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        pieces = [(p, g) for p in params if (g := self.backend.local_grad(p)) is not None]
        norms = sq_norms(g for _, g in pieces)
        return self.backend.step_check([g for _, g in pieces], norms, [p for p, _ in pieces])

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
            budget=self.budgets[self.stage],
            spans=spans,
            seed=self.seed,
            given=tuple(self.config.layers_to_remove or ()),
        )
        return layer_scores(table, keys, crit.name, ctx)

    def make_plan(self, step: int | None = None) -> PrunePlan:
        """Scores -> the frozen plan of the current stage (in the indices of the model as it is now), checked
        for agreement across ranks."""
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
        scores = self.compute_scores()
        bad = {i: s for i, s in enumerate(scores) if not math.isfinite(s)}
        if bad:
            raise user_error(
                f"every layer score must be finite (criterion '{self.config.effective_criterion}')",
                f"non-finite scores of layers {bad}",
                "check the model for inf/nan activations or weights; GradPruner never ranks a non-finite score",
            )
        current = self.current_layers
        plan = make_plan(
            scores,
            self.budgets[self.stage] - self.num_merge,
            self.num_merge,
            criterion=self.config.effective_criterion,
            observed_steps=self.observed_steps,
            skipped_steps=self.skipped_steps,
            step=self._window_start + self.steps_seen if step is None else step,
            config_digest=self.config.config_digest(),
            model_type=str(getattr(unwrap_model(self.model).config, "model_type", "")),
            extra={
                "mode": self.mode,
                "keep_fraction": self.config.keep_fraction,
                "sign_consistent": self.config.sign_consistent,
                "merge_rule": self.config.merge_rule,
            },
            protect=[current.index(i) for i in self.config.protect_layers],
        )
        self.backend.check_plan(plan, self.config.consensus_timeout_s)
        return plan

    # ---- the whole prune ----------------------------------------------------------------------------
    def maybe_prune(self, optimizer: Any = None, lr_scheduler: Any = None) -> Continue:
        """Call once per optimizer step with what the loop steps (the torch optimizer, or the DeepSpeed
        engine) and the LR scheduler. Plans and cuts when a window (or repair phase) is complete, opens the
        next stage's window when its time comes, and returns the objects to use from now on
        (:class:`Continue`). Also times the steps before and after the first cut for the report."""
        self._steps_done += 1
        self._record_step_time()
        if self.stage_plans and self.distiller is not None:  # one more step of the pruned model done
            self.distiller.step_done()
        if self._wait > 0:
            self._wait -= 1
            if self._wait == 0:
                self._open_window()
            return Continue(optimizer, lr_scheduler)
        if not self.ready:
            return Continue(optimizer, lr_scheduler)
        out = Continue(*self.prune(optimizer, lr_scheduler))
        self._timer.restart()  # the next interval is a plain step of the smaller model
        return out

    def prune(self, optimizer: Any = None, lr_scheduler: Any = None) -> tuple[Any, Any]:
        """Plan the current stage, (repair,) merge, remove its layers and rebuild the optimizer; training
        continues after it. With ``repair`` the window's end only plans and opens the repair phase; the cut
        comes at its end. With ``observe_only`` the plan and the report are made and nothing else changes."""
        t0 = time.perf_counter()
        repair = self.config.repair
        if repair is not None and self.repairer is None:  # the window ends: plan, then the repair phase
            plan = self.make_plan()
            self._close_statistics()
            self.repairer = Repairer(repair, self.model, self.spec, self.backend, plan)
            return optimizer, lr_scheduler
        plan = self.repairer.plan if self.repairer is not None else self.make_plan()
        self._close_statistics(keep_igia=True)  # the hooks end with the window; the merge reads IGIA
        params_before = count_params(self.model, self.backend)
        rss_before = rss_bytes()
        if self.config.observe_only:
            self.plan = plan
            self._close_statistics()
            params_after = params_before - sum(
                count_params(decoder_layers(self.model)[i], self.backend) for i in plan.removed
            )
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
            optimizer, lr_scheduler = self._cut(plan, optimizer, lr_scheduler)
            if folded and repair is not None and repair.optimizer_state == "reset":
                self.backend.reset_optimizer_state(optimizer, folded)
            params_after = count_params(self.model, self.backend)
        extra["memory"] = {"rss_bytes_before": rss_before, "rss_bytes_after": rss_bytes()}
        self._update_report(plan, params_before, params_after, extra, time.perf_counter() - t0)
        if self.plan is None and not self.config.observe_only:  # more stages follow
            self.stage += 1
            self._wait = self.config.stage_interval - self.window - (repair.steps if repair else 0)  # type: ignore[operator]
            if self._wait == 0:
                self._open_window()
        return optimizer, lr_scheduler

    def _update_report(
        self, plan: PrunePlan, params_before: int, params_after: int, extra: dict[str, Any], seconds: float
    ) -> None:
        """The report of the prune so far (every stage's entry when there are several), written on rank 0, and
        the tracker events; the log line of this cut."""
        total = self.whole or plan
        stage_entry = {
            "stage": self.stage,
            "plan": plan.to_dict(),
            "removed_original": [
                original_indices(self.num_layers, self.stage_plans[:-1])[i] for i in plan.removed
            ]
            if self.stage_plans
            else list(plan.removed),
            "params_before": params_before,
            "params_after": params_after,
            "prune_s": seconds,
            **extra,
        }
        self._stage_reports.append(stage_entry)
        first = self._stage_reports[0]
        self.report = build_report(
            total, params_before=first["params_before"], params_after=params_after, extra=extra
        )
        self.report["prune_s"] = sum(r["prune_s"] for r in self._stage_reports)
        if self.config.stages > 1:
            self.report["stages"] = self._stage_reports
        if self.distiller is not None:
            self.report["recovery"] = {
                **self.config.recovery.model_dump(),  # type: ignore[union-attr]
                "teacher_bytes": self.distiller.teacher_bytes(),
            }
        self._write_report()
        self.backend.log_events(self.events(), self._steps_done)
        log.info(
            "%s layers %s (dropped %s, merged %s)%s; parameters %d -> %d (%.1f%%)",
            "observe_only: would prune" if self.config.observe_only else "pruned",
            stage_entry["removed_original"],
            list(plan.dropped),
            [f"{p}->{t}" for p, t in plan.targets],
            f" at stage {self.stage + 1} of {self.config.stages}" if self.config.stages > 1 else "",
            params_before,
            params_after,
            100.0 * params_after / params_before,
        )

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
        if not self._stage_reports or self.report is None:
            return {}
        return tracker_events(self.whole or self.stage_plans[0], self.report)

    def _record_step_time(self) -> None:
        entry = self._timer.tick(pruned=bool(self.stage_plans))
        if entry is not None and self.report is not None:
            self.report["step_time_s"] = entry
            self._write_report(update=True)

    def _cut(self, plan: PrunePlan, optimizer: Any, lr_scheduler: Any) -> tuple[Any, Any]:
        """Remove the stage plan's layers, forget every reference to them, rebuild the optimizer/engine."""
        self.stage_plans.append(plan)
        whole = combine(self.stage_plans, self.num_layers)
        if len(self.stage_plans) == len(self.budgets):
            self.plan = whole
        removed_params = apply_surgery(self.model, plan, whole)
        self._close_statistics()  # frees the IGIA state; no reference to removed parameters may survive
        return self.backend.rebuild(self.model, removed_params, optimizer, lr_scheduler)

    def replay(self, plan: PrunePlan, optimizer: Any = None, lr_scheduler: Any = None) -> tuple[Any, Any]:
        """Re-apply a saved plan's surgery to the dense model (resume; the plan :meth:`load_state_dict`
        returned): no scoring and no merge, since the checkpoint that is loaded next holds the merged weights.
        A run saved between stages gets its current stage back on the pruned model."""
        if plan.num_layers != self.num_layers or plan.config_digest != self.config.config_digest():
            raise user_error(
                "a saved plan must come from the same model and gradpruner settings",
                f"plan for {plan.num_layers} layers / config {plan.config_digest[:12]}",
                "resume with the dense model and the gradpruner block of the run that saved it",
            )
        if self.plan is not None or self.stage_plans:
            raise AssertionError("the model is already pruned")
        self.backend.check_plan(plan, self.config.consensus_timeout_s)
        log.info("resuming a pruned run: replaying the plan's surgery (layers %s)", list(plan.removed))
        resumed, self._resumed_stage = self._resumed_stage, None
        if resumed is None:  # every stage was cut: one surgery of the whole plan gives the same model
            self.stage = len(self.budgets) - 1
            return self._replay_stages([plan], optimizer, lr_scheduler, done=True)
        out = self._replay_stages(
            [PrunePlan.from_dict(d) for d in resumed["stages"]], optimizer, lr_scheduler
        )
        self._restore_stage(resumed)
        return out

    def _replay_stages(
        self, stages: list[PrunePlan], optimizer: Any, lr_scheduler: Any, done: bool = False
    ) -> tuple[Any, Any]:
        """One surgery of the stages' prune on the dense model (``done``: ``stages`` is the whole, final plan)."""
        whole = combine(stages, self.num_layers)
        removed_params = apply_surgery(self.model, whole)
        self.stage_plans = stages
        if done:
            self.plan = whole
        self._close_statistics()
        return self.backend.rebuild(self.model, removed_params, optimizer, lr_scheduler)

    def _write_report(self, update: bool = False) -> None:
        """Write the report on rank 0 (``update``: the same files again with the step times added). A failure
        here (disk full, folder gone) must not end a run whose expensive part is done: it is logged and
        training goes on."""
        if self.config.output_dir is None or self.backend.rank != 0 or self.report is None:
            return
        total = self.whole
        if total is None:
            return
        try:
            paths = write_report(Path(self.config.output_dir), self.report, total, plot=self.config.plot)
        except Exception as exc:  # noqa: BLE001 - any failure to write is reported, never fatal
            log.warning(
                "could not write the GradPruner report to %s (%s); training goes on",
                self.config.output_dir,
                exc,
            )
            return
        if update:
            log.debug("report updated with the step times: %s", ", ".join(str(p) for p in paths))
        else:
            log.info("report written: %s", ", ".join(str(p) for p in paths))


def apply_surgery(model: nn.Module, plan: PrunePlan, whole: PrunePlan | None = None) -> list[nn.Parameter]:
    """Remove the plan's layers (positions in the model as it is now) from ``model`` and record the prune in its
    config (``config.gradpruner``, saved with the model); returns the removed parameters (for the engine's
    rebuild to forget). ``whole``: the prune so far in original indices (default: the plan), whose digest and
    kept layers are recorded."""
    removed_params = [p for i in plan.removed for p in decoder_layers(model)[i].parameters()]
    remove_layers(model, list(plan.removed))
    whole = whole or plan
    unwrap_model(model).config.gradpruner = {
        "plan_digest": whole.digest(),
        "kept_layers": list(whole.kept),
        "original_num_layers": whole.num_layers,
    }
    return removed_params


class DisabledPruner:
    """What a training loop holds when GradPruner is off (``--gradpruner`` not given): the same calls as
    :class:`GradPruner`, each a no-op, so the loop needs no branch."""

    plan: PrunePlan | None = None
    observing = False
    repairing = False
    ready = False
    cutting = False

    def observe(self) -> None:
        """Nothing is observed."""

    def maybe_prune(self, optimizer: Any = None, lr_scheduler: Any = None) -> Continue:
        """Nothing is pruned: returns its arguments."""
        return Continue(optimizer, lr_scheduler)

    distilling = False

    def distill(self, loss: torch.Tensor, logits: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """No recovery: returns ``loss``."""
        return loss
