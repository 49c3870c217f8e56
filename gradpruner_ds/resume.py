"""Resuming a run: what :class:`~gradpruner_ds.pruner.GradPruner` saves (``state_dict``), restores
(``load_state_dict``) and replays on the dense model before the engine loads its own checkpoint (``replay``):
inside a window (its statistics, per rank), inside a repair phase (the plan and the sums), between stages and
after the last cut (the plans). :mod:`gradpruner_ds.checkpoint` writes and reads the files (JSON + safetensors,
no pickle)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from gradpruner_ds.arch import unwrap_model
from gradpruner_ds.core.plan import PrunePlan
from gradpruner_ds.errors import user_error
from gradpruner_ds.log import get_logger
from gradpruner_ds.recovery import Distiller
from gradpruner_ds.repair import Repairer
from gradpruner_ds.stages import combine
from gradpruner_ds.state_check import check_state
from gradpruner_ds.surgery import apply_surgery

if TYPE_CHECKING:
    from torch import nn

    from gradpruner_ds.arch import ArchSpec
    from gradpruner_ds.config import GradPrunerConfig
    from gradpruner_ds.engine import EngineAdapter
    from gradpruner_ds.window import Window

log = get_logger("resume")


class Resumable:
    """The state methods of :class:`~gradpruner_ds.pruner.GradPruner` (a mixin: ``self`` is the pruner; the
    attributes below are the pruner's)."""

    config: GradPrunerConfig
    model: nn.Module
    spec: ArchSpec
    backend: EngineAdapter
    num_layers: int
    budgets: list[int]
    win: Window
    distiller: Distiller | None
    repairer: Repairer | None
    plan: PrunePlan | None
    stage_plans: list[PrunePlan]
    stage: int
    _wait: int
    _steps_done: int
    _resumed_stage: Mapping[str, Any] | None
    prior: dict[str, Any] | None
    state_source: str = "the GradPruner state"
    """The file the restored state came from (named in the errors)."""

    def _new_window(self) -> Window:
        raise NotImplementedError  # the pruner's

    def state_dict(self) -> dict[str, Any]:
        """Everything this rank's pruner measured and decided: step counts, the plans once made, and this
        rank's piece of every statistic it collects (IGIA, hidden-state sums, repair sums). Tensors and
        JSON-able values only; :mod:`gradpruner_ds.checkpoint` writes it without pickle."""
        repairer = self.repairer
        return {
            "config_digest": self.config.config_digest(),
            "num_layers": self.num_layers,
            "model": self.model_signature(),
            "world_size": self.backend.world_size,
            **self.win.counts(),
            "plan": json.loads(self.plan.to_json()) if self.plan is not None else None,
            "stage": self.stage,
            "stages": [json.loads(p.to_json()) for p in self.stage_plans] if self.plan is None else [],
            "wait": self._wait,
            "window_start": self.win.start,
            "steps_done": self._steps_done,
            "repair": None
            if repairer is None
            else {"plan": json.loads(repairer.plan.to_json()), **repairer.state_dict()},
            "statistics": {
                **{name: stat.state_dict() for name, stat in self.win.statistics.items()},
                "recovery": self.distiller.state_dict()
                if self.distiller is not None and self.distiller.active
                else None,
                "repair": repairer.statistic_state() if repairer is not None else None,
            },
        }

    def model_signature(self) -> dict[str, Any]:
        """What identifies the model a state belongs to (checked on load: statistics of another width or family
        would make another plan)."""
        cfg = unwrap_model(self.model).config
        text = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
        keys = ("model_type", "hidden_size", "intermediate_size", "vocab_size", "num_attention_heads")
        return {"num_layers": self.num_layers, **{k: getattr(text, k, getattr(cfg, k, None)) for k in keys}}

    def load_state_dict(
        self, state: Mapping[str, Any], where: str = "the GradPruner state"
    ) -> PrunePlan | None:
        """Restore :meth:`state_dict` into this (dense, unpruned) pruner, every field checked first
        (:func:`gradpruner_ds.state_check.check_state`; ``where`` names the file in the errors). Returns the plan
        whose surgery the caller replays (:meth:`replay`) when the saved run had cut layers (all stages, or the
        stages done so far: the rest of the state is restored after that surgery), else None."""
        check_state(state, self, where)
        self.state_source = where
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
                self.win.close()
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
        later stage's window is opened first, on the (replayed) pruned model."""
        self.stage = int(state.get("stage", 0))
        self._wait = int(state.get("wait", 0))
        self._steps_done = int(state.get("steps_done", 0))
        stats = state.get("statistics") or {}
        pending = state.get("repair")
        if pending is None and self._wait == 0 and not self.win.statistics:
            self.win = self._new_window()
        self.win.start = int(state.get("window_start", 0))
        if pending is not None:  # saved during the repair phase: its plan and sums
            if self.config.repair is None:
                raise user_error(
                    "the checkpoint was saved during the repair phase of a run with a 'repair' sub-block",
                    "no repair sub-block now",
                    "resume with the gradpruner block of the run that saved it",
                )
            plan = PrunePlan.from_dict(pending["plan"])
            self.backend.check_plan(plan, self.config.consensus_timeout_s)
            self.win.close()
            self.win.steps_seen, self.win.observed_steps = (
                int(state["steps_seen"]),
                int(state["observed_steps"]),
            )
            self.win.skipped_steps = int(state["skipped_steps"])
            self.repairer = Repairer(self.config.repair, self.model, self.spec, self.backend, plan)
            with _field_errors(self.state_source, "statistics.repair"):
                self.repairer.load_state_dict(pending, stats.get("repair"))
        elif self._wait > 0:  # between stages: no window is open
            self.win.close()
        else:
            with _field_errors(self.state_source, "statistics"):
                self.win.load(state, stats)

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
        stages = [plan] if resumed is None else [PrunePlan.from_dict(d) for d in resumed["stages"]]
        whole = combine(stages, self.num_layers)  # one surgery of the stages' prune on the dense model
        removed_params = apply_surgery(self.model, whole, None, self.prior)
        self.stage_plans = stages
        self.win.close()
        if resumed is None:  # every stage was cut
            self.plan, self.stage = whole, len(self.budgets) - 1
        out = self.backend.rebuild(self.model, removed_params, optimizer, lr_scheduler)
        if resumed is not None:
            self._restore_stage(resumed)
        return out


@contextlib.contextmanager
def _field_errors(where: str, field: str) -> Iterator[None]:
    """A saved statistic that does not fit the model it is loaded into: a ``gradpruner:`` error naming the file."""
    try:
        yield
    except (AssertionError, KeyError, RuntimeError, TypeError, ValueError) as exc:
        if str(exc).startswith("gradpruner:"):
            raise
        raise user_error(
            f"{where}: '{field}' must be the statistics of this model and gradpruner block",
            f"{type(exc).__name__}: {exc}",
            "resume with the model and the gradpruner block of the run that saved it",
        ) from None
