"""Save the (pruned) model as a checkpoint that ``AutoModelForCausalLM.from_pretrained`` loads, from
whatever holds it in the training job: a plain HF model, a peft-wrapped one, a DeepSpeed engine (ZeRO-1/2/3)
or an FSDP2-sharded model.

* Files like ``PreTrainedModel.save_pretrained``'s: the weights split into shards of at most
  ``max_shard_size`` (default: the installed transformers' own default, 50GB in transformers 5, so most
  models are one ``model.safetensors``; several shards come with ``model.safetensors.index.json``), split
  by the same rule (``huggingface_hub.split_torch_state_dict_into_shards``); tied parameters written once;
  files created with the process's umask like any file write (0644 under umask 022).
* Sharded engines are gathered one unit at a time (the engine's own gather: ZeRO-3's
  ``GatheredParameters``, FSDP2's ``full_tensor``) and each unit is streamed into its shard at offsets
  planned from the global shapes, so at most one layer is held in full at once whatever the shard size.
  This is a collective: every rank calls it; rank 0 writes.
* peft LoRA: the adapters are merged into the written weights (``W + scale * B @ A`` per active adapter,
  computed for the copy that is written; the training model is not changed), so the folder is the complete
  pruned model with the fine-tuning in it.
* Weights that are not finite (a diverged run) are refused unless ``allow_non_finite=True``.

Exports never destroy:

* Only its own files are written and replaced. An export is marked by ``gradpruner_export.json``, which
  lists its files (an export written before the marker existed is recognised by its file set: one shard per
  decoder layer); every other entry of the folder (a user's notes, ``checkpoints/``, GradPruner's report)
  is kept. A folder holding a model (or files) that an export of ours did not write is refused before any
  work (``gradpruner:`` error), as are a path that is not a folder, a read-only folder, a mount point and too
  little free disk for the weights. :func:`check_target` makes the same checks for a caller that wants them
  before its training starts.
* Atomic for every kill point: the new export is built in a hidden sibling folder
  (``.<name>.gradpruner-tmp-<pid>``); a new folder is renamed into place; into an existing folder without
  an export the files are moved with ``config.json`` last; a previous export is swapped with the new one in
  one ``renameat2(RENAME_EXCHANGE)`` (Linux; the folder's other entries move over first). At every instant
  ``from_pretrained(out_dir)`` loads the previous export or the new one (or nothing, where there was none).
  The next call finds an interrupted export's leftovers, puts the user's entries back and removes the
  rest (logged).
* A failure while writing (disk full, I/O error) is a ``gradpruner:`` error; the temporary folder is removed
  and the previous export is untouched.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import math
import os
import re
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from gradpruner_ds.backends import Gather, global_shape, holder_of
from gradpruner_ds.errors import GradPrunerError, user_error
from gradpruner_ds.log import get_logger

log = get_logger("export")

MARKER = "gradpruner_export.json"
"""The file that marks a folder as an export of ours and lists the files it wrote."""

_PEFT_NAME = re.compile(r"\.(base_layer|modules_to_save\.[^.]+)\.")
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.gradpruner-(?P<kind>tmp|old)-(?P<pid>\d+)$")
_MODEL_FILE = re.compile(
    r"^(config\.json|generation_config\.json|adapter_config\.json|.*\.safetensors|.*\.safetensors\.index\.json|"
    r".*\.bin|.*\.bin\.index\.json|.*\.gguf|.*\.pt|.*\.pth)$"
)
_ST_DTYPE = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def _holder(obj: Any) -> tuple[nn.Module, int, Gather]:
    """The module that holds the weights, this process's rank, and how to gather a unit in full."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    module, gather = holder_of(obj)
    return module, rank, gather


def _unit_tensors(module: nn.Module, prefix: str, names: dict[int, str]) -> list[tuple[str, nn.Module, str]]:
    """``(name in the checkpoint, owning module, attribute)`` of each parameter under ``module`` that the
    checkpoint holds (LoRA factors and peft's original copies left out; a tied parameter only under its
    first name, like ``save_pretrained``: ``from_pretrained`` ties it again)."""
    out = []
    for sub_name, sub in module.named_modules(prefix=prefix):
        for attr, p in sub.named_parameters(recurse=False):
            full = f"{sub_name}.{attr}" if sub_name else attr
            if names.get(id(p)) != full or ".lora_" in full or ".original_module." in full:
                continue
            out.append((_PEFT_NAME.sub(".", full), sub, attr))
    return out


