"""In-job least-squares repair of the cut (the ``repair`` sub-block; math: :mod:`gradpruner_ds.core.repair`).

Between the plan and the prune the model stays dense for ``repair.steps`` more training steps while
:class:`~gradpruner_ds.statistics.repair.RepairStatistic` sums, per contiguous run of removed layers, what
the kept layer below writes (``X``) and what the run adds (``Y``). At the prune :class:`Repairer` reduces
the sums over ranks (one all-reduce), solves every map on every rank in float64, proves every rank holds
the same maps (a digest, like the plan), and folds each map into its kept layer's MLP writer
(``W_down <- T^T W_down``) through the engine (``EngineAdapter.transform_weight``: every copy of the
weight; sharded engines gather only that matrix). A peft LoRA writer gets the fold in its base weight and
its ``B`` factor (``T^T (W + s B A) = T^T W + s (T^T B) A``), so the adapters stay valid. After the
engine's rebuild the folded weights' optimizer moments are reset (``optimizer_state: "reset"``) or kept.

A run that starts at layer 0 has no kept layer below it: it is removed unrepaired (a warning; the report
says so).
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from gradpruner_ds.arch import ArchSpec, decoder_layers
from gradpruner_ds.config import RepairConfig
from gradpruner_ds.core.plan import PrunePlan
from gradpruner_ds.core.repair import fold, removed_runs, residuals, solve_map
from gradpruner_ds.engine import EngineAdapter
from gradpruner_ds.errors import user_error
from gradpruner_ds.log import get_logger
from gradpruner_ds.peft_support import linear_weight, lora_factors
from gradpruner_ds.statistics.repair import RepairStatistic

log = get_logger("repair")


def refusal(spec: ArchSpec) -> str | None:
    """Why ``repair`` cannot run on this model family (None: it can)."""
    if spec.mlp_branch is None:
        return f"the {spec.name} family normalises its MLP branch before the residual add (no linear fold)"
    return None


def statistics_bytes(dim: int, runs: int, config: RepairConfig) -> int:
    """Memory of the repair sums on a rank: committed + this step's pending table (2 d^2 or 2 d entries per
    run, each)."""
    per_run = (2 * dim if config.map == "diagonal" else 2 * dim * dim) + 2
    return 2 * per_run * runs * (8 if config.dtype == "float64" else 4)


def _fold_by(t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return fold(weight, t)


class Repairer:
    """The repair phase of one plan: the statistic while it collects, then the fold."""

    def __init__(
        self, config: RepairConfig, model: nn.Module, spec: ArchSpec, backend: EngineAdapter, plan: PrunePlan
    ) -> None:
        self.config = config
        self.model = model
        self.spec = spec
        self.backend = backend
        self.plan = plan
        runs = removed_runs(plan.removed)
        self.runs = [r for r in runs if r[0] >= 1]
        self.unrepaired = [r for r in runs if r[0] < 1]
        if self.unrepaired and backend.rank == 0:
            log.warning(
                "repair: the removed run %s starts at layer 0 and has no kept layer below it to fold a map into: "
                "it is removed unrepaired (protect layer 0 with protect_layers to avoid this)",
                list(range(*self.unrepaired[0])),
            )
        self.steps_seen = 0
        self.observed_steps = 0
        self.statistic: RepairStatistic | None = None
        if self.runs:
            self.statistic = RepairStatistic(
                model,
                spec,
                self.runs,
                diagonal=config.map == "diagonal",
                dtype=torch.float64 if config.dtype == "float64" else torch.float32,
            )
        if backend.rank == 0:
            log.info(
                "repair: fitting %s maps for the removed runs %s over the next %d steps (statistics %.1f MiB per "
                "rank), then pruning",
                config.map,
                [f"{s}-{e - 1}" if e - s > 1 else str(s) for s, e in self.runs],
                config.steps,
                statistics_bytes(self._dim(), len(self.runs), config) / 2**20,
            )

    def _dim(self) -> int:
        return self.statistic.dim if self.statistic is not None else 0

    @property
    def done(self) -> bool:
        return self.steps_seen >= self.config.steps

    def step(self, ok: bool) -> None:
        """One optimizer step of the repair phase ended (``ok``: counted by the statistic)."""
        self.steps_seen += 1
        self.observed_steps += int(ok)

    # ---- at the prune -------------------------------------------------------------------------------
    def _writers(self, below: int) -> list[nn.Parameter]:
        """The weights the fold of the run above layer ``below`` changes: the MLP writer's (base) weight and,
        for a peft LoRA writer, its ``B`` factors (rows are residual channels)."""
        module = decoder_layers(self.model)[below].get_submodule(self.spec.mlp_writer)
        params = [linear_weight(module)]
        for adapter in getattr(module, "lora_B", {}) or {}:
            factors = lora_factors(module, adapter)
            if factors is not None:
                params.append(factors[1])
        return params

    def fold(self) -> tuple[dict[str, Any], list[nn.Parameter]]:
        """Reduce, solve, check, fold. Returns the report's ``repair`` entry and the folded parameters."""
        t0 = time.perf_counter()
        entry: dict[str, Any] = {
            **self.config.model_dump(),
            "steps_seen": self.steps_seen,
            "observed_steps": self.observed_steps,
            "unrepaired_runs": [list(r) for r in self.unrepaired],
            "runs": [],
        }
        folded: list[nn.Parameter] = []
        stat = self.statistic
        if stat is None:
            return entry, folded
        table = stat.reduce(self.backend)
        maps = []
        for r, (s, e) in enumerate(self.runs):
            a, b, c, tokens = stat.sums(table, r)
            t = solve_map(a, b, self.config.ridge, self.config.ridge_target)
            if not bool(torch.isfinite(t).all()):
                raise user_error(
                    "repair solved a non-finite map (the activations of the repair steps are not finite, or the "
                    "ridge is 0 with too few tokens)",
                    f"run {s}-{e - 1}, {tokens} tokens, ridge {self.config.ridge}",
                    "raise repair.ridge, lengthen repair.steps, or check the model for inf/nan activations",
                )
            plain, fitted = residuals(a, b, c, t)
            maps.append(t)
            entry["runs"].append(
                {
                    "layers": list(range(s, e)),
                    "folded_into": s - 1,
                    "tokens": tokens,
                    "residual_plain": plain,
                    "residual_repaired": fitted,
                    "explained": 1.0 - fitted / plain if plain > 0 else None,
                }
            )
        stat.close()
        self.statistic = None
        digest = hashlib.sha256(b"".join(t.contiguous().numpy().tobytes() for t in maps)).hexdigest()
        self.backend.check_same(digest, "the repair maps")
        moved = 0
        for (s, _), t in zip(self.runs, maps, strict=True):
            for p in self._writers(s - 1):
                moved += self.backend.transform_weight(p, functools.partial(_fold_by, t))
                folded.append(p)
        entry.update(maps_digest=digest, bytes_moved=moved, fold_s=time.perf_counter() - t0)
        if self.backend.rank == 0:
            log.info(
                "repair: folded %d maps (%s of the cut's residual explained on the %d calibration steps)",
                len(maps),
                ", ".join(
                    f"{run['layers'][0]}-{run['layers'][-1]}: {run['explained']:.0%}"
                    if run["explained"] is not None
                    else "n/a"
                    for run in entry["runs"]
                ),
                self.steps_seen,
            )
        return entry, folded

    def state_dict(self) -> dict[str, Any]:
        """The phase's step counts (JSON); the sums are :meth:`statistic_state` (this rank's tensors)."""
        return {"steps_seen": self.steps_seen, "observed_steps": self.observed_steps}

    def statistic_state(self) -> dict[str, Any] | None:
        return self.statistic.state_dict() if self.statistic is not None else None

    def load_state_dict(self, state: Mapping[str, Any], statistic: Mapping[str, Any] | None) -> None:
        self.steps_seen = int(state["steps_seen"])
        self.observed_steps = int(state["observed_steps"])
        if self.statistic is not None:
            if statistic is None:
                raise user_error(
                    "a checkpoint saved in the repair phase must hold every rank's repair sums",
                    "none saved",
                    "resume from the complete checkpoint folder",
                )
            self.statistic.load_state_dict(statistic)

    def close(self) -> None:
        if self.statistic is not None:
            self.statistic.close()
            self.statistic = None
