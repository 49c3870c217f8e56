"""Checkpoints that carry GradPruner's state (``GradPruner.state_dict()``) without pickle, for every engine.

:func:`save_checkpoint` / :func:`load_checkpoint` take what the training loop steps (a DeepSpeed engine, or the
torch optimizer of a plain or FSDP2 loop: ``pruner.backend`` saves the engine's own state, see
``EngineAdapter.save_engine_state``) and the pruner. A save is complete or invisible, whatever the tag: the
completion marker of a tag is removed (and GradPruner's files of the tag with it) before anything of the save is
written, every piece of GradPruner's state carries this save's id, and the marker, written once every rank has
written its files, binds each file of the tag by size and modification time; the HF Trainer's checkpoints get
the same marker (``integrations/hf_trainer.py``) and every resume path checks it.

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
from gradpruner_ds.io import atomic_write_text, read_tensors, write_tensors

STATE_SCHEMA_VERSION = 3
"""3: statistics keyed by statistic name (``igia``, ``hidden_states``, ``layer_gates``)."""
SUBDIR = "gradpruner"


def save_pruner_state(pruner: Any, folder: str | Path, save_id: str = "") -> None:
    """Write this rank's ``pruner.state_dict()`` into ``folder`` (call on every rank)."""
    state = pruner.state_dict()
    stats = state.pop("statistics")
    write_state_files(folder, state, stats, pruner.backend.rank, save_id)


def write_state_files(
    folder: str | Path, state: dict[str, Any], stats: dict[str, Any], rank: int, save_id: str = ""
) -> None:
    """``state.json`` (rank 0) and this rank's statistics file: inside the window (a file even when nothing
    is measured: checked on load) or during the distillation after the prune (``stats["recovery"]``). Both
    carry ``save_id`` (the same on every rank of one save)."""
    folder = Path(folder)
    state = {**state, "save_id": save_id}
    if state["plan"] is None or stats.get("recovery") is not None:
        write_tensors(folder / f"stats_rank{rank}.safetensors", stats, save_id)
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
    if not isinstance(meta, dict):
        raise user_error(
            "a GradPruner checkpoint's state.json must hold a JSON object",
            f"{path}: {type(meta).__name__}",
            "restore the checkpoint folder",
        )
    if meta.get("schema_version") != STATE_SCHEMA_VERSION:
        raise user_error(
            f"the checkpoint's GradPruner state must have schema_version {STATE_SCHEMA_VERSION}",
            meta.get("schema_version"),
            f"resume with the gradpruner-ds version that wrote it ({meta.get('gradpruner_version')})",
        )
    return meta


def read_statistics(path: Path, save_id: str | None = None) -> dict[str, Any]:
    return read_tensors(path, save_id)


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
        stats = read_statistics(path, state.get("save_id", ""))
    else:  # after the prune nothing is measured any more; another world size is refused by the pruner
        stats = {"recovery": None}
    return pruner.load_state_dict({**state, "statistics": stats}, where=str(folder / "state.json"))


COMPLETE = "complete.json"
"""Marker in ``<tag>/gradpruner/`` written once every rank's files (the engine's and GradPruner's) exist."""


def begin_save(folder: str | Path, rank: int, wait_all: Any) -> None:
    """Before any file of a save is written: the tag's completion marker goes (rank 0), and so do this rank's
    GradPruner files of an earlier save under the same tag; then every rank waits for the others, so a save
    that dies half-way leaves a tag without a marker, never an old marker over new files."""
    sub = Path(folder) / SUBDIR
    if rank == 0:
        (sub / COMPLETE).unlink(missing_ok=True)
        (sub / "state.json").unlink(missing_ok=True)
    (sub / f"stats_rank{rank}.safetensors").unlink(missing_ok=True)
    (sub / f"engine_rank{rank}.safetensors").unlink(missing_ok=True)
    wait_all()


def _listing(folder: Path) -> dict[str, list[int]]:
    return {
        str(p.relative_to(folder)): [p.stat().st_size, p.stat().st_mtime_ns]
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != COMPLETE
    }


def commit_checkpoint(
    save_dir: str | Path, tag: str, rank: int, wait_all: Any, latest: bool = True, save_id: str = ""
) -> None:
    """Make checkpoint ``tag`` visible: after ``wait_all()`` (every rank has written and closed its files),
    rank 0 writes the completion marker (each file of the tag with its size and modification time, and the
    save's id), then (``latest``) moves ``latest`` to ``tag`` atomically. A rank that dies at any earlier point
    leaves no marker on this tag and ``latest`` on the previous, intact checkpoint."""
    folder = Path(save_dir) / tag
    wait_all()
    if rank == 0:
        marker = {"tag": tag, "save_id": save_id, "files": _listing(folder)}
        atomic_write_text(folder / SUBDIR / COMPLETE, json.dumps(marker, indent=1))
        if latest:
            atomic_write_text(Path(save_dir) / "latest", tag)
    wait_all()