def _lora_parents(module: nn.Module) -> dict[int, nn.Module]:
    """id(base weight) -> the peft LoRA layer wrapping it (whose delta is added on export)."""
    out = {}
    for sub in module.modules():
        get_base = getattr(sub, "get_base_layer", None)
        if hasattr(sub, "get_delta_weight") and callable(get_base):
            out[id(get_base().weight)] = sub
    return out


def default_max_shard_size() -> int | str:
    """The installed transformers' default ``max_shard_size`` of ``PreTrainedModel.save_pretrained``."""
    import inspect

    from transformers import PreTrainedModel

    try:
        default = inspect.signature(PreTrainedModel.save_pretrained).parameters["max_shard_size"].default
    except (KeyError, ValueError, TypeError):  # pragma: no cover - a transformers without the argument
        return "5GB"
    return default if isinstance(default, int | str) and default is not inspect.Parameter.empty else "5GB"


def _shard_limit(max_shard_size: int | str | None) -> int:
    """``max_shard_size`` in bytes (a size like ``"5GB"`` read as huggingface_hub reads it: KB/MB/GB/TB = 10^3..)."""
    value = default_max_shard_size() if max_shard_size is None else max_shard_size
    limit = -1
    if isinstance(value, int) and not isinstance(value, bool):
        limit = value
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]B)\s*", value, flags=re.IGNORECASE)
        if m:
            limit = int(float(m[1]) * 1000 ** ("KMGT".index(m[2][0].upper()) + 1))
    if limit < 1:
        raise user_error(
            "max_shard_size must be a positive byte count or a size like '5GB'",
            max_shard_size,
            "pass e.g. '5GB'",
        )
    return limit


# ---------------------------------------------------------------------------------------------------
# The export
# ---------------------------------------------------------------------------------------------------


