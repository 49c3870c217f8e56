"""Save the (pruned) model as a checkpoint that ``AutoModelForCausalLM.from_pretrained`` loads, from
whatever holds it in the training job: a plain HF model, a peft-wrapped one, a DeepSpeed engine (ZeRO-1/2/3)
or an FSDP2-sharded model.

* One shard per decoder layer plus one per remaining tensor (embeddings, final norm, untied head), with
  ``model.safetensors.index.json``; tied parameters are written once, like ``save_pretrained``.
* Sharded engines are gathered one unit at a time (the engine's own gather: ZeRO-3's
  ``GatheredParameters``, FSDP2's ``full_tensor``), so at most one layer is held in full at once. This is a
  collective: every rank calls it; rank 0 writes.
* peft LoRA: the adapters are merged into the written weights (``W + scale * B @ A`` per active adapter,
  computed for the copy that is written; the training model is not changed), so the folder is the complete
  pruned model with the fine-tuning in it.
* The folder appears atomically: written into a temporary sibling, renamed over ``out_dir`` at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradpruner_ds.backends import Gather, holder_of

_PEFT_NAME = re.compile(r"\.(base_layer|modules_to_save\.[^.]+)\.")


def _holder(obj: Any) -> tuple[nn.Module, int, Gather]:
    """The module that holds the weights, this process's rank, and how to gather a unit in full."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    module, gather = holder_of(obj)
    return module, rank, gather


def _unit_tensors(module: nn.Module, prefix: str, names: dict[int, str]) -> list[tuple[str, nn.Module, str]]:
    """``(name in the checkpoint, owning module, attribute)`` of each parameter under ``module`` that the
    checkpoint holds (LoRA factors and peft's original copies left out)."""
    out = []
    for sub_name, sub in module.named_modules(prefix=prefix):
        for attr, p in sub.named_parameters(recurse=False):
            full = f"{sub_name}.{attr}" if sub_name else attr
            if id(p) not in names or ".lora_" in full or ".original_module." in full:
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


def save_pretrained(model: Any, out_dir: str | Path, tokenizer: Any = None) -> Path:
    """Write ``model`` (an HF CausalLM, peft-wrapped, a DeepSpeed engine or FSDP2-sharded) + its config (and
    ``tokenizer``) to ``out_dir``; ``from_pretrained(out_dir)`` gives the same logits. Call on every rank."""
    from safetensors.torch import save_file

    from gradpruner_ds.arch import decoder_layers, unwrap_model

    holder, rank, gather = _holder(model)
    hf = unwrap_model(holder)
    lora = _lora_parents(hf)
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

    dtype = next(hf.parameters()).dtype
    final_dir = Path(out_dir)
    tmp_dir = final_dir.with_name(f".{final_dir.name}.tmp-{os.getpid()}")
    if rank == 0:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    total_bytes = 0
    count = len(units) + (1 if buffers else 0)
    for i, unit in enumerate(units):
        params = [getattr(m, a) for _, m, a in unit]
        adapted = [lora.get(id(p)) for p in params]
        extra = [t for layer in adapted if layer is not None for t in _factors(layer)]
        with gather(params + extra) as full:
            shard = {}
            factors = iter(full[len(params) :])
            for (name, _, _), value, layer in zip(unit, full, adapted, strict=False):
                delta = _delta(layer, factors) if layer is not None else None
                if rank == 0:
                    value = value.detach() if delta is None else value.detach() + delta.to(value.dtype)
                    shard[name] = value.to("cpu").contiguous().clone()
        if rank == 0:
            fname = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            save_file(shard, str(tmp_dir / fname), metadata={"format": "pt"})
            for n, t in shard.items():
                weight_map[n] = fname
                total_bytes += t.numel() * t.element_size()
    if rank == 0:
        if buffers:
            fname = f"model-{count:05d}-of-{count:05d}.safetensors"
            save_file({n: b.detach().cpu().contiguous() for n, b in buffers.items()}, str(tmp_dir / fname))
            weight_map.update({n: fname for n in buffers})
        index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        hf.config.dtype = dtype
        hf.config.save_pretrained(tmp_dir)
        if getattr(hf, "generation_config", None) is not None:
            with contextlib.suppress(Exception):  # optional extra; never fail the run on it
                hf.generation_config.save_pretrained(tmp_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp_dir)
        old = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
        if final_dir.exists():
            os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    return final_dir


def _factors(layer: Any) -> list[torch.Tensor]:
    """``A, B`` weights of every active adapter of ``layer`` (gathered together with its base weight)."""
    out = []
    for name in _active(layer):
        if getattr(layer, "use_dora", {}).get(name, False):
            from gradpruner_ds.errors import user_error

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
