"""The prune-time report: a JSON file a person (or a script) can read, and a PNG plot of layer scores."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gradpruner_ds.core.plan import PrunePlan
from gradpruner_ds.errors import user_error
from gradpruner_ds.io import atomic_write_bytes, atomic_write_text
from gradpruner_ds.log import get_logger

log = get_logger("report")

REPORT_JSON = "gradpruner_report.json"
REPORT_PNG = "gradpruner_scores.png"
PLAN_JSON = "gradpruner_plan.json"


def build_report(
    plan: PrunePlan, *, params_before: int, params_after: int, extra: Mapping[str, Any]
) -> dict[str, Any]:
    """The report as a dict: plan, per-layer scores and status, parameter counts, merge statistics."""
    would = "would be " if extra.get("observe_only") else ""  # observe_only: nothing was removed
    status = {i: "kept" for i in range(plan.num_layers)}
    status.update({i: f"{would}dropped" for i in plan.dropped})
    status.update({i: f"{would}merged->{t}" for i, t in plan.targets})
    return {
        "pruned": not extra.get("observe_only", False),
        "plan": json.loads(plan.to_json()),
        "layers": [
            {"layer": i, "score": plan.scores[i], "status": status[i]} for i in range(plan.num_layers)
        ],
        "params_before": params_before,
        "params_after": params_after,
        "params_kept_fraction": params_after / params_before if params_before else None,
        "observed_steps": plan.observed_steps,
        "skipped_steps": plan.skipped_steps,
        **extra,
    }


def tracker_events(plan: PrunePlan, report: Mapping[str, Any]) -> dict[str, float]:
    """Scalar events of the prune for experiment trackers (``gradpruner/...``): layers and parameters before and
    after, steps observed / skipped, prune time, every layer's score (1.0 = removed in ``gradpruner/removed/<i>``)."""
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