def save_pretrained(
    model: Any,
    out_dir: str | Path,
    tokenizer: Any = None,
    *,
    max_shard_size: int | str | None = None,
    allow_non_finite: bool = False,
    merge_lora: bool = True,
) -> Path:
    """Write ``model`` (an HF CausalLM, peft-wrapped, a DeepSpeed engine or FSDP2-sharded) + its config (and
    ``tokenizer``) to ``out_dir``; ``from_pretrained(out_dir)`` gives the same logits. Call on every rank.

    ``max_shard_size``: the largest shard (bytes or a size like ``"5GB"``); default: transformers' default.
    ``allow_non_finite``: write weights with inf/NaN values too (refused by default: a diverged run).
    ``merge_lora``: False writes a peft model's base model without its adapters (the pruned base that the
    adapters, saved by peft, load onto).

    Never removes what it did not write, refuses a folder holding files an export of ours did not write
    (``gradpruner:`` error, before any work), and replaces a previous export atomically (module docstring).
    """
    from gradpruner_ds.arch import decoder_layers, unwrap_model

    limit = _shard_limit(max_shard_size)
    holder, rank, gather = _holder(model)
    hf = unwrap_model(holder)
    lora = _lora_parents(hf) if merge_lora else {}
    for adapter in lora.values():
        _factors(adapter)  # refuses adapters it cannot merge (DoRA) before any work
    names: dict[int, str] = {}
    for n, p in hf.named_parameters():  # de-duplicated: tied weights appear once
        names.setdefault(id(p), n)
    prefix_of = {id(m): n for n, m in hf.named_modules()}
    layers = decoder_layers(hf)
    units = [_unit_tensors(layer, prefix_of[id(layer)], names) for layer in layers]
    in_layers = {id(getattr(m, a)) for unit in units for _, m, a in unit}
    rest = [u for u in _unit_tensors(hf, "", names) if id(getattr(u[1], u[2])) not in in_layers]
    units = [[u] for u in rest[:1]] + units + [[u] for u in rest[1:]]
    persistent = set(hf.state_dict().keys())
    buffers = {_PEFT_NAME.sub(".", n): b for n, b in hf.named_buffers() if n in persistent}
    specs = [
        (name, global_shape(getattr(m, a)), getattr(m, a).dtype) for unit in units for name, m, a in unit
    ]
    specs += [(n, tuple(b.shape), b.dtype) for n, b in buffers.items()]
    plan = _ShardPlan(specs, limit)
    plan.total_parameters = sum(math.prod(shape) for _, shape, _ in specs[: len(specs) - len(buffers)])

    export: _Export | None = None
    failure: GradPrunerError | None = None
    if rank == 0:
        try:
            export = _Export(out_dir, plan.total_bytes)
            export.stage(hf, next(hf.parameters()).dtype, tokenizer)
        except GradPrunerError as exc:
            failure = exc
    failure = _agree(failure)  # every rank raises the same refusal, before any gather
    if failure is not None:
        raise failure

    writer = _ShardWriter(export.tmp, plan, export.final) if export is not None else None
    bad: list[str] = []  # tensors with inf/NaN values
    try:
        for unit in units:
            params = [getattr(m, a) for _, m, a in unit]
            adapted = [lora.get(id(p)) for p in params]
            extra = [t for layer in adapted if layer is not None for t in _factors(layer)]
            with gather(params + extra) as full:
                if writer is None or failure is not None:
                    continue  # only rank 0 writes; after a failure the gathers go on, nothing is written
                factors = iter(full[len(params) :])
                for (name, _, _), value, layer in zip(unit, full, adapted, strict=False):
                    delta = _delta(layer, factors) if layer is not None else None
                    value = value.detach() if delta is None else value.detach() + delta.to(value.dtype)
                    failure = failure or _write_one(writer, name, value, bad, allow_non_finite)
        if writer is not None:
            for n, b in buffers.items():
                failure = failure or _write_one(writer, n, b.detach(), bad, allow_non_finite)
        if export is not None and writer is not None and failure is None:
            if bad and not allow_non_finite:
                failure = user_error(
                    "the model's weights must be finite to be exported (a diverged run)",
                    f"inf/NaN in {len(bad)} tensors: {', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''}",
                    "lower the learning rate or check the loss scale and train again; or pass "
                    "allow_non_finite=True to write these weights anyway",
                )
            else:
                writer.finish()
                export.commit(plan)
                if bad:
                    log.warning(
                        "exported %d tensors with inf/NaN values (allow_non_finite): %s", len(bad), bad[:4]
                    )
    except GradPrunerError as exc:
        failure = exc
    except BaseException:
        if export is not None:
            export.abort()
        raise
    finally:
        if writer is not None:
            writer.close()
    if failure is not None and export is not None:
        export.abort()
    failure = _agree(failure)
    if failure is not None:
        raise failure
    return Path(out_dir)


def _write_one(
    writer: _ShardWriter, name: str, value: torch.Tensor, bad: list[str], allow_non_finite: bool
) -> GradPrunerError | None:
    """Stream one tensor into its shard (rank 0). A non-finite tensor is recorded in ``bad`` (and, unless
    allowed, nothing more is written); a failed write is returned as the ``gradpruner:`` error."""
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        bad.append(name)
    if bad and not allow_non_finite:
        return None
    try:
        writer.write(name, value.to("cpu"))
    except OSError as exc:
        return _os_error(exc, writer.where)
    return None


def _agree(failure: GradPrunerError | None) -> GradPrunerError | None:
    """Rank 0's verdict on every rank (one broadcast when there are several ranks)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return failure
    box = [None if failure is None else str(failure)]
    dist.broadcast_object_list(box, src=0)
    return None if box[0] is None else GradPrunerError(box[0])


def _os_error(exc: OSError, where: Path) -> GradPrunerError:
    """A failed write as a ``gradpruner:`` error naming the cause and the fix."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return user_error(
            "the export needs free disk space (the disk or quota is full; the partial export was removed, a "
            "previous one is untouched)",
            f"{where}: {exc.strerror}",
            "free space on that disk or pass another out_dir",
        )
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return user_error(
            "the export's folder must be writable",
            f"{where}: {exc.strerror}",
            "pass a folder you can write to",
        )
    return user_error("the export could not be written", f"{where}: {exc}", "check the disk and try again")


# ---------------------------------------------------------------------------------------------------
# Shards: planned from the global shapes, streamed at their offsets
# ---------------------------------------------------------------------------------------------------


