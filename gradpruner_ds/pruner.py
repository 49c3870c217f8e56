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
from collections import defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from gradpruner_ds.arch import ArchSpec, decoder_layers, get_arch, unwrap_model
from gradpruner_ds.backends.base import Backend, EngineAdapter
from gradpruner_ds.config import GradPrunerConfig
from gradpruner_ds.core.igia import Key, sq_norms
from gradpruner_ds.core.merge import keep_count, kth_largest, topk_mask
from gradpruner_ds.core.plan import PrunePlan, make_plan
from gradpruner_ds.core.scoring import ScoreContext, get_criterion, layer_scores
from gradpruner_ds.diagnostics import rss_bytes
from gradpruner_ds.errors import user_error
from gradpruner_ds.log import get_logger
from gradpruner_ds.recovery import Distiller
from gradpruner_ds.repair import Repairer, refusal
from gradpruner_ds.report import build_report, check_report_dir, write_report
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
    """Observes IGIA for a window of optimizer steps, then prunes the model in place.

    ``model`` is an HF CausalLM (or a peft-wrapped one) of a registered family. ``total_steps`` (the
    run's optimizer steps) is needed for ``window_fraction`` and checks the window fits in the run.
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
        self.window = config.resolve_window(total_steps)
        self.num_drop, self.num_merge = config.resolve_budget(self.num_layers)
        if config.enabled and config.output_dir is not None and self.backend.rank == 0:
            check_report_dir(Path(config.output_dir))
        self.distiller: Distiller | None = None
        recovery = config.recovery
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
        self.repairer: Repairer | None = None
        """The repair phase (``repair``): from the plan to the prune, while its maps are fitted."""
        # last (no hook may outlive a failed check above): the statistics the criterion reads, plus IGIA for
        # the masks of a merge; nothing when disabled
        self.statistics: dict[str, Statistic] = {}
        if config.enabled:
            self.statistics = build_statistics(
                BuildContext(
                    model=model,
                    spec=self.spec,
                    config=config,
                    backend=self.backend,
                    criterion=get_criterion(config.effective_criterion),
                    window=self.window,
                    num_layers=self.num_layers,
                    budget=self.num_drop + self.num_merge,
                    num_merge=self.num_merge,
                )
            )
        igia = self.igia
        self.mode = igia.mode if igia is not None else "none"
        """How gradients are read: "full", "lora" (peft adapters), or "none" (no statistic reads them)."""
        self._paused = False
        self._last_call: float | None = None
        self._step_times: tuple[list[float], list[float]] = ([], [])
        self.steps_seen = 0
        self.observed_steps = 0  # steps whose statistics count (finite gradients)
        self.skipped_steps = 0  # steps left out (non-finite gradients / a skipped loss-scaler step)
        self._warned_eval = False
        self.plan: PrunePlan | None = None
        self.report: dict[str, Any] | None = None
        self._bar: Any = None
        log.info(
            "observing %d steps (collecting: %s; criterion %s); then removing %d of %d layers (%d dropped, %d merged)",
            self.window,
            ", ".join(self.statistics) or "no statistics",
            config.effective_criterion,
            self.num_drop + self.num_merge,
            self.num_layers,
            self.num_drop,
            self.num_merge,
        )

    # ---- statistics ---------------------------------------------------------------------------------
    @property
    def igia(self) -> IGIAStatistic | None:
        """The IGIA statistic while it is collected (an IGIA criterion, or the masks of a merge), else None."""
        stat = self.statistics.get("igia")
        return stat if isinstance(stat, IGIAStatistic) else None

    def _close_statistics(self, keep_igia: bool = False) -> None:
        """The window is over: every statistic removes its hooks and frees its state (IGIA stays while the
        merge still reads it, ``keep_igia``)."""
        for name in list(self.statistics):
            if not (keep_igia and name == "igia"):
                self.statistics.pop(name).close()

    # ---- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything this rank's pruner measured and decided: step counts, the plan once made, and this
        rank's piece of every statistic it collects (IGIA, hidden-state sums). Tensors and JSON-able values
        only; :mod:`gradpruner_ds.checkpoint` writes it without pickle."""
        return {
            "config_digest": self.config.config_digest(),
            "num_layers": self.num_layers,
            "world_size": self.backend.world_size,
            "steps_seen": self.steps_seen,
            "observed_steps": self.observed_steps,
            "skipped_steps": self.skipped_steps,
            "plan": json.loads(self.plan.to_json()) if self.plan is not None else None,
            "repair": None
            if self.repairer is None
            else {"plan": json.loads(self.repairer.plan.to_json()), **self.repairer.state_dict()},
            "statistics": {
                **{name: stat.state_dict() for name, stat in self.statistics.items()},
                "recovery": self.distiller.state_dict()
                if self.distiller is not None and self.distiller.active
                else None,
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> PrunePlan | None:
        """Restore :meth:`state_dict` into this (dense, unpruned) pruner. Returns the saved plan when the
        saved run was already pruned (the caller replays its surgery: :meth:`replay`), else None."""
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
        if self.plan is not None:
            raise AssertionError("load_state_dict needs the dense (unpruned) pruner")
        self.steps_seen = int(state["steps_seen"])
        self.observed_steps = int(state["observed_steps"])
        self.skipped_steps = int(state["skipped_steps"])
        recovery = (state.get("statistics") or {}).get("recovery")
        if recovery is not None and self.config.recovery is not None:  # resumed during the distillation
            # the dense model's copy, then the saved teacher weights
            self.distiller = Distiller(self.config.recovery, self.backend.make_teacher(self.model))
            self.distiller.load_state_dict(recovery)
        pending = state.get("repair")
        if pending is not None and state["plan"] is None:  # saved during the repair phase: its plan and sums
            if self.config.repair is None:
                raise user_error(
                    "the checkpoint was saved during the repair phase of a run with a 'repair' sub-block",
                    "no repair sub-block now",
                    "resume with the gradpruner block of the run that saved it",
                )
            if state["world_size"] != self.backend.world_size:
                raise user_error(
                    "resuming inside the repair phase needs the same world size (its sums are saved per rank)",
                    f"saved with {state['world_size']} ranks, now {self.backend.world_size}",
                    "resume with the original number of ranks",
                )
            plan = PrunePlan.from_dict(pending["plan"])
            self.backend.check_plan(plan, self.config.consensus_timeout_s)
            self._close_statistics()
            self.repairer = Repairer(self.config.repair, self.model, self.spec, self.backend, plan)
            self.repairer.load_state_dict(pending)
            return None
        if state["plan"] is not None:
            plan = PrunePlan.from_dict(state["plan"])
            if self.config.observe_only:  # nothing was cut: the plan is the run's result, not a surgery
                self.plan = plan
                self._close_statistics()
                return None
            return plan
        if state["world_size"] != self.backend.world_size:
            raise user_error(
                "resuming inside the observation window needs the same world size (statistics are saved per "
                "rank shard)",
                f"saved with {state['world_size']} ranks, now {self.backend.world_size}",
                "resume with the original number of ranks, or restart the window",
            )
        saved = {k for k, v in state["statistics"].items() if k != "recovery" and v is not None}
        if saved != set(self.statistics):
            raise user_error(
                "the checkpoint's statistics must be those this criterion collects",
                f"saved {sorted(saved)}, collected now {sorted(self.statistics)}",
                "resume with the gradpruner block of the run that saved it",
            )
        for name, stat in self.statistics.items():
            stat.load_state_dict(state["statistics"][name])
        return None

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

    @property
    def observing(self) -> bool:
        """True while the observation window, or the repair phase after it, is open."""
        if not self.config.enabled or self.plan is not None:
            return False
        if self.repairer is not None:
            return not self.repairer.done
        return self.steps_seen < self.window

    @property
    def repairing(self) -> bool:
        """True during the repair phase: the plan is made, the model still dense, the maps being fitted."""
        return self.repairer is not None and self.plan is None

    @property
    def ready(self) -> bool:
        """True when the next ``maybe_prune`` acts: the window is complete (it plans, and prunes unless a
        repair phase follows), or the repair phase is (it prunes)."""
        if not self.config.enabled or self.plan is not None:
            return False
        if self.repairer is not None:
            return self.repairer.done
        return self.steps_seen >= self.window

    # ---- observation --------------------------------------------------------------------------------
    def observe(self) -> None:
        """End of one optimizer step of the window: check the step's gradients are finite on every rank,
        accumulate IGIA from them (when the criterion or a merge reads it) and commit the step's hidden-state
        sums, or leave the step out of every statistic. Call after backward (and clipping), before the
        optimizer step, once per optimizer step. A no-op outside the window or while paused."""
        if not self.observing or self._paused or not self.backend.at_boundary():
            return
        self._warn_eval_mode()
        if self.repairer is not None:  # the repair phase: the step's sums count iff its gradients are finite
            ok, _ = self._gradients_finite()
            for stat in self._repair_statistic():
                stat.update(ok)
            self.repairer.step(ok)
            if not ok:
                log.warning("repair step %d has non-finite gradients: its activations are not counted", self.repairer.steps_seen)
            self._progress(self.repairer.steps_seen, self.config.repair.steps, "gradpruner: repair")  # type: ignore[union-attr]
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
        """Global per-layer scores: the criterion's statistic reduced over ranks (one SUM all-reduce of its
        packed partial table), then scored."""
        crit = get_criterion(self.config.effective_criterion)
        keys: list[Key] = []
        spans: tuple[int, ...] = ()
        if not crit.reads:  # no data: nothing to reduce
            table = torch.zeros(1, self.num_layers, dtype=torch.float64)
        else:
            (name,) = crit.reads
            stat = self.statistics[name]
            table = stat.reduce(self.backend)
            keys, spans = list(stat.keys), tuple(stat.spans)
        ctx = ScoreContext(
            self.num_layers,
            self.spec.residual_writers,
            budget=self.num_drop + self.num_merge,
            spans=spans,
            seed=self.seed,
            given=tuple(self.config.layers_to_remove or ()),
        )
        return layer_scores(table, keys, crit.name, ctx)

    def make_plan(self, step: int | None = None) -> PrunePlan:
        """Scores -> the frozen plan, checked for agreement across ranks."""
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
        plan = make_plan(
            scores,
            self.num_drop,
            self.num_merge,
            criterion=self.config.effective_criterion,
            observed_steps=self.observed_steps,
            skipped_steps=self.skipped_steps,
            step=self.steps_seen if step is None else step,
            config_digest=self.config.config_digest(),
            model_type=str(getattr(unwrap_model(self.model).config, "model_type", "")),
            extra={
                "mode": self.mode,
                "keep_fraction": self.config.keep_fraction,
                "sign_consistent": self.config.sign_consistent,
                "merge_rule": self.config.merge_rule,
            },
            protect=self.config.protect_layers,
        )
        self.backend.check_plan(plan, self.config.consensus_timeout_s)
        return plan

    # ---- the merge ------------------------------------------------------------------------------------
    def merge(self, plan: PrunePlan) -> dict[str, Any]:
        """Sparsify each merged layer by its IGIA and add it, sign-consistently, into its target.

        Returns merge statistics (global fractions of entries selected by the top-p mask and merged).
        """
        if not plan.merged:
            return {"merge": []}
        stat = self.igia
        assert stat is not None  # collected whenever num_merge > 0
        weights = stat.weights
        names = list(self.spec.linear_names)
        mkeys = [(p, n) for p in plan.merged for n in names]
        igia = {k: stat.igia(k).reshape(-1) for k in mkeys}
        if self.config.merge_rule == "laco":  # unmasked: every entry of this rank's piece
            masks = {k: torch.ones_like(igia[k], dtype=torch.bool) for k in mkeys}
        else:
            ks = [keep_count(self.backend.global_numel(weights[k]), self.config.keep_fraction) for k in mkeys]
            thresholds = kth_largest([igia[k] for k in mkeys], ks, self.backend.all_reduce_sum_)
            masks = {k: topk_mask(igia[k], thr) for k, thr in zip(mkeys, thresholds, strict=True)}
        del igia
        by_target: dict[int, list[int]] = defaultdict(list)
        for p, t in plan.targets:
            by_target[t].append(p)
        groups = [
            ((t, n), [((p, n), masks[(p, n)]) for p in sources])
            for t, sources in sorted(by_target.items())
            for n in names
        ]
        # each target matrix is merged in one call, so every source's sign test sees the ORIGINAL target
        local_counts = self.backend.apply_merge(
            weights, groups, self.config.merge_rule, self.config.sign_consistent
        )
        counts = torch.tensor([list(local_counts.get(k, (0, 0))) for k in mkeys], dtype=torch.int64)
        self.backend.all_reduce_sum_(counts)
        col = {k: i for i, k in enumerate(mkeys)}
        stats = []
        for k in mkeys:
            numel = self.backend.global_numel(weights[k])
            sel, added = counts[col[k]].tolist()
            stats.append(
                {
                    "layer": k[0],
                    "sublayer": k[1],
                    "mask_density": sel / numel,
                    "merged_density": added / numel,
                }
            )
        return {"merge": stats}

    # ---- the whole prune ----------------------------------------------------------------------------
    def maybe_prune(self, optimizer: Any = None, lr_scheduler: Any = None) -> Continue:
        """Call once per optimizer step with what the loop steps (the torch optimizer, or the DeepSpeed
        engine) and the LR scheduler. Prunes when the window is complete, and returns the objects to use
        from now on (:class:`Continue`). Also times the steps before and after the prune for the report."""
        self._time_step()
        if self.plan is not None and self.distiller is not None:  # one more step of the pruned model done
            self.distiller.step_done()
        if not self.ready:
            return Continue(optimizer, lr_scheduler)
        out = Continue(*self.prune(optimizer, lr_scheduler))
        self._last_call = time.perf_counter()  # the next interval is a plain step of the smaller model
        return out

    def prune(self, optimizer: Any = None, lr_scheduler: Any = None) -> tuple[Any, Any]:
        """Plan, merge, remove the layers and rebuild the optimizer; training continues after it. With
        ``observe_only`` the plan and the report are made and nothing else changes."""
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
            merge_stats: dict[str, Any] = {"observe_only": True, "merge": []}
        else:
            if self.config.recovery is not None:  # the teacher: the model just before the prune
                self.distiller = Distiller(self.config.recovery, self.backend.make_teacher(self.model))
                self.distiller.announce()
            merge_stats = self.merge(plan)
            folded: list[nn.Parameter] = []
            if self.repairer is not None:
                merge_stats["repair"], folded = self.repairer.fold()
            optimizer, lr_scheduler = self._cut(plan, optimizer, lr_scheduler)
            if folded and repair is not None and repair.optimizer_state == "reset":
                self.backend.reset_optimizer_state(optimizer, folded)
            params_after = count_params(self.model, self.backend)
        self.report = build_report(
            plan,
            params_before=params_before,
            params_after=params_after,
            extra={**merge_stats, "memory": {"rss_bytes_before": rss_before, "rss_bytes_after": rss_bytes()}},
        )
        self.report["prune_s"] = time.perf_counter() - t0
        if self.distiller is not None:
            self.report["recovery"] = {
                **self.config.recovery.model_dump(),  # type: ignore[union-attr]
                "teacher_bytes": self.distiller.teacher_bytes(),
            }
        self._write_report()
        self.backend.log_events(self.events(), self.steps_seen)
        log.info(
            "%s layers %s (dropped %s, merged %s); parameters %d -> %d (%.1f%%)",
            "observe_only: would prune" if self.config.observe_only else "pruned",
            list(plan.removed),
            list(plan.dropped),
            [f"{p}->{t}" for p, t in plan.targets],
            params_before,
            params_after,
            100.0 * params_after / params_before,
        )
        return optimizer, lr_scheduler

    @property
    def distilling(self) -> bool:
        """True from the prune until ``recovery.distill_steps`` steps later (the teacher is alive)."""
        return self.distiller is not None and self.distiller.active

    def distill(self, loss: torch.Tensor, logits: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """The training loss to backpropagate: ``loss`` plus, during the ``recovery.distill_steps`` steps after
        the prune, the self-distillation term from the pre-prune teacher on the same ``batch``. Call it on
        every micro-batch: ``loss = pruner.distill(out.loss, out.logits, batch)``."""
        if self.distiller is None or not self.distiller.active:
            return loss
        return self.distiller.loss(loss, logits, batch)

    def events(self) -> dict[str, float]:
        """Scalar events of the prune for experiment trackers (``gradpruner/...``): layers and parameters
        before and after, steps observed / skipped, prune time, every layer's score (1.0 = removed in
        ``gradpruner/removed/<layer>``)."""
        if self.plan is None or self.report is None:
            return {}
        plan, report = self.plan, self.report
        out = {
            "gradpruner/layers_before": float(plan.num_layers),
            "gradpruner/layers_after": float(plan.num_layers - len(plan.removed)),
            "gradpruner/params_before": float(report["params_before"]),
            "gradpruner/params_after": float(report["params_after"]),
            "gradpruner/observed_steps": float(plan.observed_steps),
            "gradpruner/skipped_steps": float(plan.skipped_steps),
            "gradpruner/prune_s": float(report.get("prune_s", 0.0)),
        }
        for i, score in enumerate(plan.scores):
            out[f"gradpruner/score/{i}"] = float(score)
            out[f"gradpruner/removed/{i}"] = float(i in plan.removed)
        return out

    def _time_step(self) -> None:
        """Wall time between consecutive maybe_prune calls (= one optimizer step): the steps of the window
        and the first ``STEP_TIMES`` steps after the prune, added to the report once measured."""
        now = time.perf_counter()
        last, self._last_call = self._last_call, now
        if last is None:
            return
        if self.plan is None:
            self._step_times[0].append(now - last)
        elif len(self._step_times[1]) < STEP_TIMES:
            self._step_times[1].append(now - last)
            if len(self._step_times[1]) == STEP_TIMES and self.report is not None:
                before, after = (sorted(t)[len(t) // 2] if t else None for t in self._step_times)
                self.report["step_time_s"] = {
                    "before_median": before,
                    "after_median": after,
                    "after_over_before": after / before if before and after else None,
                    "steps": [len(self._step_times[0]), STEP_TIMES],
                }
                self._write_report(update=True)

    def _cut(self, plan: PrunePlan, optimizer: Any, lr_scheduler: Any) -> tuple[Any, Any]:
        """Remove the plan's layers, forget every reference to them, rebuild the optimizer/engine."""
        removed_params = apply_surgery(self.model, plan)
        self.plan = plan
        self._close_statistics()  # frees the IGIA state; no reference to removed parameters may survive
        return self.backend.rebuild(self.model, removed_params, optimizer, lr_scheduler)

    def replay(self, plan: PrunePlan, optimizer: Any = None, lr_scheduler: Any = None) -> tuple[Any, Any]:
        """Re-apply a saved plan's surgery to the dense model (resume): no scoring and no merge, since
        the checkpoint that is loaded next holds the merged weights."""
        if plan.num_layers != self.num_layers or plan.config_digest != self.config.config_digest():
            raise user_error(
                "a saved plan must come from the same model and gradpruner settings",
                f"plan for {plan.num_layers} layers / config {plan.config_digest[:12]}",
                "resume with the dense model and the gradpruner block of the run that saved it",
            )
        if self.plan is not None:
            raise AssertionError("the model is already pruned")
        self.backend.check_plan(plan, self.config.consensus_timeout_s)
        log.info("resuming a pruned run: replaying the plan's surgery (layers %s)", list(plan.removed))
        return self._cut(plan, optimizer, lr_scheduler)

    def _write_report(self, update: bool = False) -> None:
        """Write the report on rank 0 (``update``: the same files again with the step times added). A failure
        here (disk full, folder gone) must not end a run whose expensive part is done: it is logged and
        training goes on."""
        if self.config.output_dir is None or self.backend.rank != 0:
            return
        assert self.plan is not None and self.report is not None
        try:
            paths = write_report(Path(self.config.output_dir), self.report, self.plan, plot=self.config.plot)
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


def apply_surgery(model: nn.Module, plan: PrunePlan) -> list[nn.Parameter]:
    """Remove the plan's layers from ``model`` and record the plan in its config (``config.gradpruner``, saved
    with the model); returns the removed parameters (for the engine's rebuild to forget)."""
    removed_params = [p for i in plan.removed for p in decoder_layers(model)[i].parameters()]
    remove_layers(model, list(plan.removed))
    unwrap_model(model).config.gradpruner = {
        "plan_digest": plan.digest(),
        "kept_layers": list(plan.kept),
        "original_num_layers": plan.num_layers,
    }
    return removed_params


class DisabledPruner:
    """What a training loop holds when GradPruner is off (``--gradpruner`` not given): the same calls as
    :class:`GradPruner`, each a no-op, so the loop needs no branch."""

    plan: PrunePlan | None = None
    observing = False
    repairing = False
    ready = False

    def observe(self) -> None:
        """Nothing is observed."""

    def maybe_prune(self, optimizer: Any = None, lr_scheduler: Any = None) -> Continue:
        """Nothing is pruned: returns its arguments."""
        return Continue(optimizer, lr_scheduler)

    distilling = False

    def distill(self, loss: torch.Tensor, logits: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """No recovery: returns ``loss``."""
        return loss
