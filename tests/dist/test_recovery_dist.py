"""In-job recovery (self-distillation from the pre-prune model) on real gloo ranks: the teacher is laid out
like the student (whole under ZeRO-1/2, each rank's shards under FSDP2) and the run equals the
single-process run of the same computation (plan, merge, every loss, the distillation steps included),
with and without peft LoRA adapters."""

from __future__ import annotations

import functools

import pytest
from helpers.ranks import run_ranks
from helpers.training import deepspeed_run, fsdp2_run, single_process_run
from test_deepspeed import BLOCK, CLIP, GAS, MICRO, STEPS, assert_matches

pytestmark = pytest.mark.dist

KD = {**BLOCK, "recovery": {"distill_steps": 4, "temperature": 2.0, "weight": 0.5}}
_ref: list[dict] = []


def reference() -> dict:
    if not _ref:
        _ref.append(single_process_run(KD, STEPS, 2, MICRO, GAS, CLIP))
        plain = single_process_run(BLOCK, STEPS, 2, MICRO, GAS, CLIP)
        window = BLOCK["window_steps"]
        # the distillation term changes the losses of the steps after the prune, and only those
        assert _ref[0]["losses"][:window] == pytest.approx(plain["losses"][:window], abs=1e-7)
        assert _ref[0]["losses"][window] != pytest.approx(plain["losses"][window], abs=1e-4)
    return _ref[0]


def test_recovery_under_fsdp2_equals_single_process():
    assert_matches(reference(), run_ranks(fsdp2_run, 2, KD, STEPS, MICRO, GAS, CLIP))


@pytest.mark.parametrize("stage", [1, 2])
def test_recovery_under_zero12_equals_single_process(stage):
    assert_matches(reference(), run_ranks(deepspeed_run, 2, KD, STEPS, stage, MICRO, GAS, CLIP))


def test_recovery_under_zero3_equals_single_process():
    """ZeRO-3: the teacher keeps each rank's slice of every parameter and gathers one layer at a time in its
    forward (``Zero3Teacher``); the run equals one process."""
    assert_matches(reference(), run_ranks(deepspeed_run, 2, KD, STEPS, 3, MICRO, GAS, CLIP))


_lora_ref: list[dict] = []


def lora_reference() -> dict:
    """The single-process run of a peft LoRA model with the recovery block (its teacher: a copy of the peft
    model); the term is there (the first step after the prune differs from the run without it)."""
    if not _lora_ref:
        _lora_ref.append(single_process_run(KD, STEPS, 2, MICRO, GAS, CLIP, lora=True))
        plain = single_process_run(BLOCK, STEPS, 2, MICRO, GAS, CLIP, lora=True)
        window = BLOCK["window_steps"]
        assert _lora_ref[0]["losses"][window] != pytest.approx(plain["losses"][window], abs=1e-4)
    return _lora_ref[0]


def test_recovery_under_fsdp2_with_peft_lora_equals_single_process():
    """A peft LoRA model under FSDP2: the teacher is the base class rebuilt and sharded like the student with
    the adapters merged in on each rank's rows (W + scaling * B @ A); the run equals one process."""
    assert_matches(lora_reference(), run_ranks(fsdp2_run, 2, KD, STEPS, MICRO, GAS, CLIP, 6, True))


@pytest.mark.parametrize("stage", [2, 3])
def test_recovery_with_peft_lora_under_deepspeed_equals_single_process(stage):
    """A peft LoRA model under ZeRO-2 (the teacher: a whole copy of the peft model) and ZeRO-3 (the base class
    rebuilt, each rank's slices with the adapters merged into them, gathered one layer at a time): the run
    equals one process."""
    assert_matches(lora_reference(), run_ranks(deepspeed_run, 2, KD, STEPS, stage, MICRO, GAS, CLIP, 6, True))


