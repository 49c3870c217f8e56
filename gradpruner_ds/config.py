"""The ``"gradpruner"`` config block: one strictly validated pydantic model.

It lives inside a DeepSpeed JSON config (DeepSpeed ignores unknown top-level keys, so we detect a
misspelled block ourselves) or is passed directly. Every user mistake becomes a ``ValueError`` that
starts with ``gradpruner:`` and names the rule, the value seen and the fix.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gradpruner_ds.core.criteria import CRITERIA
from gradpruner_ds.errors import GradPrunerError, user_error
from gradpruner_ds.io import read_json_file

BLOCK_NAME = "gradpruner"


class RecoveryConfig(BaseModel):
    """In-job recovery by self-distillation after the prune: the model just before the prune is the teacher."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    distill_steps: int = Field(
        ge=1,
        description="Required, an integer >= 1: the optimizer steps after the prune during which the KL term is "
        "added; then the teacher is freed.",
    )
    temperature: float = Field(
        2.0,
        ge=0.1,
        le=100.0,
        allow_inf_nan=False,
        description="A number in [0.1, 100] (default 2.0): the softmax temperature of teacher and student (KL scaled "
        "by T^2); outside it the logits / T or T^2 overflow and the distillation loss is not finite.",
    )
    weight: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="A number in (0, 1] (default 0.5): loss = (1 - weight) * task loss + weight * T^2 * KL(teacher || student).",
    )


class RepairConfig(BaseModel):
    """Least-squares repair of every removed run of layers, folded into the kept layer below it (ReplaceMe)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    steps: int = Field(
        ge=1,
        le=100000,
        description="Required, an integer in [1, 100000]: training steps after the plan (the model still dense) "
        "over which the maps are fitted; the prune comes after them.",
    )
    ridge: float = Field(
        1e-4,
        ge=0.0,
        le=1e6,
        allow_inf_nan=False,
        description="A number in [0, 1e6] (default 1e-4): the ridge lambda, relative to tr(X^T X) / d.",
    )
    ridge_target: Literal["zero", "identity"] = Field(
        "zero",
        description="'zero' (default): T = (A + lambda I)^-1 B (ReplaceMe); 'identity': T = (A + lambda I)^-1 "
        "(B + lambda I), a large ridge being plain removal.",
    )
    map: Literal["full", "diagonal"] = Field(
        "full",
        description="'full' (default): a d x d map (2 d^2 statistics per run); 'diagonal': one scale per channel "
        "(2 d statistics per run).",
    )
    optimizer_state: Literal["reset", "carry"] = Field(
        "reset",
        description="The folded weights' optimizer moments: 'reset' (default: zeroed, the step count kept) or "
        "'carry' (kept as they were).",
    )
    dtype: Literal["float64", "float32"] = Field(
        "float64",
        description="Precision of the statistics and their all-reduce (float32 halves their memory).",
    )


SUB_BLOCKS: dict[str, type[BaseModel]] = {"recovery": RecoveryConfig, "repair": RepairConfig}
"""The config's sub-blocks, by key (for error messages and the reference table)."""


