"""The cluster-scale cost model against what real gloo ranks do, and the 70B dry run."""

from __future__ import annotations

import pytest
from helpers.ranks import run_ranks
from helpers.tiny import tiny_llama_config
from helpers.training import deepspeed_run
from test_deepspeed import BLOCK, CLIP, GAS, STEPS

from gradpruner_ds.cli import main as cli_main
from gradpruner_ds.config import GradPrunerConfig
from gradpruner_ds.scale import KNOWN, dry_run

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("world", [2, 4])
def test_cost_model_predicts_what_zero3_ranks_measure(world):
    micro = 2 if world == 2 else 1
    measured = run_ranks(deepspeed_run, world, BLOCK, STEPS, 3, micro, GAS, CLIP, 6, False, False, True, timeout=300)
    cfg = tiny_llama_config(6).to_dict()
    plan = measured[0]["plan"]
    scores = plan["scores"]
    pred = dry_run(cfg, GradPrunerConfig.from_dict(BLOCK), world_size=world, scores=scores)
    assert pred.removed == sorted(plan["dropped"] + plan["merged"])
    for r in measured:
        # IGIA state: one fp32 value per local gradient element of the observed matrices
        assert r["igia_bytes"] == pytest.approx(pred.igia_bytes_per_rank, rel=0.2)
        obs = [c for c in r["observe_calls"] if c]
        assert all(len(c) == pred.observe_collectives_per_step for c in obs)
        assert all(sum(b for _, b in c) == pred.observe_bytes_per_step for c in obs)
        (plan_calls,) = r["plan_calls"]
        assert len(plan_calls) == pred.ranking_collectives
        assert sum(b for _, b in plan_calls) == pytest.approx(pred.ranking_bytes, rel=0.2)
        (merge_calls,) = r["merge_calls"]
        assert len(merge_calls) == pred.merge_collectives
        assert sum(b for _, b in merge_calls) == pred.merge_bytes
        assert r["partition_numel_after"] == pytest.approx(pred.partition_numel_after, rel=0.2)


def test_70b_dry_run_on_the_meta_device(capsys):
    d = dry_run(KNOWN["llama-3.1-70b"], GradPrunerConfig.from_dict({"window_steps": 40, "prune_ratio": 0.4, "num_merge": 3}), world_size=64)
    assert d.num_layers == 80 and len(d.removed) == 32 and len(d.merged) == 3
    assert 70e9 < d.params_before < 71e9 and d.params_after < 0.65 * d.params_before
    # full mode: one fp32 per local gradient element of the 7 linears of 80 layers, over 64 ranks
    assert 3.5 * 2**30 < d.igia_bytes_per_rank < 4.5 * 2**30
    lora = dry_run(KNOWN["llama-3.1-70b"], GradPrunerConfig.from_dict({"window_steps": 40, "prune_ratio": 0.4}), world_size=512, mode="lora")
    assert lora.igia_bytes_per_rank < d.igia_bytes_per_rank
    # the default criterion without a merge reads no gradients: no IGIA state at all
    default = dry_run(KNOWN["llama-3.1-70b"], GradPrunerConfig.from_dict({"window_steps": 40, "prune_ratio": 0.4}), world_size=64)
    assert default.igia_bytes_per_rank == 0 and default.observe_bytes_per_step == 8
    assert cli_main(["plan", "--model-config", "llama-3.1-70b", "--world-size", "256"]) == 0
    assert "IGIA state per rank" in capsys.readouterr().out


def test_the_dry_run_counts_the_recovery_teacher_that_zero3_ranks_hold():
    """With a ``recovery`` block the plan counts the teacher: each rank's ZeRO-3 shard of a frozen copy of the
    pre-prune weights (what 2 real ZeRO-3 ranks hold), and the whole copy of one process."""
    from helpers.training import single_process_run
    from test_deepspeed import MICRO

    block = {**BLOCK, "recovery": {"distill_steps": 2}}
    cfg = {**tiny_llama_config(6).to_dict(), "dtype": "float32"}
    pred = dry_run(cfg, GradPrunerConfig.from_dict(block), world_size=2)
    assert pred.teacher_steps == 2 and pred.weight_dtype == "float32"
    ranks = run_ranks(deepspeed_run, 2, block, STEPS, 3, MICRO, GAS, CLIP, timeout=300)
    for r in ranks:
        assert r["recovery"]["teacher_bytes"] == pytest.approx(pred.teacher_bytes_per_rank, rel=0.02)
    whole = single_process_run(block, STEPS, 2, MICRO, GAS, CLIP)
    assert whole["recovery"]["teacher_bytes"] == pred.teacher_bytes_whole
    assert dry_run(cfg, GradPrunerConfig.from_dict(BLOCK), world_size=2).teacher_bytes_per_rank == 0
