"""Checkpoints that carry GradPruner's state (``GradPruner.state_dict()``) without pickle.

Layout, inside a checkpoint folder (for DeepSpeed: ``<save_dir>/<tag>/gradpruner/``):

* ``state.json`` (rank 0): schema version, gradpruner-ds version, config digest, world size, step counts
  of the window, and the plan (JSON with its digest) once the model is pruned;
* ``stats_rank<r>.safetensors`` (every rank, only during the window): that rank's pieces of every
  statistic the criterion collects (``gradpruner_ds.statistics``: IGIA, hidden-state sums, layer-gate
  sums; keyed by statistic name) and, during the distillation after the prune, the teacher. The nesting of the state (which tensor is
  where) is kept as JSON in the file's metadata, per rank: ranks may hold differently laid out pieces.

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

STATE_SCHEMA_VERSION = 3
"""3: statistics keyed by statistic name (``igia``, ``hidden_states``, ``layer_gates``)."""
SUBDIR = "gradpruner"
_TENSOR = "__tensor__"


def _split(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """``obj`` with every tensor replaced by ``{"__tensor__": name}`` (the tensor goes to ``tensors``)."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {_TENSOR: path}
    if isinstance(obj, dict):
        return {str(k): _split(v, tensors, f"{path}/{k}") for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_split(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    return obj


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            return tensors[obj[_TENSOR]]
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def save_pruner_state(pruner: Any, folder: str | Path) -> None:
    """Write this rank's ``pruner.state_dict()`` into ``folder`` (call on every rank)."""
    state = pruner.state_dict()
    stats = state.pop("statistics")
    write_state_files(folder, state, stats, pruner.backend.rank)


def write_state_files(folder: str | Path, state: dict[str, Any], stats: dict[str, Any], rank: int) -> None:
    """``state.json`` (rank 0) and this rank's statistics file: inside the window (a file even when nothing
    is measured: checked on load) or during the distillation after the prune (``stats["recovery"]``)."""
    from safetensors.torch import save as st_save

    folder = Path(folder)
    if state["plan"] is None or stats.get("recovery") is not None:
        tensors: dict[str, torch.Tensor] = {}
        skeleton = _split(stats, tensors, "s")
        blob = st_save(tensors, metadata={"skeleton": json.dumps(skeleton)})
        atomic_write_bytes(folder / f"stats_rank{rank}.safetensors", blob)
    if rank == 0:
        meta = {**state, "schema_version": STATE_SCHEMA_VERSION, "gradpruner_version": __version__}
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


def read_statistics(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    if not path.exists():
        raise user_error(
            "every rank's statistics file must be in the checkpoint",
            str(path),
            "restore the checkpoint folder",
        )
    try:
        with safe_open(str(path), framework="pt") as fh:
            skeleton = json.loads((fh.metadata() or {})["skeleton"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as exc:  # safetensors raises its own error types for truncated files
        raise user_error(
            "a rank's statistics file must be a valid safetensors file written by gradpruner-ds",
            f"{path}: {exc}",
            "restore the checkpoint folder",
        ) from None
    return _join(skeleton, tensors)


def load_pruner_state(pruner: Any, folder: str | Path) -> PrunePlan | None:
    """Restore this rank's GradPruner state from ``folder`` (``pruner.load_state_dict``); returns the saved
    plan if the model was already pruned (the caller replays the surgery). ``gradpruner:`` errors on any
    mismatch."""
    folder = Path(folder)
    state = read_state(folder)
    path = folder / f"stats_rank{pruner.backend.rank}.safetensors"
    if (state.get("plan") is None and state.get("world_size") == pruner.backend.world_size) or (
        state.get("plan") is not None and path.exists()  # saved during the distillation after the prune
    ):
        stats = read_statistics(path)
    else:  # after the prune nothing is measured any more; another world size is refused by the pruner
        stats = {"recovery": None}
    return pruner.load_state_dict({**state, "statistics": stats})


COMPLETE = "complete.json"
"""Marker in ``<tag>/gradpruner/`` written once every rank's files (the engine's and GradPruner's) exist."""


def commit_checkpoint(save_dir: str | Path, tag: str, rank: int, wait_all: Any) -> None:
    """Make checkpoint ``tag`` visible: after ``wait_all()`` (every rank has written and closed its files),
    rank 0 writes the completion marker (each file of the tag with its size), then moves ``latest`` to
    ``tag`` atomically. A rank that dies at any earlier point leaves ``latest`` on the previous, intact
    checkpoint."""
    folder = Path(save_dir) / tag
    wait_all()
    if rank == 0:
        files = {
            str(p.relative_to(folder)): p.stat().st_size
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != COMPLETE
        }
        atomic_write_text(folder / SUBDIR / COMPLETE, json.dumps({"tag": tag, "files": files}, indent=1))
        atomic_write_text(Path(save_dir) / "latest", tag)
    wait_all()


def _complete(folder: Path) -> bool:
    """True when the marker exists and every file it lists is there with its size."""
    try:
        files = json.loads((folder / SUBDIR / COMPLETE).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    return all((folder / f).is_file() and (folder / f).stat().st_size == n for f, n in files.items())


def resolve_tag(load_dir: str | Path, tag: str | None) -> str:
    """The tag to resume from (``latest`` when ``tag`` is None), checked complete; an incomplete one is a
    ``gradpruner:`` error that names the newest complete checkpoint in the folder."""
    load_dir = Path(load_dir)
    if tag is None:
        latest = load_dir / "latest"
        if not latest.exists():
            raise user_error("a checkpoint folder must name its latest tag", str(latest), "pass tag=...")
        tag = latest.read_text().strip()
    if not _complete(load_dir / tag):
        intact = sorted(
            (p for p in load_dir.iterdir() if p.is_dir() and _complete(p)), key=lambda p: p.stat().st_mtime
        )
        hint = f"resume with tag='{intact[-1].name}' (the newest complete one)" if intact else "start over"
        raise user_error(
            "a checkpoint must be complete (every rank's files written, then marked) to resume from it",
            f"'{tag}' in {load_dir} has no valid {SUBDIR}/{COMPLETE}",
            hint,
        )
    return tag