class StepTimer:
    """Wall time between consecutive calls (= optimizer steps): the steps before the first cut and the first
    ``after`` steps after it, for the report's step-time ratio."""

    def __init__(self, after: int = 5) -> None:
        self.after = after
        self._last: float | None = None
        self.before_s: list[float] = []
        self.after_s: list[float] = []

    def tick(self, pruned: bool) -> dict[str, Any] | None:
        """One step ended; returns the step-time entry once the steps after the cut are measured (once)."""
        import time

        now = time.perf_counter()
        last, self._last = self._last, now
        if last is None:
            return None
        if not pruned:
            self.before_s.append(now - last)
        elif len(self.after_s) < self.after:
            self.after_s.append(now - last)
            if len(self.after_s) == self.after:
                before, after = (sorted(t)[len(t) // 2] if t else None for t in (self.before_s, self.after_s))
                return {
                    "before_median": before,
                    "after_median": after,
                    "after_over_before": after / before if before and after else None,
                    "steps": [len(self.before_s), self.after],
                }
        return None

    def restart(self) -> None:
        """The next interval is a plain step of the smaller model (the prune's own time is not a step)."""
        import time

        self._last = time.perf_counter()


class PruneReport:
    """The report of one run's prune, kept up to date: an entry per cut (stage), the whole prune so far, the
    step-time ratio once measured; written on rank 0 after each change (a failure to write is logged, never
    fatal: the expensive part of the run is done), and the tracker events."""

    def __init__(self, output_dir: str | None, plot: bool, rank: int, stages: int) -> None:
        self.output_dir, self.plot, self.rank, self.stages = output_dir, plot, rank, stages
        self.entries: list[dict[str, Any]] = []
        self.data: dict[str, Any] | None = None
        self.whole: PrunePlan | None = None
        self.timer = StepTimer()

    def add_cut(self, whole: PrunePlan, entry: dict[str, Any], extra: Mapping[str, Any]) -> None:
        """One more cut: ``whole`` is the prune so far (original indices), ``entry`` this cut's record (its plan,
        parameter counts, time), ``extra`` the report's own fields of this cut (merge, repair, memory, ...)."""
        self.entries.append(entry)
        self.whole = whole
        self.data = build_report(
            whole,
            params_before=self.entries[0]["params_before"],
            params_after=entry["params_after"],
            extra=extra,
        )
        self.data["prune_s"] = sum(e["prune_s"] for e in self.entries)
        if self.stages > 1:
            self.data["stages"] = self.entries

    def write_not_pruned(self, entry: dict[str, Any]) -> None:
        """The run ended without its prune: the report says so (rank 0; an earlier report there is replaced)."""
        self.data = {**entry, "observe_only": False}
        if self.output_dir is None or self.rank != 0:
            return
        try:
            atomic_write_text(
                Path(self.output_dir) / REPORT_JSON, json.dumps(self.data, indent=2, sort_keys=True)
            )
        except OSError as exc:
            log.warning("could not write the GradPruner report to %s (%s)", self.output_dir, exc)

    def tick(self, pruned: bool) -> None:
        """One optimizer step ended (``pruned``: after the first cut): the step-time entry once measured."""
        entry = self.timer.tick(pruned)
        if entry is not None and self.data is not None:
            self.data["step_time_s"] = entry
            self.write(update=True)

    def events(self) -> dict[str, float]:
        return (
            tracker_events(self.whole, self.data) if self.whole is not None and self.data is not None else {}
        )

    def write(self, update: bool = False) -> None:
        if self.output_dir is None or self.rank != 0 or self.data is None or self.whole is None:
            return
        try:
            paths = write_report(Path(self.output_dir), self.data, self.whole, plot=self.plot)
        except Exception as exc:  # noqa: BLE001 - any failure to write is reported, never fatal
            log.warning(
                "could not write the GradPruner report to %s (%s); training goes on", self.output_dir, exc
            )
            return
        if update:
            log.debug("report updated with the step times: %s", ", ".join(str(p) for p in paths))
        else:
            log.info("report written: %s", ", ".join(str(p) for p in paths))


def plot_scores(plan: PrunePlan, title: str = "") -> bytes:
    """PNG bytes: a bar per layer (log scale), dropped red, merged orange with its target, kept blue."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = []
    merged = dict(plan.targets)
    for i in range(plan.num_layers):
        colors.append("#d62728" if i in plan.dropped else "#ff7f0e" if i in merged else "#1f77b4")
    fig, ax = plt.subplots(figsize=(max(6.0, plan.num_layers * 0.3), 3.6), dpi=110)
    scores = [max(s, 1e-30) for s in plan.scores]
    ax.bar(range(plan.num_layers), scores, color=colors)
    positive = all(s > 0 for s in plan.scores)
    if positive and max(scores) / min(scores) > 50:
        ax.set_yscale("log")
    for p, t in plan.targets:
        ax.annotate(f"→{t}", (p, scores[p]), ha="center", va="bottom", fontsize=7)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(f"score ({plan.criterion})")
    ax.set_title(title or f"GradPruner layer scores: {len(plan.dropped)} dropped, {len(plan.merged)} merged")
    from matplotlib.patches import Patch

    ax.legend(
        handles=[
            Patch(color="#1f77b4", label="kept"),
            Patch(color="#ff7f0e", label="merged"),
            Patch(color="#d62728", label="dropped"),
        ],
        fontsize=7,
        loc="best",
    )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def check_report_dir(output_dir: Path) -> None:
    """Before step 0: the report folder can be created and written (a ``gradpruner:`` error otherwise, so a
    run never fails after its prune for want of a folder); an earlier run's report there is announced."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(output_dir / ".gradpruner-write-check", b"")
        (output_dir / ".gradpruner-write-check").unlink()
    except OSError as exc:
        raise user_error(
            "the report folder (output_dir) must be writable",
            f"{output_dir}: {exc}",
            "pass a writable output_dir",
        ) from None
    if (output_dir / REPORT_JSON).exists():
        log.warning("%s holds an earlier run's report: this run's replaces it at the prune", output_dir)


def write_report(
    output_dir: str | Path, report: Mapping[str, Any], plan: PrunePlan, plot: bool = True
) -> list[Path]:
    """Write the report JSON, the plan JSON and (optionally) the PNG, atomically; returns the paths. An
    earlier run's PNG that this run does not replace is removed (no stale plot beside a new report)."""
    out = Path(output_dir)
    paths = [out / REPORT_JSON, out / PLAN_JSON]
    atomic_write_text(paths[0], json.dumps(report, indent=2, sort_keys=True))
    atomic_write_text(paths[1], plan.to_json())
    png = out / REPORT_PNG
    if plot:
        try:
            data = plot_scores(plan)
        except ImportError:
            log.warning("matplotlib is not installed: no %s (pip install 'gradpruner-ds[plot]')", REPORT_PNG)
        else:
            atomic_write_bytes(png, data)
            return [*paths, png]
    png.unlink(missing_ok=True)
    return paths
