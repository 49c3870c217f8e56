"""``save_pretrained`` from a ZeRO-3 engine on 2 real gloo ranks: a refused folder and non-finite weights are
the same ``gradpruner:`` error on every rank (rank 0's verdict is broadcast, no rank hangs in a gather), and
an export beside the user's files and over a previous export keeps the files and loads to the model's logits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers.ranks import run_ranks
from helpers.tiny import batches, tiny_llama
from helpers.training import ds_config
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.dist


def _zero3_exports(rank: int, world: int, root: str) -> dict:
    import deepspeed

    import gradpruner_ds

    model = tiny_llama(6)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(3, 2, 1, 1.0))
    out: dict = {}
    for case in ("foreign", "good"):
        try:
            gradpruner_ds.save_pretrained(engine, Path(root) / case, max_shard_size="50KB")
            out[case] = "written"
        except ValueError as exc:
            out[case] = str(exc)
    param = engine.module.model.layers[2].mlp.up_proj.weight
    with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
        if rank == 0:
            param.data[0, 0] = float("nan")
    try:
        gradpruner_ds.save_pretrained(engine, Path(root) / "nan")
        out["nan"] = "written"
    except ValueError as exc:
        out["nan"] = str(exc)
    return out


def test_zero3_export_refusals_reach_every_rank_and_user_files_are_kept(tmp_path):
    tiny_llama(4).save_pretrained(tmp_path / "foreign")  # someone else's model
    good = tmp_path / "good"
    good.mkdir()
    (good / "notes.txt").write_text("mine")
    import gradpruner_ds

    gradpruner_ds.save_pretrained(tiny_llama(3, seed=4), good)  # a previous export
    results = run_ranks(_zero3_exports, 2, str(tmp_path), timeout=300)
    for r in results:
        assert r["foreign"].startswith(
            "gradpruner: the folder holds a model that gradpruner did not export"
        ), r
        assert r["good"] == "written"
        assert r["nan"].startswith("gradpruner: the model's weights must be finite"), r
        assert "model.layers.2.mlp.up_proj.weight" in r["nan"]
    assert (good / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["foreign", "good"]  # nothing of "nan", no temporary folder
    tiny_llama(6).save_pretrained(tmp_path / "hf", max_shard_size="50KB")  # the ZeRO-3 export's split is this
    ours, hf = ((p / "model.safetensors.index.json").read_text() for p in (good, tmp_path / "hf"))
    assert ours == hf
    loaded = AutoModelForCausalLM.from_pretrained(good)
    ids = batches(1, seed=9)[0]["input_ids"]
    with torch.no_grad():
        expect = tiny_llama(6).eval()(input_ids=ids).logits
        torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, expect, rtol=1e-5, atol=1e-5)


def _fsdp2_export(rank: int, world: int, root: str) -> bool:
    from torch.distributed.fsdp import fully_shard

    import gradpruner_ds

    model = tiny_llama(6)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    gradpruner_ds.save_pretrained(model, Path(root) / "final", max_shard_size="50KB")  # several shards
    ids = batches(1, seed=9)[0]["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    if rank == 0:
        loaded = AutoModelForCausalLM.from_pretrained(Path(root) / "final")
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)
    return True


def test_fsdp2_export_is_planned_from_the_global_shapes(tmp_path):
    """FSDP2's DTensor parameters: the shards are planned from the global shapes (each rank holds rows) and
    the same split as transformers' save_pretrained of the whole model."""
    import json

    assert run_ranks(_fsdp2_export, 2, str(tmp_path), timeout=300) == [True, True]
    tiny_llama(6).save_pretrained(tmp_path / "hf", max_shard_size="50KB")
    ours, hf = (
        json.loads((tmp_path / d / "model.safetensors.index.json").read_text()) for d in ("final", "hf")
    )
    assert ours == hf
