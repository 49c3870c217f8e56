"""No field of a saved GradPruner state is trusted: :func:`check_state` checks every field of ``state.json`` (and
the statistics of a rank's file) for its type, its range, its consistency with the other fields and with the
pruner it is loaded into (the settings' digest, the model's signature, the window, the stages, the repair
phase), and every plan for its digest. A failure is a ``gradpruner:`` error naming the file and the field."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from gradpruner_ds.core.plan import PrunePlan
from gradpruner_ds.errors import GradPrunerError, user_error

FIX = "restore the checkpoint folder from the save that wrote it (resume from a complete checkpoint)"


def _bad(where: str, field: str, rule: str, value: Any) -> GradPrunerError:
    return user_error(f"{where}: '{field}' must be {rule}", value, FIX)


def _int(where: str, state: Mapping[str, Any], field: str, lo: int = 0, hi: int | None = None) -> int:
    value = state.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
        rule = f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}"
        raise _bad(where, field, rule, value)
    return value


def check_plan_field(where: str, field: str, value: Any, num_layers: int | None = None) -> PrunePlan:
    if not isinstance(value, Mapping) or not isinstance(value.get("digest"), str):
        raise _bad(where, field, "a plan with its digest (as gradpruner-ds writes it)", type(value).__name__)
    try:
        plan = PrunePlan.from_dict(value)
    except GradPrunerError as exc:
        raise _bad(where, field, "a plan whose digest matches its content", str(exc)) from None
    if num_layers is not None and plan.num_layers != num_layers:
        raise _bad(where, f"{field}.num_layers", f"{num_layers} (the saved model's)", plan.num_layers)
    return plan


def check_fields_present(
    state: Any, where: str, fields: tuple[str, ...] = ("config_digest", "num_layers", "plan")
) -> None:
    """The fields a reader needs before a pruner exists (the HF Trainer's resume), present."""
    if not isinstance(state, Mapping):
        raise _bad(where, "(state)", "a JSON object", type(state).__name__)
    for field in fields:
        if field not in state:
            raise _bad(where, field, "present", "missing")


def check_state(state: Mapping[str, Any], pruner: Any, where: str) -> None:
    """Every field of a saved state against its rules and ``pruner`` (the dense pruner it is loaded into)."""
    if not isinstance(state, Mapping):
        raise _bad(where, "(state)", "a JSON object", type(state).__name__)
    digest = state.get("config_digest")
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise _bad(where, "config_digest", "a sha256 hex digest", digest)
    num_layers = _int(where, state, "num_layers", 1)
    _int(where, state, "world_size", 1)
    signature = state.get("model")
    if signature is not None and signature != pruner.model_signature():
        raise user_error(
            f"{where}: the checkpoint was saved for another model (its 'model' signature differs)",
            {"saved": signature, "now": pruner.model_signature()},
            "build the same (dense) model as the run that saved the checkpoint",
        )
    config = pruner.config
    window = pruner.window
    seen = _int(where, state, "steps_seen", 0, window)
    observed = _int(where, state, "observed_steps", 0, seen)
    skipped = _int(where, state, "skipped_steps", 0, seen)
    if observed + skipped != seen:
        raise _bad(where, "observed_steps + skipped_steps", f"steps_seen ({seen})", observed + skipped)
    stage = _int(where, state, "stage", 0, max(0, config.stages - 1)) if "stage" in state else 0
    _int(where, state, "steps_done", 0) if "steps_done" in state else None
    if "wait" in state:
        _int(where, state, "wait", 0, config.stage_interval or 0)
    if state.get("plan") is not None:
        check_plan_field(where, "plan", state["plan"], num_layers)
    stages = state.get("stages", [])
    if not isinstance(stages, list) or len(stages) > stage:
        raise _bad(where, "stages", f"a list of at most 'stage' ({stage}) plans", stages)
    layers = num_layers
    for i, d in enumerate(stages):
        plan = check_plan_field(where, f"stages[{i}]", d, layers)
        layers -= len(plan.removed)
    repair = state.get("repair")
    if repair is not None:
        if config.repair is None or not isinstance(repair, Mapping):
            raise _bad(where, "repair", "null (this block has no 'repair' sub-block)", type(repair).__name__)
        check_plan_field(where, "repair.plan", repair.get("plan"), layers)
        rseen = _int(where, repair, "steps_seen", 0, config.repair.steps)
        _int(where, repair, "observed_steps", 0, rseen)