class _ShardPlan:
    """Which file each tensor goes to (transformers' rule) and its place in that safetensors file."""

    def __init__(self, specs: list[tuple[str, tuple[int, ...], torch.dtype]], limit: int) -> None:
        from huggingface_hub import split_torch_state_dict_into_shards

        for name, _, dtype in specs:
            if dtype not in _ST_DTYPE:
                raise user_error(
                    "save_pretrained writes the safetensors dtypes", f"{name}: {dtype}", "cast it"
                )
        meta = {name: torch.empty(shape, dtype=dtype, device="meta") for name, shape, dtype in specs}
        split = split_torch_state_dict_into_shards(
            meta, filename_pattern="model{suffix}.safetensors", max_shard_size=limit
        )
        self.sharded = bool(split.is_sharded)
        self.total_parameters = 0  # set by the caller (buffers are not parameters)
        self.file_of = dict(split.tensor_to_filename)
        self.nbytes = {n: math.prod(s) * torch.empty((), dtype=d).element_size() for n, s, d in specs}
        self.dtype = {n: d for n, _, d in specs}
        self.total_bytes = sum(self.nbytes.values())
        self.layout: dict[str, tuple[bytes, dict[str, tuple[int, int]]]] = {}
        for fname, tensor_names in split.filename_to_tensors.items():
            # like safetensors: larger element sizes first, so every tensor is aligned; then by name
            order = sorted(tensor_names, key=lambda n: (-meta[n].element_size(), n))
            offsets, at = {}, 0
            for n in order:
                offsets[n] = (at, at + self.nbytes[n])
                at += self.nbytes[n]
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            for n in order:
                header[n] = {
                    "dtype": _ST_DTYPE[meta[n].dtype],
                    "shape": list(meta[n].shape),
                    "data_offsets": list(offsets[n]),
                }
            text = json.dumps(header, separators=(",", ":")).encode()
            text += b" " * (-(8 + len(text)) % 8)
            self.layout[fname] = (len(text).to_bytes(8, "little") + text, offsets)
        self.weight_map = dict(sorted(self.file_of.items()))


class _ShardWriter:
    """Writes each tensor into its planned file at its offset; a file is fsync-ed and closed once complete."""

    def __init__(self, folder: Path, plan: _ShardPlan, where: Path) -> None:
        self.folder, self.plan, self.where = folder, plan, where
        self.open: dict[str, BinaryIO] = {}
        self.left = {f: set(offsets) for f, (_, offsets) in plan.layout.items()}

    def write(self, name: str, value: torch.Tensor) -> None:
        fname = self.plan.file_of[name]
        header, offsets = self.plan.layout[fname]
        value = value.to(self.plan.dtype[name])  # the parameter's dtype, as planned (a gather may upcast)
        data = value.contiguous().reshape(-1).view(torch.uint8).numpy()
        begin, end = offsets[name]
        if data.nbytes != end - begin:
            raise RuntimeError(
                f"{name}: {data.nbytes} bytes, planned {end - begin}"
            )  # a bug, not a user error
        fh = self.open.get(fname)
        if fh is None:
            fh = self.open[fname] = open(self.folder / fname, "wb")  # noqa: SIM115 - closed in _complete/close
            fh.write(header)
        fh.seek(len(header) + begin)
        fh.write(data.data)
        self.left[fname].discard(name)
        if not self.left[fname]:
            self._complete(fname)

    def _complete(self, fname: str) -> None:
        fh = self.open.pop(fname, None)
        if fh is None:  # a shard of empty tensors only
            fh = open(self.folder / fname, "wb")  # noqa: SIM115
            fh.write(self.plan.layout[fname][0])
        header, offsets = self.plan.layout[fname]
        fh.truncate(len(header) + max((e for _, e in offsets.values()), default=0))
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()

    def finish(self) -> None:
        """Every shard complete (tensors of zero elements never come through ``write``)."""
        for fname, left in self.left.items():
            if left and all(self.plan.nbytes[n] == 0 for n in left):
                left.clear()
                self._complete(fname)
        missing = [n for left in self.left.values() for n in left]
        if missing:
            raise RuntimeError(f"tensors never written: {missing[:4]}")  # a bug, not a user error

    def close(self) -> None:
        for fh in self.open.values():
            with contextlib.suppress(OSError):
                fh.close()
        self.open.clear()


