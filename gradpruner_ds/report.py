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
    status = {i: "kept" for i in range(plan.num_layers)}
    status.update({i: "dropped" for i in plan.dropped})
    status.update({i: f"merged->{t}" for i, t in plan.targets})
    return {
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
