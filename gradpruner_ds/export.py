"""Export a (pruned, possibly ZeRO-3-sharded) model as an HF checkpoint, one layer at a time."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any


def save_pretrained_layerwise(
    model: Any, out_dir: str | Path, tokenizer: Any = None, *, rank: int = 0, zero3: bool = False
) -> None:
    """Write ``model`` (+ config, tokenizer) as sharded safetensors that ``from_pretrained`` loads.

    One shard per decoder layer plus one per remaining tensor (embeddings, final norm, untied head),
    with ``model.safetensors.index.json``. Under ZeRO-3 each unit is gathered with
    ``deepspeed.zero.GatheredParameters`` (collective: every rank must call this) and only rank 0
    copies it out, so at most one layer (or the embedding) is held in full at a time. Tied parameters
    are written once, like ``save_pretrained``. The folder appears atomically: everything is written
    into a temporary sibling folder that is renamed over ``out_dir`` at the end.
    """
    import torch
    from safetensors.torch import save_file

    from gradpruner_ds.arch import decoder_layers, unwrap_model

    hf = unwrap_model(model)
    names = {id(p): n for n, p in hf.named_parameters()}  # de-duplicated: tied weights appear once
    persistent = set(hf.state_dict().keys())
    units: list[list[tuple[str, torch.Tensor]]] = []
    in_layers: set[int] = set()
    for layer in decoder_layers(hf):
        unit: list[tuple[str, torch.Tensor]] = [
            (names[id(p)], p) for p in layer.parameters() if id(p) in names
        ]
        in_layers.update(id(p) for _, p in unit)
        units.append(unit)
    rest: list[tuple[str, torch.Tensor]] = [
        (n, p) for n, p in hf.named_parameters() if id(p) not in in_layers
    ]
    units = [[item] for item in rest[:1]] + units + [[item] for item in rest[1:]]
    buffers = [(n, b) for n, b in hf.named_buffers() if n in persistent]
    if buffers:
        units.append(buffers)

    dtype = next(hf.parameters()).dtype
    final_dir = Path(out_dir)
    out_dir = final_dir.with_name(f".{final_dir.name}.tmp-{os.getpid()}")
    if rank == 0:
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    total_bytes = 0
    for i, unit in enumerate(units):
        tensors = [t for _, t in unit]
        ctx: Any = contextlib.nullcontext()
        if zero3:
            import deepspeed

            ctx = deepspeed.zero.GatheredParameters(tensors, modifier_rank=None)
        with ctx:
            if rank == 0:
                shard = {n: t.detach().to("cpu").contiguous().clone() for n, t in unit}
        if rank == 0:
            fname = f"model-{i + 1:05d}-of-{len(units):05d}.safetensors"
            save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
            for n, t in shard.items():
                weight_map[n] = fname
                total_bytes += t.numel() * t.element_size()
            del shard
    if rank == 0:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        hf.config.dtype = dtype
        hf.config.save_pretrained(out_dir)
        if getattr(hf, "generation_config", None) is not None:
            with contextlib.suppress(Exception):  # optional extra; never fail the run on it
                hf.generation_config.save_pretrained(out_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
        old = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
        if final_dir.exists():
            os.replace(final_dir, old)
        os.replace(out_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
