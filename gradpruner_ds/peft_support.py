"""Everything gradpruner-ds knows about peft (LoRA adapters), in one place: recognising a peft model, a LoRA layer's
base weight and factors, the adapters' configs that name decoder layers (renumbered by the surgery), which
adapters a rebuilt teacher can merge, and the names a peft model gives its base model's parameters.

Used by the architecture helpers (unwrapping), the surgery, the IGIA statistic (``mode: lora``), the repair
fold, the export (adapters merged into the written weights) and the sharded engines' teachers."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from gradpruner_ds.errors import user_error
from gradpruner_ds.log import get_logger

_log = get_logger("peft")

PEFT_NAME_FIELDS = ("target_modules", "exclude_modules")
"""peft config fields that hold module names which may spell out a layer index."""
PEFT_PATTERN_FIELDS = ("rank_pattern", "alpha_pattern")
"""peft config fields whose keys are module-name patterns."""


def is_peft_model(obj: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a hard dependency in practice
        return False
    return isinstance(obj, PeftModel)


def is_peft_tuner(obj: Any) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTuner
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, BaseTuner)


def is_peft(model: Any) -> bool:
    """True for a peft-wrapped model (it carries ``peft_config``)."""
    return hasattr(model, "peft_config")


def linear_weight(module: nn.Module) -> nn.Parameter:
    """The base (frozen) weight of a linear: ``weight`` of an nn.Linear or of a peft layer's base layer."""
    get_base_layer = getattr(module, "get_base_layer", None)
    base = get_base_layer() if callable(get_base_layer) else module
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise user_error(
            "module has no linear weight",
            type(module).__name__,
            "pass an nn.Linear or a peft LoRA layer wrapping one",
        )
    return weight  # type: ignore[return-value]


def lora_factors(module: nn.Module, adapter: str = "default") -> tuple[nn.Parameter, nn.Parameter] | None:
    """``(A.weight [r, d_in], B.weight [d_out, r])`` of ``adapter`` on a peft LoRA layer, else None."""
    lora_a = getattr(module, "lora_A", None)
    lora_b = getattr(module, "lora_B", None)
    if not isinstance(lora_a, nn.ModuleDict) or not isinstance(lora_b, nn.ModuleDict):
        return None
    if adapter not in lora_a or adapter not in lora_b:
        return None
    a_weight, b_weight = lora_a[adapter].weight, lora_b[adapter].weight
    if not isinstance(a_weight, torch.Tensor) or not isinstance(b_weight, torch.Tensor):
        return None
    return a_weight, b_weight  # type: ignore[return-value]


def peft_configs(chain: list[Any]) -> list[Any]:
    """Every peft adapter config held along a wrapper chain (``arch.wrapper_chain(model)``), deduplicated."""
    seen: dict[int, Any] = {}
    for obj in chain:
        configs = getattr(obj, "peft_config", None)
        if isinstance(configs, dict):
            for cfg in configs.values():
                seen.setdefault(id(cfg), cfg)
    return list(seen.values())


def _remap_name(name: str, regex: re.Pattern[str], new_index: dict[int, int]) -> str | None:
    """``name`` with explicit layer indices renumbered, or None when it names a removed layer."""
    dropped = False

    def sub(match: re.Match[str]) -> str:
        nonlocal dropped
        orig = int(match.group(2))
        if orig not in new_index:
            dropped = True
            return match.group(0)
        return match.group(0)[: match.start(2) - match.start(0)] + str(new_index[orig])

    out = regex.sub(sub, name)
    return None if dropped else out


def remap_peft_config(cfg: Any, regex: re.Pattern[str], new_index: dict[int, int]) -> None:
    ltt = getattr(cfg, "layers_to_transform", None)
    if ltt is not None:
        orig = [ltt] if isinstance(ltt, int) else list(ltt)
        remapped = [new_index[i] for i in orig if i in new_index]
        if not remapped:
            _log.warning(
                "peft layers_to_transform %s: every listed layer was removed; the adapter is now empty", orig
            )
        cfg.layers_to_transform = remapped
    for field in PEFT_PATTERN_FIELDS:
        patterns = getattr(cfg, field, None)
        if isinstance(patterns, dict) and patterns:
            new_patterns = {}
            for key, value in patterns.items():
                new_key = _remap_name(key, regex, new_index)
                if new_key is not None:
                    new_patterns[new_key] = value
            setattr(cfg, field, new_patterns)
    for field in PEFT_NAME_FIELDS:
        names = getattr(cfg, field, None)
        if isinstance(names, str):
            if regex.search(names):
                _log.warning(
                    "peft %s regex %r names explicit layer indices; it was not renumbered after layer removal",
                    field,
                    names,
                )
        elif isinstance(names, list | set | tuple) and any(
            isinstance(n, str) and regex.search(n) for n in names
        ):
            kept = [m for n in names if (m := _remap_name(n, regex, new_index)) is not None]
            setattr(cfg, field, type(names)(kept))


def teacher_refusal(model: nn.Module) -> str | None:
    """Why a sharded distillation teacher cannot be rebuilt for ``model`` (None: it can). Under FSDP2 and ZeRO-3
    the teacher is the base model's class built from its config, filled from each rank's own pieces; a peft
    model's plain LoRA adapters are merged into it (``W + scaling * B @ A``)."""
    if not is_peft(model):
        return (
            None
            if hasattr(model, "config")
            else "the teacher is rebuilt from the model's config; it has none"
        )
    for name, m in model.named_modules():
        if hasattr(m, "lora_A") and hasattr(m, "base_layer"):
            plain = type(m).__name__ == "Linear" and not getattr(m, "fan_in_fan_out", False)
            if not plain or any(getattr(m, "use_dora", {}).values()) or getattr(m, "lora_embedding_A", None):
                return f"the LoRA layer {name!r} ({type(m).__name__}) is not a plain LoRA Linear"
        if type(m).__name__ == "ModulesToSaveWrapper":
            return f"peft's modules_to_save ({name!r}) are not supported"
    return None


def teacher_name(name: str, peft: bool) -> str:
    """A student's parameter or module name -> the rebuilt teacher's (peft's prefix and ``base_layer`` gone)."""
    if peft:
        name = (
            "" if name in ("", "base_model", "base_model.model") else name.removeprefix("base_model.model.")
        )
    return name.replace(".base_layer.", ".").removesuffix(".base_layer")


def unmerged_lora_layers(
    model: nn.Module,
) -> Iterator[tuple[str, nn.Module, list[tuple[nn.Parameter, nn.Parameter, float]]]]:
    """Every peft LoRA layer of ``model`` whose adapters are not merged yet: its name, the layer, and per
    active adapter ``(A.weight, B.weight, scaling)`` (the delta is ``scaling * B @ A``)."""
    for name, m in model.named_modules():
        if not (hasattr(m, "lora_A") and hasattr(m, "base_layer")) or getattr(m, "merged", False):
            continue
        adapters = [
            (m.lora_A[a].weight, m.lora_B[a].weight, float(m.scaling[a]))
            for a in m.active_adapters
            if a in m.lora_A
        ]
        yield name, m, adapters