def test_recovery_with_peft_default_lora_under_zero3_equals_single_process():
    """peft's default ``LoraConfig()`` (r=8 on q_proj and v_proj only; the merge needs every linear's IGIA, so
    ``num_merge`` 0, as the product's error asks) under ZeRO-3 with the attention matrices kept whole
    (persistence threshold 2000: q/k/v/o persistent, the MLP partitioned). The teacher merges the adapters
    into the slices it holds of the persistent and partitioned weights alike; every loss equals one
    process."""
    kd, plain = {**KD, "num_merge": 0}, {**BLOCK, "num_merge": 0}
    ref = single_process_run(kd, STEPS, 2, MICRO, GAS, CLIP, 6, "default")
    without = single_process_run(plain, STEPS, 2, MICRO, GAS, CLIP, 6, "default")
    window = BLOCK["window_steps"]
    assert ref["losses"][window] != pytest.approx(without["losses"][window], abs=1e-4)
    run = functools.partial(deepspeed_run, lora="default", persist=2000)
    assert_matches(ref, run_ranks(run, 2, kd, STEPS, 3, MICRO, GAS, CLIP))


def _fsdp2_distill(rank: int, world: int, ck: str, phase: str) -> dict:
    """FSDP2 on 2 ranks with recovery: "full" runs window + distillation + plain steps; "save" stops two steps
    into the distillation and writes the model and optimizer (torch DCP) and GradPruner's state (the plan and
    each rank's teacher shards); "resume" starts new from the dense model and those files."""
    import torch
    import torch.distributed.checkpoint as dcp
    from helpers.training import LR, fsdp2_step, global_batches, make_model
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    from gradpruner_ds.backends.fsdp2 import FSDP2Backend
    from gradpruner_ds.checkpoint import load_pruner_state, save_pruner_state
    from gradpruner_ds.config import GradPrunerConfig
    from gradpruner_ds.pruner import GradPruner

    model = make_model(6, False)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    cfg = GradPrunerConfig.from_dict(KD)
    pruner = GradPruner(model, cfg, total_steps=STEPS, backend=FSDP2Backend(model))
    window = KD["window_steps"]
    stop = window + 2
    start = 0
    if phase == "resume":
        plan = load_pruner_state(pruner, f"{ck}/gradpruner")
        assert plan is not None and pruner.distiller is not None and pruner.distiller.steps_done == 2
        opt, _ = pruner.replay(plan, opt)
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=f"{ck}/dcp")
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start = stop
    losses = []
    for step, micro_batches in enumerate(global_batches(STEPS, world, MICRO, GAS)):
        if step < start:
            continue
        loss, opt, _, _ = fsdp2_step(model, pruner, opt, None, micro_batches, rank, world, MICRO, GAS, CLIP)
        losses.append(loss)
        if phase == "save" and step + 1 == stop:
            model_sd, optim_sd = get_state_dict(model, opt)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=f"{ck}/dcp")
            save_pruner_state(pruner, f"{ck}/gradpruner")
            break
    return {"losses": losses, "distilling": pruner.distiller is not None and pruner.distiller.active}


def test_fsdp2_resume_during_the_distillation_gives_the_uninterrupted_losses(tmp_path):
    full = run_ranks(_fsdp2_distill, 2, str(tmp_path / "unused"), "full")
    saved = run_ranks(_fsdp2_distill, 2, str(tmp_path / "ck"), "save")
    resumed = run_ranks(_fsdp2_distill, 2, str(tmp_path / "ck"), "resume")
    stop = KD["window_steps"] + 2
    for f, s, r in zip(full, saved, resumed, strict=True):
        assert s["losses"] == pytest.approx(f["losses"][:stop], abs=1e-6)
        assert r["losses"] == pytest.approx(f["losses"][stop:], abs=1e-5)  # distillation steps 3, 4, then plain
        assert not r["distilling"]


def test_zero3_resume_during_the_distillation_gives_the_uninterrupted_losses(tmp_path):
    """ZeRO-3, saved two steps into the distillation (each rank's teacher slices in GradPruner's state) and
    resumed in new processes: the remaining losses, distilled and plain, are the uninterrupted run's."""
    full = run_ranks(deepspeed_run, 2, KD, STEPS, 3, MICRO, GAS, CLIP)
    ck, stop = str(tmp_path / "ckpt"), KD["window_steps"] + 2
    first = run_ranks(deepspeed_run, 2, KD, STEPS, 3, MICRO, GAS, CLIP, 6, False, False, False, ck, stop)
    second = run_ranks(deepspeed_run, 2, KD, STEPS, 3, MICRO, GAS, CLIP, 6, False, False, False, ck, None, True)
    for a, b, c in zip(full, first, second, strict=True):
        assert len(b["losses"]) == stop
        assert b["losses"] + c["losses"] == pytest.approx(a["losses"], abs=1e-6)