# ---------------------------------------------------------------------------------------------------
# The folder: checks, staging, commit, recovery
# ---------------------------------------------------------------------------------------------------


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_marker(folder: Path) -> list[str] | None:
    """The files a previous export of ours wrote into ``folder`` (None: no export of ours there)."""
    path = folder / MARKER
    if not path.exists():
        return None
    try:
        files = json.loads(path.read_text())["files"]
        if not isinstance(files, list) or not all(isinstance(f, str) and "/" not in f for f in files):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError):
        raise user_error(
            f"the export marker {MARKER} must list the files of the export it marks",
            str(path),
            "restore it, or move the folder away (it is not a valid export of gradpruner)",
        ) from None
    return files


class _Export:
    """One export's folder work on rank 0: the checks, the staging folder, the commit and the cleanup."""

    def __init__(self, final_dir: str | Path, weight_bytes: int, *, dry: bool = False) -> None:
        """The checks, in order, and (unless ``dry``) the recovery of an interrupted export's leftovers."""
        if not str(final_dir):
            raise user_error(
                "save_pretrained needs a folder to write", str(final_dir), "pass e.g. 'outputs/final'"
            )
        final = Path(os.path.realpath(final_dir))
        self.final, self.parent, self.name = final, final.parent, final.name
        self.tmp = self.parent / f".{self.name}.gradpruner-tmp-{os.getpid()}"
        self.moved: list[str] = []
        self.staged = False
        if final.exists() and not final.is_dir():
            raise user_error(
                "save_pretrained writes a folder; the path is a file", str(final_dir), "pass a folder path"
            )
        anc = self.parent
        while not anc.exists():
            anc = anc.parent
        if not anc.is_dir():
            raise user_error(
                "save_pretrained writes a folder; a part of the path is a file",
                str(anc),
                "pass a folder path",
            )
        for where in [anc] + ([final] if final.exists() else []):
            if not os.access(where, os.W_OK | os.X_OK):
                raise user_error(
                    "the export's folder and its parent must be writable (read-only file system or permissions)",
                    str(where),
                    "pass a folder you can write to",
                )
        if final.is_dir() and os.path.ismount(final):  # the temporary sibling would be on another file system
            raise user_error(
                "the export's folder must not be a mount point (its files are built beside it and moved in)",
                str(final_dir),
                "export into a folder inside the mount, e.g. out_dir/model",
            )
        leftovers = self._leftovers()
        for path, _kind, pid in leftovers:
            if _pid_alive(pid):
                raise user_error(
                    "another export into this folder is running (or its process id was reused)",
                    f"{path} (pid {pid})",
                    f"wait for it; if no export is running, remove {path}",
                )
        if not dry:
            self._recover(leftovers)
        previous = _read_marker(final) if final.is_dir() else None
        if previous is None and final.is_dir():
            previous = _legacy_export(final)
        self.previous = previous
        entries = sorted(os.listdir(final)) if final.is_dir() else []
        self.foreign = [e for e in entries if e != MARKER and e not in (previous or [])]
        models = [e for e in self.foreign if _MODEL_FILE.match(e)]
        if models:
            raise user_error(
                "the folder holds a model that gradpruner did not export (no "
                f"{MARKER}), which an export would overwrite or mix with",
                f"{final_dir}: {', '.join(models[:5])}",
                "pass an empty or new folder (save_pretrained keeps other files and replaces only its own "
                f"exports; an export written before exports were marked has no {MARKER}: remove it yourself)",
            )
        free = shutil.disk_usage(anc).free
        if not dry and free < weight_bytes:
            raise user_error(
                "the export needs free disk space for its weights",
                f"{free:,} bytes free at {anc}, {weight_bytes:,} needed",
                "free space on that disk or pass another out_dir",
            )

    # ---- leftovers of an interrupted export -------------------------------------------------------
    def _leftovers(self) -> list[tuple[Path, str, int]]:
        out = []
        if self.parent.is_dir():
            for entry in sorted(os.listdir(self.parent)):
                m = _LEFTOVER.match(entry)
                if m and m["name"] == self.name and (self.parent / entry).is_dir():
                    out.append((self.parent / entry, m["kind"], int(m["pid"])))
        return out

    def _recover(self, leftovers: list[tuple[Path, str, int]]) -> None:
        """Put an interrupted export's leftovers right: a previous export moved aside comes back; entries of
        the user's that were being moved come back; the rest (ours) is removed. An entry that cannot be put
        back (its name is taken again) is left where it is and named."""
        for path, kind, _ in sorted(leftovers, key=lambda x: x[1] != "old"):  # "old" folders first
            if kind == "old" and not self.final.exists():
                os.rename(path, self.final)
                log.warning("recovered an interrupted export: the previous export is back in %s", self.final)
                continue
            ours = _read_marker(path)
            theirs = sorted(e for e in os.listdir(path) if ours is not None and e != MARKER and e not in ours)
            kept = []
            for entry in theirs:
                self.final.mkdir(exist_ok=True)
                if os.path.lexists(self.final / entry):
                    kept.append(entry)
                else:
                    os.rename(path / entry, self.final / entry)
            for entry in os.listdir(path):
                if entry not in kept:
                    _remove(path / entry)
            if not kept:
                os.rmdir(path)
            log.warning(
                "recovered an interrupted export into %s: %sits temporary files removed%s", self.final,
                f"{[e for e in theirs if e not in kept]} moved back, " if len(theirs) > len(kept) else "",
                f"; {kept} stay in {path} (the same names exist again in {self.final}): move them yourself"
                if kept else "",
            )  # fmt: skip

    # ---- staging ----------------------------------------------------------------------------------
    def stage(self, hf: Any, dtype: torch.dtype, tokenizer: Any) -> None:
        """The temporary folder with the config (and tokenizer) files; the names checked against the user's."""
        try:
            self.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(self.tmp)
            self.staged = True
            hf.config.dtype = dtype
            hf.config.save_pretrained(self.tmp)
            if getattr(hf, "generation_config", None) is not None:
                with contextlib.suppress(Exception):  # optional extra; never fail the run on it
                    hf.generation_config.save_pretrained(self.tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(self.tmp)
        except OSError as exc:
            self.abort()
            raise _os_error(exc, self.final) from None
        clash = sorted(set(os.listdir(self.tmp)) & set(self.foreign))
        if clash:
            self.abort()
            raise user_error(
                "the folder holds files of the same names that gradpruner did not export (they would be overwritten)",
                f"{self.final}: {', '.join(clash)}",
                "move them away or pass another folder",
            )

    def commit(self, plan: _ShardPlan) -> None:
        """Index and marker, everything fsync-ed, then the folder (or its files) into place."""
        try:
            if plan.sharded:
                meta = {"total_parameters": plan.total_parameters, "total_size": plan.total_bytes}
                index = {"metadata": meta, "weight_map": plan.weight_map}
                (self.tmp / "model.safetensors.index.json").write_text(
                    json.dumps(index, indent=2, sort_keys=True) + "\n"
                )
            files = sorted(os.listdir(self.tmp))
            from gradpruner_ds import __version__

            marker = {"written_by": f"gradpruner_ds {__version__}", "files": files}
            for f in files:
                _fsync_file(self.tmp / f)
            part = self.tmp / f"{MARKER}.part"  # the marker appears whole (a leftover's marker is complete)
            part.write_text(json.dumps(marker, indent=2) + "\n")
            _fsync_file(part)
            os.rename(part, self.tmp / MARKER)
            _fsync_dir(self.tmp)
            if not self.final.exists():
                os.rename(self.tmp, self.final)  # a new folder: one rename
                self.staged = False
            elif self.previous is None:
                self._move_files_in(files)
            else:
                self._swap()
            _fsync_dir(self.parent)
        except OSError as exc:
            raise _os_error(exc, self.final) from None

    def _move_files_in(self, files: list[str]) -> None:
        """Into a folder without an export: the marker first, ``config.json`` last (without it nothing loads)."""
        order = (
            [MARKER]
            + [f for f in files if f != "config.json"]
            + (["config.json"] if "config.json" in files else [])
        )
        for f in order:
            os.rename(self.tmp / f, self.final / f)
        _fsync_dir(self.final)
        os.rmdir(self.tmp)
        self.staged = False

    def _swap(self) -> None:
        """Over a previous export: the user's entries move to the new folder, then one atomic exchange."""
        for entry in self.foreign:
            os.rename(self.final / entry, self.tmp / entry)
            self.moved.append(entry)
        os.chmod(self.tmp, stat.S_IMODE(os.stat(self.final).st_mode))
        if _exchange(self.tmp, self.final):
            self.moved = []  # the user's entries are in place again, in the new folder
            self.staged = False
            _discard(self.tmp)  # the previous export
            return
        old = self.parent / f".{self.name}.gradpruner-old-{os.getpid()}"  # no RENAME_EXCHANGE: two renames
        os.rename(self.final, old)
        os.rename(self.tmp, self.final)
        self.moved = []
        self.staged = False
        _discard(old)

    def abort(self) -> None:
        """After a failure before the commit: the user's entries back, the temporary folder removed."""
        if not self.staged:
            return
        for entry in reversed(self.moved):
            with contextlib.suppress(OSError):
                os.rename(self.tmp / entry, self.final / entry)
        self.moved = []
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.staged = False


def _discard(path: Path) -> None:
    """Remove the previous export after the commit; a failure is a warning (the new export is in place) and
    the next export removes what is left."""
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        log.warning("could not remove the previous export's files in %s; the next export removes them", path)


_TOKENIZER_FILE = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|chat_template\..*|vocab\..*|merges\.txt)$"
)