class GradPrunerConfig(BaseModel):
    """GradPruner settings. Budget: ``num_drop`` (+ ``num_merge``) or ``prune_ratio`` (+ ``num_merge``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, strict=True)

    enabled: bool = Field(True, description="Run GradPruner. false observes nothing and never prunes.")
    mode: Literal["auto", "full", "lora"] = Field(
        "auto",
        description=(
            "Gradient used for IGIA. 'full': true gradients of the linear weights (full fine-tuning). "
            "'lora': the LoRA simulated gradient grad(B) @ grad(A) (what the paper used, via a LoRA probe). "
            "'auto': 'lora' if the model carries peft LoRA adapters, else 'full'."
        ),
    )
    criterion: str = Field(
        "shortgpt_bi",
        description=(
            "Layer-importance criterion (higher = kept). 'shortgpt_bi' (default): block influence, 1 - cos of "
            "each layer's input and output hidden states over the window. 'igia_sum' (the paper's score, with "
            "mode 'lora' for its LoRA probe or 'full' for true gradients); 'igia_norm_sum' (the reference code's "
            "variant); 'igia_relative', 'obd', 'obd_residual', 'gate_fisher', 'angular', 'last_layers', "
            "'reverse', 'random', or a criterion registered with register_criterion (docs/criteria.md; measured "
            "side by side in docs/results.md)."
        ),
    )
    window_steps: int | None = Field(
        None, ge=1, description="Observation window in optimizer steps (the paper: about 1% of one epoch)."
    )
    window_fraction: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="Observation window as a fraction of the run's total optimizer steps (instead of window_steps).",
    )
    num_drop: int | None = Field(
        None, ge=0, description="Decoder layers dropped outright (the lowest scores)."
    )
    prune_ratio: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        allow_inf_nan=False,
        description="Fraction of decoder layers removed in total (dropped + merged), rounded to the nearest "
        "layer; instead of num_drop.",
    )
    num_merge: int = Field(
        0,
        ge=0,
        description="Pruned layers (the next lowest after the dropped ones) merged into the nearest kept layer below.",
    )
    keep_fraction: float = Field(
        0.2,
        gt=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="Top-p fraction of a merged matrix's entries (by its IGIA) that is merged (0.2 = sparsity 80%).",
    )
    sign_consistent: bool = Field(
        True,
        description="Merge only where the merged weight's sign equals the kept weight's (the paper's rule).",
    )
    merge_rule: Literal["gradpruner", "laco"] = Field(
        "gradpruner",
        description="How merged layers enter their target. 'gradpruner': the paper's top-p (keep_fraction) "
        "masked, sign-consistent merge. 'laco': LaCo-style unmasked differences W_r += sum_p (W_p - W_r) "
        "(a baseline; keep_fraction and sign_consistent do not apply).",
    )
    protect_layers: list[int] = Field(
        default_factory=list,
        description="Decoder layers (original indices) that are never removed, whatever their score.",
    )
    layers_to_remove: list[int] | None = Field(
        None,
        description="A plan given by hand: these decoder layers (original indices) are dropped at the end of "
        "the window instead of the ones a criterion picks. Leave criterion, num_drop and prune_ratio unset "
        "(the budget is the list's length; num_merge must be 0).",
    )
    recovery: RecoveryConfig | None = Field(
        None,
        description='In-job recovery by self-distillation: {"distill_steps": K, "temperature": 2.0, "weight": 0.5}. '
        "For K optimizer steps after the prune, pruner.distill(loss, logits, batch) returns (1 - weight) * loss + "
        "weight * T^2 * KL(teacher || student) on the same batch (the loss logged meanwhile is that sum), the "
        "teacher being a frozen copy of the model just before the prune (no gradients, no optimizer state) laid "
        "out like the student (whole in one process and under ZeRO-1/2; each rank's shards under ZeRO-3 and "
        "FSDP2, gathered one layer at a time in its forward), freed afterwards. With the HF Trainer, "
        "add_gradpruner adds the term to the Trainer's loss. Under ZeRO-3 and FSDP2 a peft model's teacher is its "
        "base model with plain LoRA adapters merged in; other adapters (DoRA, modules_to_save) are refused there.",
    )
    repair: RepairConfig | None = Field(
        None,
        description='Least-squares repair of the cut: {"steps": R, "ridge": 1e-4, "ridge_target": "zero", "map": '
        '"full", "optimizer_state": "reset", "dtype": "float64"}. After the plan, for R more training steps '
        "(the model still dense) forward hooks sum, per contiguous run of removed layers s..e-1, A = X^T X and "
        "B = X^T Y over the tokens (X: the MLP branch of layer s-1, Y = h(e) - h(s) + X); at the prune one "
        "all-reduce, T = (A + lambda I)^-1 B on every rank, and W_down(s-1) <- T^T W_down(s-1): the saved model "
        "keeps the standard architecture. A run starting at layer 0 is removed unrepaired (warned). Not with "
        "num_merge > 0, observe_only, or families whose MLP branch ends in a norm (Gemma2/3) (docs/repair.md).",
    )
    stages: int = Field(
        1,
        ge=1,
        le=64,
        description="Progressive removal: the budget removed in this many stages (1..64, at most the budget; "
        "earlier stages take the remainder), stage_interval steps apart, each scored on the model as the previous "
        "stage left it (a fresh window of window_steps before each cut; with repair, each stage repairs its own "
        "cut). 1 (default): one prune.",
    )
    stage_interval: int | None = Field(
        None,
        ge=1,
        description="Optimizer steps from one stage's cut to the next (needed when stages > 1; at least the "
        "window plus repair.steps).",
    )
    prune_again: bool = Field(
        False,
        description="Allow GradPruner on a model that was already pruned (its config records the earlier prune; "
        "refused otherwise): layers are numbered as the model has them now, and the saved record keeps the "
        "original model's layer count, its kept layers and every prune's digest.",
    )
    observe_only: bool = Field(
        False,
        description="Observe, score and write the report and plan, but prune nothing: training goes on with "
        "the dense model (a dry run of the decision, e.g. to inspect the plan before committing to it).",
    )
    lora_adapter: str = Field("default", description="peft adapter name read in 'lora' mode.")
    output_dir: str | None = Field(
        None,
        description="Where the report (JSON + PNG) and plan are written; none = no files. Not empty (that would be "
        'the current directory; write "." to mean it).',
    )
    plot: bool = Field(True, description="Write a PNG plot of the layer scores next to the JSON report.")
    progress_bar: bool = Field(True, description="Show a progress bar for the observation window on rank 0.")
    consensus_timeout_s: float = Field(
        300.0,
        ge=1.0,
        le=604800.0,
        allow_inf_nan=False,
        description="Seconds a rank waits for the others at any GradPruner collective (the settings check, the "
        "per-step finite check, the ranking, the plan check, the merge, the checkpoint commit) before failing "
        "with an error; at least 1 s, at most one week.",
    )

    @field_validator("criterion")
    @classmethod
    def _known_criterion(cls, v: str) -> str:
        if v not in CRITERIA or v == "given":
            raise ValueError(
                f"criterion must be one of {sorted(set(CRITERIA) - {'given'})} (a plan by hand: layers_to_remove)"
            )
        return v

    @field_validator("output_dir")
    @classmethod
    def _named_folder(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError(
                "output_dir must name a folder (an empty one would write into the current directory). Fix: give a "
                'path, "." for the current directory, or null (leave it out) for no report files'
            )
        return v

    @field_validator("protect_layers", "layers_to_remove")
    @classmethod
    def _layer_list(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if any(i < 0 for i in v):
            raise ValueError("layer indices must be >= 0 (original decoder-layer indices)")
        if len(set(v)) != len(v):
            raise ValueError("layer indices must be listed once each")
        return sorted(v)

    @model_validator(mode="after")
    def _cross_fields(self) -> GradPrunerConfig:
        if (self.window_steps is None) == (self.window_fraction is None):
            raise ValueError(
                'set exactly one of window_steps or window_fraction. Fix: keep one, e.g. "window_steps": 8'
            )
        if self.repair is not None and (self.num_merge or self.observe_only):
            raise ValueError(
                "repair folds a map into the kept layer below each removed run: it cannot be combined with "
                f"{'num_merge > 0 (the merge edits that layer too)' if self.num_merge else 'observe_only (nothing is cut)'}"
                ". Fix: remove the 'repair' sub-block, or set "
                f"{'num_merge to 0' if self.num_merge else 'observe_only to false'}"
            )
        if self.stages > 1:
            if self.stage_interval is None:
                raise ValueError(
                    f"stages={self.stages} needs stage_interval (the steps from one cut to the next). "
                    'Fix: add e.g. "stage_interval": 16'
                )
            clash = [
                k
                for k, bad in (
                    ("num_merge > 0", self.num_merge > 0),
                    ("layers_to_remove", self.layers_to_remove is not None),
                    ("observe_only", self.observe_only),
                )
                if bad
            ]
            if clash:
                raise ValueError(
                    f"progressive removal (stages > 1) scores and cuts each stage on the pruned model: it cannot be "
                    f"combined with {', '.join(clash)}. Fix: set stages to 1, or remove {', '.join(clash)}"
                )
            needed = (self.window_steps or 1) + (self.repair.steps if self.repair is not None else 0)
            if self.window_steps is not None and self.stage_interval < needed:
                raise ValueError(
                    f"stage_interval must leave room for each stage's window and repair steps ({needed} steps). "
                    f"Fix: set stage_interval to at least {needed}"
                )
        elif self.stage_interval is not None:
            raise ValueError(
                "stage_interval applies only to progressive removal (stages > 1). Fix: remove it, or set stages"
            )
        if self.layers_to_remove is not None:
            given = {"criterion", "num_drop", "prune_ratio"} & self.model_fields_set
            if given or self.num_merge:
                raise ValueError(
                    f"layers_to_remove is a plan given by hand: {sorted(given) or ['num_merge']} do not apply. "
                    "Fix: remove them (the budget is the list's length, nothing is merged)"
                )
            if not self.layers_to_remove:
                raise ValueError(
                    'layers_to_remove must name at least one layer. Fix: e.g. "layers_to_remove": [20, 21]'
                )
            if set(self.layers_to_remove) & set(self.protect_layers):
                raise ValueError(
                    "a layer cannot be both in layers_to_remove and protect_layers. Fix: list it once"
                )
            return self
        if (self.num_drop is None) == (self.prune_ratio is None):
            raise ValueError(
                'set exactly one of num_drop or prune_ratio. Fix: keep one, e.g. "num_drop": 4 or "prune_ratio": 0.3'
            )
        return self

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, block: Mapping[str, Any]) -> GradPrunerConfig:
        """Validate a block; every problem becomes one ``gradpruner:`` ValueError naming rule, value, fix."""
        if not isinstance(block, Mapping):
            raise user_error(
                f"the '{BLOCK_NAME}' block must be a JSON object",
                type(block).__name__,
                'write "gradpruner": {...}',
            )
        try:
            return cls.model_validate(dict(block))
        except ValidationError as exc:
            raise _translate(exc) from None

    def config_digest(self) -> str:
        """sha256 of the canonical JSON of the settings that change the plan."""
        keep = self.model_dump(exclude={"output_dir", "plot", "progress_bar", "consensus_timeout_s"})
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()

    # ---- resolution against the model and the run -------------------------------------------
    @property
    def effective_criterion(self) -> str:
        """The criterion that decides the plan ('given' for a plan given by hand)."""
        return "given" if self.layers_to_remove is not None else self.criterion

    def resolve_budget(self, num_layers: int) -> tuple[int, int]:
        """``(num_drop, num_merge)`` for a model with ``num_layers`` decoder layers."""
        named = (self.layers_to_remove or []) + self.protect_layers
        if named and max(named) >= num_layers:
            raise user_error(
                f"layers_to_remove / protect_layers must be decoder-layer indices in [0, {num_layers})",
                [i for i in named if i >= num_layers],
                f"use original indices between 0 and {num_layers - 1}",
            )
        if self.layers_to_remove is not None:
            if len(self.layers_to_remove) >= num_layers:
                raise user_error(
                    f"layers_to_remove must leave at least 1 of the model's {num_layers} decoder layers",
                    self.layers_to_remove,
                    "list fewer layers",
                )
            return len(self.layers_to_remove), 0
        if self.num_drop is not None:
            n_drop = self.num_drop
        else:
            assert self.prune_ratio is not None
            n_remove = round(self.prune_ratio * num_layers)
            if n_remove < self.num_merge:
                raise user_error(
                    f"prune_ratio x {num_layers} layers must cover num_merge={self.num_merge}",
                    self.prune_ratio,
                    "raise prune_ratio or lower num_merge",
                )
            n_drop = n_remove - self.num_merge
        if n_drop + self.num_merge >= num_layers:
            raise user_error(
                f"the budget must leave at least 1 of the model's {num_layers} decoder layers "
                f"(num_drop + num_merge = {n_drop} + {self.num_merge})",
                n_drop + self.num_merge,
                f"remove at most {num_layers - 1} layers",
            )
        if self.protect_layers and n_drop + self.num_merge > num_layers - len(self.protect_layers):
            raise user_error(
                f"the budget ({n_drop + self.num_merge} layers) must fit among the "
                f"{num_layers - len(self.protect_layers)} layers that protect_layers leaves removable",
                self.protect_layers,
                "protect fewer layers or lower the budget",
            )
        if n_drop + self.num_merge == 0:
            raise user_error("the budget removes no layer", 0, "set num_drop >= 1 or a larger prune_ratio")
        return n_drop, self.num_merge

    def resolve_window(self, total_steps: int | None) -> int:
        """The observation window in optimizer steps, checked against the run length when known."""
        if self.window_steps is not None:
            window = self.window_steps
        else:
            if total_steps is None:
                raise user_error(
                    "window_fraction needs the run's total number of optimizer steps",
                    self.window_fraction,
                    "pass total_steps to GradPruner, or set window_steps instead",
                )
            assert self.window_fraction is not None
            window = max(1, round(self.window_fraction * total_steps))
        if total_steps is not None and window >= total_steps:
            raise user_error(
                f"the observation window must end before the run's last step ({total_steps} steps)",
                window,
                "shorten window_steps/window_fraction or train for more steps",
            )
        repair = self.repair.steps if self.repair is not None else 0
        if self.stages > 1:
            assert self.stage_interval is not None
            if self.stage_interval < window + repair:
                raise user_error(
                    f"stage_interval must leave room for each stage's window and repair steps ({window + repair})",
                    self.stage_interval,
                    f"set stage_interval to at least {window + repair}",
                )
        last_cut = window + repair + (self.stages - 1) * (self.stage_interval or 0)
        if total_steps is not None and last_cut >= total_steps and (repair or self.stages > 1):
            raise user_error(
                f"the last cut (after the window, the repair steps and every stage) must come before the run's last "
                f"step ({total_steps} steps)",
                last_cut,
                "shorten window_steps, repair.steps or stage_interval, use fewer stages, or train for more steps",
            )
        return window

    def stage_budgets(self, num_layers: int) -> list[int]:
        """Layers removed at each stage (progressive removal): the budget split as evenly as possible, earlier
        stages taking the remainder; one entry per stage."""
        n_drop, n_merge = self.resolve_budget(num_layers)
        total = n_drop + n_merge
        if self.stages > total:
            raise user_error(
                f"progressive removal needs at least one layer per stage (the budget is {total} layers)",
                self.stages,
                f"use at most {total} stages, or a larger budget",
            )
        base, extra = divmod(total, self.stages)
        return [base + (1 if k < extra else 0) for k in range(self.stages)]


def _translate(exc: ValidationError) -> GradPrunerError:
    fields = GradPrunerConfig.model_fields
    msgs = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(block)"
        value = err.get("input")
        if err["type"] == "extra_forbidden":
            parent, _, key = loc.rpartition(".")
            valid = SUB_BLOCKS[parent].model_fields if parent in SUB_BLOCKS else fields
            close = difflib.get_close_matches(key, list(valid), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            where = f"the '{parent}' sub-block" if parent else f"the '{BLOCK_NAME}' block"
            msgs.append(
                f"unknown key '{loc}' in {where} (got {value!r}). Fix: {hint}"
                f"remove it; valid keys: {', '.join(valid)}"
            )
            continue
        rule = err["msg"].removeprefix("Value error, ")
        if ". Fix: " in rule:
            rule, fix = rule.split(". Fix: ", 1)
        else:
            parent, _, key = loc.rpartition(".")
            field = SUB_BLOCKS[parent].model_fields.get(key) if parent in SUB_BLOCKS else fields.get(loc)
            fix = f"set '{loc}' as documented: {field.description}" if field else "see the config reference"
        msgs.append(f"'{loc}': {rule} (got {value!r}). Fix: {fix}")
    return GradPrunerError("gradpruner: invalid config: " + " | ".join(msgs))


def load_config(source: Mapping[str, Any] | str | Path, *, required: bool = True) -> GradPrunerConfig | None:
    """Read the ``"gradpruner"`` block from a DeepSpeed config (a dict or a JSON file path).

    A top-level key that looks like a misspelling of the block is an error, so a typo never silently
    disables pruning. ``required=False`` returns None when there is no block at all.
    """
    if isinstance(source, (str, Path)):
        ds_config = read_json_file(source, "the DeepSpeed config")
        if not isinstance(ds_config, dict):
            raise user_error(
                "the DeepSpeed config must hold a JSON object", type(ds_config).__name__, "write {...}"
            )
    else:
        ds_config = dict(source)
    if BLOCK_NAME not in ds_config:
        lowered = {k.lower().replace("_", "").replace("-", ""): k for k in ds_config}
        near = difflib.get_close_matches(BLOCK_NAME, list(lowered), n=1, cutoff=0.75)
        if near:
            raise user_error(
                f"the config has no '{BLOCK_NAME}' block but a key that looks like a misspelling of it",
                lowered[near[0]],
                f"rename it to '{BLOCK_NAME}'",
            )
        if required:
            raise user_error(
                f"--gradpruner needs a '{BLOCK_NAME}' block in the DeepSpeed config",
                sorted(ds_config),
                'add "gradpruner": {"window_steps": ..., "num_drop": ...} (see configs/)',
            )
        return None
    return GradPrunerConfig.from_dict(ds_config[BLOCK_NAME])


def config_reference_markdown() -> str:
    """The config reference table (README and docs/config.md are checked against it by a test)."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, f in GradPrunerConfig.model_fields.items():
        ann = (
            str(f.annotation)
            .replace("typing.", "")
            .replace("<class '", "")
            .replace("'>", "")
            .replace("|", "or")
        )
        default = f.default_factory() if f.default_factory is not None else f.default  # type: ignore[call-arg]
        rows.append(f"| `{name}` | {ann} | `{json.dumps(default)}` | {f.description} |")
        if name in SUB_BLOCKS:  # its sub-block's keys
            for sub, g in SUB_BLOCKS[name].model_fields.items():
                value = "required" if g.is_required() else f"`{json.dumps(g.default)}`"
                kind = getattr(g.annotation, "__name__", None) or str(g.annotation).replace("typing.", "")
                rows.append(f"| `{name}.{sub}` | {kind} | {value} | {g.description} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # python -m gradpruner_ds.config  -> prints the reference table
    print(config_reference_markdown(), end="")
