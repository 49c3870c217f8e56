"""Checkpoints that carry GradPruner's state without pickle.

Layout, inside a checkpoint folder (for DeepSpeed: ``<save_dir>/<tag>/gradpruner/``):

* ``state.json`` (rank 0): schema version, gradpruner-ds version, config digest, world size, optimizer
  steps seen in the window, and the plan (JSON with its digest) once the model is pruned;
* ``igia_rank<r>.safetensors`` (every rank, only during the window): that rank's IGIA pieces.

Every file is written atomically. Resuming replays the surgery from the plan BEFORE the engine loads
its own checkpoint, so the engine sees the pruned structure it saved.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from gradpruner_ds import __version__
from gradpruner_ds.core.plan import PrunePlan
from gradpruner_ds.errors import user_error
from gradpruner_ds.io import atomic_write_bytes, atomic_write_text

STATE_SCHEMA_VERSION = 1
SUBDIR = "gradpruner"


def _flatten(acc_state: dict[str, Any]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {"step_sq_norms": acc_state["step_sq_norms"].contiguous()}
    for k, v in acc_state["sum_sq"].items():
        out[f"sum_sq/{k}"] = v.contiguous()
    for k, steps in acc_state["factors"].items():
        for i, (b, a) in enumerate(steps):
            out[f"factors/{k}/{i}/B"] = b.contiguous()
            out[f"factors/{k}/{i}/A"] = a.contiguous()
    return out


def _unflatten(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    sum_sq: dict[str, torch.Tensor] = {}
    factors: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, t in tensors.items():
        if name.startswith("sum_sq/"):
            sum_sq[name[len("sum_sq/") :]] = t
        elif name.startswith("factors/"):
            key, idx, which = name[len("factors/") :].rsplit("/", 2)
            factors.setdefault(key, {}).setdefault(int(idx), {})[which] = t
    return {
        "mode": meta["mode"],
        "keys": meta["keys"],
        "steps": meta["steps"],
        "skipped": meta["skipped"],
        "sum_sq": sum_sq,
        "factors": {k: [(v[i]["B"], v[i]["A"]) for i in sorted(v)] for k, v in factors.items()},
        "step_sq_norms": tensors["step_sq_norms"],
    }


def save_pruner_state(pruner: Any, folder: str | Path) -> None:
    """Write this rank's GradPruner state into ``folder`` (call on every rank)."""
    from safetensors.torch import save as st_save

    folder = Path(folder)
    rank, world = pruner.backend.rank, pruner.backend.world_size
    meta: dict[str, Any] = {
        "schema_version": STATE_SCHEMA_VERSION,
        "gradpruner_version": __version__,
        "config_digest": pruner.config.config_digest(),
        "world_size": world,
        "steps_seen": pruner.steps_seen,
        "num_layers": pruner.num_layers,
        "plan": json.loads(pruner.plan.to_json()) if pruner.plan is not None else None,
    }
    if pruner.acc is not None:
        acc = pruner.acc.state_dict()
        meta.update(mode=acc["mode"], keys=acc["keys"], steps=acc["steps"], skipped=acc["skipped"])
        atomic_write_bytes(folder / f"igia_rank{rank}.safetensors", st_save(_flatten(acc)))
    if rank == 0:
        atomic_write_text(folder / "state.json", json.dumps(meta, indent=2, sort_keys=True))


def read_state(folder: str | Path) -> dict[str, Any]:
    """Read and check ``state.json`` (``gradpruner:`` errors for missing, corrupt or foreign files)."""
    path = Path(folder) / "state.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise user_error(
            "a GradPruner checkpoint must contain state.json",
            str(path),
            "resume from a checkpoint saved with gradpruner_ds.save_checkpoint",
        ) from None
    except json.JSONDecodeError as exc:
        raise user_error(
            "a GradPruner checkpoint's state.json must be valid JSON",
            f"{path}: {exc}",
            "restore the checkpoint folder",
        ) from None
    if meta.get("schema_version") != STATE_SCHEMA_VERSION:
        raise user_error(
            f"the checkpoint's GradPruner state must have schema_version {STATE_SCHEMA_VERSION}",
            meta.get("schema_version"),
            f"resume with the gradpruner-ds version that wrote it ({meta.get('gradpruner_version')})",
        )
    return meta


def load_pruner_state(pruner: Any, folder: str | Path) -> PrunePlan | None:
    """Restore this rank's GradPruner state from ``folder``; returns the saved plan if the model was
    already pruned (the caller replays the surgery). Raises ``gradpruner:`` errors on any mismatch."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = read_state(folder)
    if meta["config_digest"] != pruner.config.config_digest():
        raise user_error(
            "the gradpruner block must be the same as when the checkpoint was saved",
            "config digest differs",
            "resume with the original gradpruner settings",
        )
    if meta["num_layers"] != pruner.num_layers:
        raise user_error(
            "the checkpoint was saved for a model with another number of decoder layers",
            f"{meta['num_layers']} in the checkpoint, {pruner.num_layers} now",
            "build the same (dense) model as the run that saved the checkpoint",
        )
    pruner.steps_seen = int(meta["steps_seen"])
    if meta["plan"] is not None:
        plan = PrunePlan.from_dict(meta["plan"])
        return plan
    if meta["world_size"] != pruner.backend.world_size:
        raise user_error(
            "resuming inside the observation window needs the same world size (IGIA is saved per rank shard)",
            f"saved with {meta['world_size']} ranks, now {pruner.backend.world_size}",
            "resume with the original number of ranks, or restart the window",
        )
    path = folder / f"igia_rank{pruner.backend.rank}.safetensors"
    if not path.exists():
        raise user_error(
            "every rank's IGIA file must be in the checkpoint", str(path), "restore the checkpoint folder"
        )
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for truncated files
        raise user_error(
            "a rank's IGIA file must be a valid safetensors file",
            f"{path}: {exc}",
            "restore the checkpoint folder",
        ) from None
    assert pruner.acc is not None
    pruner.acc.load_state_dict(_unflatten(tensors, meta))
    return None
