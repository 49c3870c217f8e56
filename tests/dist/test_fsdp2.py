"""FSDP2 (fully_shard) on real gloo ranks, checked against the single-process result of the same
computation; and one plan for every engine."""

from __future__ import annotations

import pytest
from helpers.ranks import run_ranks
from helpers.training import deepspeed_run, fsdp2_run, single_process_run
from test_deepspeed import BLOCK, CLIP, GAS, MICRO, STEPS, assert_matches, reference

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("lora", [False, True])
def test_fsdp2_world2_equals_single_process(lora):
    results = run_ranks(fsdp2_run, 2, BLOCK, STEPS, MICRO, GAS, CLIP, 6, lora)
    assert_matches(reference(2, lora=lora), results)
    window = BLOCK["window_steps"]
    for r in results:  # observation: one small all-reduce per step (+1 assembling LoRA factor grads)
        for calls in r["observe_calls"][:window]:
            assert [c[0] for c in calls] == ["all_reduce"] * (2 if lora else 1)
        assert r["observe_calls"][window:] == [[]] * (STEPS - window)


def test_fsdp2_world4_equals_single_process_and_memory_falls():
    results = run_ranks(fsdp2_run, 4, BLOCK, STEPS, 1, GAS, CLIP, 6, False, False, True, timeout=300)
    assert_matches(single_process_run(BLOCK, STEPS, 4, 1, GAS, CLIP), results)
    for r in results:
        assert r["bytes_after"] < 0.62 * r["bytes_before"], (r["bytes_before"], r["bytes_after"])


def test_fsdp2_bf16_mixed_precision_runs_with_the_same_plan():
    results = run_ranks(fsdp2_run, 2, BLOCK, STEPS, MICRO, GAS, CLIP, 6, False, True)
    ref = reference(2)
    for r in results:
        for k in ("dropped", "merged", "targets"):
            assert r["plan"][k] == ref["plan"][k]
        assert all(x == x and x < 10 for x in r["losses"])


def test_one_plan_for_every_engine():
    """Same tiny model, data and seed: one process, ZeRO-1/2/3 and FSDP2 make the same plan."""
    plans = {"single": reference(2)["plan"]}
    for stage in (1, 2, 3):
        plans[f"zero{stage}"] = run_ranks(deepspeed_run, 2, BLOCK, STEPS, stage, MICRO, GAS, CLIP)[0]["plan"]
    plans["fsdp2"] = run_ranks(fsdp2_run, 2, BLOCK, STEPS, MICRO, GAS, CLIP)[0]["plan"]
    keys = ("dropped", "merged", "targets", "num_layers", "criterion", "config_digest")
    first = {k: plans["single"][k] for k in keys}
    for name, plan in plans.items():
        assert {k: plan[k] for k in keys} == first, name


def _fsdp2_window(rank: int, world: int, block: dict, ck: str, phase: str) -> dict:
    """FSDP2 on 2 ranks through the 3-step window: "full" runs it whole; "save" stops after 2 steps and
    writes the model and optimizer (torch DCP) and GradPruner's state; "resume" starts new from those."""
    import torch
    import torch.distributed.checkpoint as dcp
    from helpers.training import LR, global_batches, make_model
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
    window = block["window_steps"]
    pruner = GradPruner(
        model, GradPrunerConfig.from_dict(block), total_steps=window + 1, backend=FSDP2Backend(model)
    )
    start = 0
    if phase == "resume":
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=f"{ck}/dcp")
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        assert load_pruner_state(pruner, f"{ck}/gradpruner") is None
        start = pruner.steps_seen
    for step, micro_batches in enumerate(global_batches(window, world, MICRO, GAS)):
        if step < start:
            continue
        for b in micro_batches:
            mine = {k: v[rank * MICRO : (rank + 1) * MICRO] for k, v in b.items()}
            (model(**mine).loss / GAS).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        pruner.observe()
        opt.step()
        opt.zero_grad()
        if phase == "save" and step + 1 == 2:
            model_sd, optim_sd = get_state_dict(model, opt)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=f"{ck}/dcp")
            save_pruner_state(pruner, f"{ck}/gradpruner")
            return {}
    plan = pruner.make_plan()
    return {"scores": list(plan.scores), "dropped": list(plan.dropped)}


@pytest.mark.parametrize("criterion", ["shortgpt_bi", "igia_sum"])
def test_fsdp2_resume_inside_the_window_gives_the_uninterrupted_plan(tmp_path, criterion):
    block = {**BLOCK, "criterion": criterion, "num_drop": 2, "num_merge": 0}
    full = run_ranks(_fsdp2_window, 2, block, str(tmp_path / "unused"), "full")
    run_ranks(_fsdp2_window, 2, block, str(tmp_path / "ck"), "save")
    resumed = run_ranks(_fsdp2_window, 2, block, str(tmp_path / "ck"), "resume")
    for a, b in zip(full, resumed, strict=True):
        assert b["scores"] == pytest.approx(a["scores"], rel=1e-6)
        assert b["dropped"] == a["dropped"]


def _every_criterion(rank: int, world: int, engine: str, ck: str) -> dict:
    """For every registered criterion, in these ranks: the uninterrupted window, a run that saves after 2 of
    its 3 steps, and a resume from those files into new objects (new model, engine and pruner)."""
    from helpers.training import deepspeed_run

    from gradpruner_ds.core.criteria import CRITERIA

    out = {}
    for criterion in sorted(set(CRITERIA) - {"given"}):  # 'given' is a plan by hand: layers_to_remove
        block = {**BLOCK, "criterion": criterion, "num_drop": 2, "num_merge": 0}
        folder = f"{ck}/{criterion}"
        if engine == "fsdp2":
            full = _fsdp2_window(rank, world, block, folder, "full")
            _fsdp2_window(rank, world, block, folder, "save")
            resumed = _fsdp2_window(rank, world, block, folder, "resume")
        else:
            args = (rank, world, block, STEPS, 3, MICRO, GAS, CLIP, 6, False, False, False, folder)
            full = deepspeed_run(*args[:8])
            deepspeed_run(*args, 2)
            resumed = deepspeed_run(*args, None, True)
        out[criterion] = (full, resumed)
    return out


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_resume_inside_the_window_for_every_criterion(tmp_path, engine):
    """Every registered criterion, ZeRO-3 and FSDP2 on 2 ranks: each rank's statistics are saved inside the
    window and restored into new objects; the scores and plan equal the uninterrupted run's."""
    from gradpruner_ds.core.criteria import CRITERIA

    results = run_ranks(_every_criterion, 2, engine, str(tmp_path), timeout=600)
    for per_rank in results:
        assert set(per_rank) == set(CRITERIA) - {"given"}
        for criterion, (full, resumed) in per_rank.items():
            assert resumed["scores"] == pytest.approx(full["scores"], rel=1e-6), criterion
            assert _dropped(resumed) == _dropped(full), criterion


def _dropped(result: dict) -> list[int]:
    return result["plan"]["dropped"] if "plan" in result else result["dropped"]
