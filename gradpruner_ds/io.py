"""File I/O: atomic writes (a reader never sees a half-written report, plan or checkpoint file), strict JSON
reading (a repeated key is an error, not \"last one wins\"), and nested tensors as safetensors files whose
nesting is JSON in the metadata (GradPruner's state and a plain / FSDP2 loop's checkpoints: no pickle)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from gradpruner_ds.errors import GradPrunerError, user_error


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temp file in the same folder, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """``atomic_write_bytes`` for UTF-8 text."""
    atomic_write_bytes(path, text.encode())


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise user_error(
                "a JSON object must not name a key twice (which one would count is a guess)",
                f"'{key}' twice",
                f"keep one '{key}'",
            )
        seen[key] = value
    return seen


def loads_json(text: str, what: str, where: str = "") -> Any:
    """``json.loads`` that refuses repeated keys; errors are ``gradpruner:`` errors naming ``what``
    (e.g. "the DeepSpeed config") and ``where`` it came from."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise user_error(f"{what} must be valid JSON", f"{where}: {exc}", "fix the JSON") from None
    except GradPrunerError as exc:
        raise GradPrunerError(f"{exc} (in {what} {where})".replace(" )", ")")) from None


def read_json_file(path: str | Path, what: str) -> Any:
    """Read the JSON file ``what`` (e.g. "the DeepSpeed config") strictly (:func:`loads_json`); a missing or
    unreadable file is a ``gradpruner:`` error too."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise user_error(f"{what} file must exist", str(p), "pass a valid path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise user_error(
            f"{what} file must be readable UTF-8 ({exc})", str(p), "pass a readable file"
        ) from None
    return loads_json(text, what, str(p))


_TENSOR = "__tensor__"


def _split(obj: Any, tensors: dict[str, Any], path: str) -> Any:
    """``obj`` with every tensor replaced by ``{"__tensor__": name}`` (the tensor goes to ``tensors``)."""
    if _is_tensor(obj):
        t = obj.detach().cpu().contiguous()
        if any(t.untyped_storage().data_ptr() == o.untyped_storage().data_ptr() for o in tensors.values()):
            t = t.clone()  # a tensor seen twice (tied weights): safetensors stores each once
        tensors[path] = t
        return {_TENSOR: path}
    if isinstance(obj, dict):
        return {str(k): _split(v, tensors, f"{path}/{k}") for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_split(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    return obj


def _join(obj: Any, tensors: dict[str, Any]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            return tensors[obj[_TENSOR]]
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def _is_tensor(obj: Any) -> bool:
    import torch

    return isinstance(obj, torch.Tensor)


def write_tensors(path: Path, obj: Any, save_id: str = "") -> None:
    """``obj`` (nested dicts / lists of tensors and JSON values) as one safetensors file, its nesting in the
    metadata (no pickle), atomically."""
    from safetensors.torch import save as st_save

    tensors: dict[str, Any] = {}
    skeleton = _split(obj, tensors, "s")
    atomic_write_bytes(
        path, st_save(tensors, metadata={"skeleton": json.dumps(skeleton), "save_id": save_id})
    )


def read_tensors(path: Path, save_id: str | None = None, what: str = "statistics") -> Any:
    """Read :func:`write_tensors` output (``save_id``: the save it must belong to, when known)."""
    from safetensors import safe_open

    if not path.exists():
        raise user_error(
            f"every rank's {what} file must be in the checkpoint",
            str(path),
            "restore the checkpoint folder",
        )
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            skeleton = json.loads(meta["skeleton"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as exc:  # safetensors raises its own error types for truncated files
        raise user_error(
            f"a rank's {what} file must be a valid safetensors file written by gradpruner-ds",
            f"{path}: {exc}",
            "restore the checkpoint folder",
        ) from None
    if save_id is not None and meta.get("save_id", "") != save_id:
        raise user_error(
            f"a rank's {what} file must belong to the same save as the checkpoint's state.json",
            f"{path}: save {meta.get('save_id')!r}, state.json {save_id!r}",
            "resume from a complete checkpoint (this file is left from another save under the same tag)",
        )
    return _join(skeleton, tensors)
