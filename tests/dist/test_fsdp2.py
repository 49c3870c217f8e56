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