def _legacy_export(folder: Path) -> list[str] | None:
    """The files of an export that gradpruner_ds wrote before exports were marked, recognised by its file set:
    ``config.json``, an index whose metadata is only ``total_size``, and ``model-i-of-n.safetensors`` files
    each holding one decoder layer whole or one other tensor (the last may hold the buffers), plus the
    generation config and tokenizer files; None for anything else (a folder transformers wrote is never taken
    for one: it groups tensors up to the shard size and records ``total_parameters``)."""
    try:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        weight_map, meta = index["weight_map"], index["metadata"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if (
        not (folder / "config.json").is_file()
        or not isinstance(weight_map, dict)
        or meta.keys() != {"total_size"}
    ):
        return None
    files: dict[str, list[str]] = {}
    for tensor, fname in weight_map.items():
        files.setdefault(str(fname), []).append(str(tensor))
    n = len(files)
    shards = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    if sorted(files) != shards:
        return None
    layer = re.compile(r"^(.*\.layers\.\d+)\.")
    seen: set[str] = set()
    for fname in shards:
        prefixes = {(m[1] if (m := layer.match(t)) else "") for t in files[fname]}
        if len(prefixes) != 1:
            return None
        prefix = prefixes.pop()
        if (prefix and prefix in seen) or (not prefix and len(files[fname]) > 1 and fname != shards[-1]):
            return None  # a layer in two files, or several other tensors in one (not the buffers' last file)
        seen.add(prefix)
    if not seen - {""}:
        return None
    entries = os.listdir(folder)
    fixed = {"config.json", "generation_config.json", "model.safetensors.index.json", *shards}
    ours = [e for e in entries if e in fixed or _TOKENIZER_FILE.match(e)]
    if any(_MODEL_FILE.match(e) for e in entries if e not in ours) or not all(
        (folder / f).is_file() for f in shards
    ):
        return None
    return ours


def check_target(out_dir: str | Path) -> None:
    """The checks :func:`save_pretrained` makes of its folder before any work (not a folder, not writable, a mount
    point, a model or an edited marker that is not ours), for a caller that wants them before a long run
    (``launch/train.py`` calls it before training). ``gradpruner:`` errors; reads only."""
    _Export(out_dir, 0, dry=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


# ---------------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------------


def _factors(layer: Any) -> list[torch.Tensor]:
    """``A, B`` weights of every active adapter of ``layer`` (gathered together with its base weight)."""
    out = []
    for name in _active(layer):
        if getattr(layer, "use_dora", {}).get(name, False):
            raise user_error(
                "save_pretrained merges plain LoRA adapters only",
                f"DoRA adapter '{name}'",
                "merge it with peft",
            )
        out += [layer.lora_A[name].weight, layer.lora_B[name].weight]
    return out


def _active(layer: Any) -> list[str]:
    if getattr(layer, "merged", False):  # already merged into the base weight by the user
        return []
    active = layer.active_adapters if hasattr(layer, "active_adapters") else [layer.active_adapter]
    return [a for a in active if a in getattr(layer, "lora_A", {})]


@torch.no_grad()
def _delta(layer: Any, factors: Iterator[torch.Tensor]) -> torch.Tensor | None:
    """``sum over active adapters of scale * B @ A`` from the gathered (whole) factors, in fp32."""
    total = None
    for name in _active(layer):
        a, b = next(factors).float(), next(factors).float()
        d = (b @ a) * float(layer.scaling[name])
        if getattr(layer, "fan_in_fan_out", False):
            d = d.T
        total = d if total is None else total + d
    return total
