"""Selection of layers and the frozen, rank-independent ``PrunePlan``.

Ranking (method.md section 3): layers sorted by (score, index) ascending; the ``num_drop`` lowest are
dropped, the next ``num_merge`` lowest are merged into the nearest kept layer below (above for a
merged layer with no kept layer below). Ties break by layer index, so every rank that holds the same
scores computes the same plan.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

PLAN_SCHEMA_VERSION = 1


def rank_layers(scores: Sequence[float]) -> list[int]:
    """Layer indices from least to most important; ties by index. NaN scores rank as least important."""

    def key(i: int) -> tuple[float, int]:
        s = scores[i]
        return (-math.inf if math.isnan(s) else s, i)

    return sorted(range(len(scores)), key=key)


def select_layers(
    scores: Sequence[float], num_drop: int, num_merge: int, protect: Sequence[int] = ()
) -> tuple[list[int], list[int]]:
    """``(dropped, merged)`` layer indices, each sorted ascending. ``protect``: layers never removed."""
    keep = set(protect)
    if num_drop < 0 or num_merge < 0 or num_drop + num_merge > len(scores) - max(1, len(keep)):
        raise AssertionError(
            "budget must leave at least one layer and every protected one (config validates this)"
        )
    order = [i for i in rank_layers(scores) if i not in keep]
    return sorted(order[:num_drop]), sorted(order[num_drop : num_drop + num_merge])


def merge_targets(num_layers: int, dropped: Sequence[int], merged: Sequence[int]) -> dict[int, int]:
    """For each merged layer, the kept layer it merges into: nearest kept below, else nearest above."""
    removed = set(dropped) | set(merged)
    kept = [i for i in range(num_layers) if i not in removed]
    if not kept:
        raise AssertionError("no kept layer to merge into")
    targets: dict[int, int] = {}
    for p in merged:
        below = [k for k in kept if k < p]
        targets[p] = below[-1] if below else min(k for k in kept if k > p)
    return targets


@dataclass(frozen=True)
class PrunePlan:
    """What GradPruner decided: identical on every rank, checked by digest before anything changes."""

    num_layers: int
    criterion: str
    scores: tuple[float, ...]
    dropped: tuple[int, ...]
    merged: tuple[int, ...]
    targets: tuple[tuple[int, int], ...]  # (merged layer, kept target layer)
    observed_steps: int
    skipped_steps: int
    step: int  # optimizer step at which the plan was made
    config_digest: str
    model_type: str = ""
    schema_version: int = PLAN_SCHEMA_VERSION
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def removed(self) -> tuple[int, ...]:
        """Dropped and merged layers together (all leave the model), ascending."""
        return tuple(sorted(self.dropped + self.merged))

    @property
    def kept(self) -> tuple[int, ...]:
        """Original indices of the layers that stay, ascending."""
        gone = set(self.removed)
        return tuple(i for i in range(self.num_layers) if i not in gone)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (no digest field; see ``digest``)."""
        d = asdict(self)
        d["scores"] = list(self.scores)
        d["dropped"] = list(self.dropped)
        d["merged"] = list(self.merged)
        d["targets"] = [list(t) for t in self.targets]
        d["extra"] = dict(self.extra)
        return d

    def digest(self) -> str:
        """sha256 of the canonical JSON form; equal on two ranks iff the plans are equal."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def to_json(self) -> str:
        """Human-readable JSON with the digest, for reports and checkpoints."""
        d = self.to_dict()
        d["digest"] = self.digest()
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PrunePlan:
        """Rebuild a plan; raises ValueError (``gradpruner:``) if the schema or the digest is wrong."""
        from gradpruner_ds.errors import user_error

        if d.get("schema_version") != PLAN_SCHEMA_VERSION:
            raise user_error(
                f"a plan must have schema_version {PLAN_SCHEMA_VERSION}",
                d.get("schema_version"),
                "re-create the plan with this gradpruner-ds version",
            )
        try:
            plan = cls(
                num_layers=int(d["num_layers"]),
                criterion=str(d["criterion"]),
                scores=tuple(float(s) for s in d["scores"]),
                dropped=tuple(int(i) for i in d["dropped"]),
                merged=tuple(int(i) for i in d["merged"]),
                targets=tuple((int(a), int(b)) for a, b in d["targets"]),
                observed_steps=int(d["observed_steps"]),
                skipped_steps=int(d["skipped_steps"]),
                step=int(d["step"]),
                config_digest=str(d["config_digest"]),
                model_type=str(d.get("model_type", "")),
                extra=dict(d.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise user_error(
                "a plan must hold every PrunePlan field",
                repr(exc),
                "use a plan file written by gradpruner-ds",
            ) from exc
        if "digest" in d and d["digest"] != plan.digest():
            raise user_error(
                "a plan's digest must match its content (the file was edited or is corrupt)",
                d["digest"],
                "restore the plan file from the checkpoint it came from",
            )
        return plan

    @classmethod
    def from_json(cls, text: str) -> PrunePlan:
        """Parse ``to_json`` output (ValueError ``gradpruner:`` on malformed text)."""
        from gradpruner_ds.errors import user_error

        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise user_error("a plan file must be valid JSON", str(exc), "restore the plan file") from exc
        if not isinstance(d, dict):
            raise user_error("a plan file must hold a JSON object", type(d).__name__, "restore the plan file")
        return cls.from_dict(d)


def make_plan(
    scores: Sequence[float],
    num_drop: int,
    num_merge: int,
    *,
    criterion: str,
    observed_steps: int,
    skipped_steps: int,
    step: int,
    config_digest: str,
    model_type: str = "",
    extra: Mapping[str, Any] | None = None,
    protect: Sequence[int] = (),
) -> PrunePlan:
    """Rank, select and assign merge targets: the whole decision from the global scores
    (``protect``: layers that are never removed)."""
    dropped, merged = select_layers(scores, num_drop, num_merge, protect)
    targets = merge_targets(len(scores), dropped, merged)
    return PrunePlan(
        num_layers=len(scores),
        criterion=criterion,
        scores=tuple(float(s) for s in scores),
        dropped=tuple(dropped),
        merged=tuple(merged),
        targets=tuple(sorted(targets.items())),
        observed_steps=observed_steps,
        skipped_steps=skipped_steps,
        step=step,
        config_digest=config_digest,
        model_type=model_type,
        extra=dict(extra or {}),
    )