def complete(folder: Path) -> bool:
    """True when the marker exists, every file it lists is there with its size and modification time (no file of
    the tag rewritten since), GradPruner's folder holds no file it does not list, and GradPruner's state belongs
    to the same save."""
    try:
        marker = json.loads((folder / SUBDIR / COMPLETE).read_text())
        files = marker["files"]
        ok = all(
            (folder / f).is_file()
            and [(folder / f).stat().st_size, (folder / f).stat().st_mtime_ns] == list(v)
            for f, v in files.items()
        )
        ours = {
            str(f.relative_to(folder))
            for f in (folder / SUBDIR).iterdir()
            if f.is_file() and f.name != COMPLETE
        }
        ok = ok and ours <= set(files)  # no GradPruner file that this save did not write
        state = folder / SUBDIR / "state.json"
        if ok and state.exists():
            ok = json.loads(state.read_text()).get("save_id", "") == marker.get("save_id", "")
        return bool(ok)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def resolve_tag(load_dir: str | Path, tag: str | None) -> str:
    """The tag to resume from (``latest`` when ``tag`` is None), a folder directly inside ``load_dir`` (never a
    path that leads out of it), checked complete; an incomplete one is a ``gradpruner:`` error that names the
    newest complete checkpoint in the folder."""
    load_dir = Path(load_dir)
    if tag is None:
        latest = load_dir / "latest"
        if not latest.exists():
            raise user_error("a checkpoint folder must name its latest tag", str(latest), "pass tag=...")
        tag = latest.read_text().strip()
    if not tag or Path(tag).name != tag or tag in (".", ".."):
        raise user_error(
            "a checkpoint tag must name a folder directly inside the checkpoint folder",
            tag,
            "pass the name of a tag folder (no path separators, no '..')",
        )
    if not complete(load_dir / tag):
        intact = sorted(
            (p for p in load_dir.iterdir() if p.is_dir() and complete(p)), key=lambda p: p.stat().st_mtime
        )
        hint = f"resume with tag='{intact[-1].name}' (the newest complete one)" if intact else "start over"
        raise user_error(
            "a checkpoint must be complete (every rank's files written, then marked) to resume from it",
            f"'{tag}' in {load_dir} has no valid {SUBDIR}/{COMPLETE}",
            hint,
        )
    return tag


def new_save_id(backend: Any) -> str:
    """A random id every rank of one save agrees on (rank 0's, through one all-reduce of the backend)."""
    import secrets

    value = torch.tensor([secrets.randbits(62) if backend.rank == 0 else 0], dtype=torch.int64)
    backend.all_reduce_sum_(value)
    return f"{int(value):016x}"


def save_checkpoint(
    stepper: Any,
    pruner: Any,
    save_dir: str | Path,
    tag: str | None = None,
    client_state: dict | None = None,
    *,
    lr_scheduler: Any = None,
) -> str:
    """Save what the loop trains and GradPruner's state under ``<save_dir>/<tag>/``, committed only when every
    rank's files are written (``latest`` moves last). ``stepper``: what ``maybe_prune`` returned (a DeepSpeed
    engine, or the torch optimizer of a plain / FSDP2 loop); ``pruner``: the run's :class:`GradPruner` (or a
    ``DisabledPruner`` with ``backend_for(...)``). Call on every rank; returns the tag."""
    from gradpruner_ds.consensus import wait_all

    backend = pruner.backend
    tag = tag or backend.default_tag(stepper)
    folder = Path(save_dir) / tag
    timeout = pruner.config.consensus_timeout_s if hasattr(pruner, "config") else 300.0
    group = getattr(backend, "group", None)

    def barrier() -> None:
        if backend.world_size > 1:
            wait_all(timeout, group, "the checkpoint commit")

    begin_save(folder, backend.rank, barrier)
    save_id = new_save_id(backend)
    backend.save_engine_state(
        stepper, pruner.model, Path(save_dir), tag, lr_scheduler, client_state or {}, save_id
    )
    if hasattr(pruner, "state_dict"):  # a DisabledPruner has nothing to save
        save_pruner_state(pruner, folder / SUBDIR, save_id)
    commit_checkpoint(save_dir, tag, backend.rank, barrier, save_id=save_id)
    return tag


def load_checkpoint(
    stepper: Any, pruner: Any, load_dir: str | Path, tag: str | None = None, lr_scheduler: Any = None
) -> tuple[Any, Any, dict]:
    """Resume: restore GradPruner's state, replay the surgery if the saved run had cut layers (a new engine
    over the pruned model under DeepSpeed, the optimizer pruned in place otherwise), then the engine's own
    state. ``tag`` None: the one ``latest`` names, which must be complete. Returns ``(stepper, lr_scheduler,
    client_state)`` -- the objects to train with from now on.

    Safety: GradPruner's own files are JSON and safetensors (no code runs on load) and ``latest`` / ``tag`` must
    name a folder directly inside ``load_dir``; DeepSpeed reads ITS files with pickle
    (``torch.load(weights_only=False)``): load only DeepSpeed checkpoints you trust."""
    tag = resolve_tag(load_dir, tag)
    plan = load_pruner_state(pruner, Path(load_dir) / tag / SUBDIR) if hasattr(pruner, "state_dict") else None
    if plan is not None:
        stepper, lr_scheduler = pruner.replay(plan, stepper, lr_scheduler)
    client_state = pruner.backend.load_engine_state(stepper, pruner.model, Path(load_dir), tag, lr_scheduler)
    return stepper, lr_scheduler, client_state
