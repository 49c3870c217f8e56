"""File I/O: atomic writes (a reader never sees a half-written report, plan or checkpoint file) and strict
JSON reading (a repeated key is an error, not \"last one wins\")."""

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
