"""PyTorch DDP on real gloo ranks: GradPruner picks the DDP adapter from the wrapped model; IGIA from each
rank's slice of the averaged gradients (no second reduction), hidden-state sums over each rank's own rows;
after the prune the user's DDP object is the new wrapper over the pruned module and training goes on; the plan,
every loss and the saved model equal the single-process run."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers.ranks import run_ranks
from helpers.training import ddp_run, single_process_run
from test_deepspeed import BLOCK, CLIP, GAS, MICRO, STEPS, assert_matches

pytestmark = pytest.mark.dist

DEFAULT = {"window_steps": 3, "num_drop": 2, "progress_bar": False}


@pytest.mark.parametrize("block", [BLOCK, DEFAULT], ids=["igia_sum+merge", "shortgpt_bi"])
def test_ddp_equals_single_process(block, tmp_path):
    ref = single_process_run(block, STEPS, 2, MICRO, GAS, CLIP)
    results = run_ranks(functools.partial(ddp_run, save_dir=str(tmp_path / "final")), 2, block, STEPS, MICRO, GAS, CLIP)
    assert all(r["backend"] == "DDPBackend" for r in results)
    if block is BLOCK:
        assert_matches(ref, results)
    else:
        for r in results:
            assert r["plan"]["dropped"] == ref["plan"]["dropped"]
            assert r["scores"] == pytest.approx(ref["scores"], rel=1e-5)
            assert r["losses"] == pytest.approx(ref["losses"], abs=1e-5)
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert saved.config.num_hidden_layers == 6 - len(ref["plan"]["dropped"]) - len(ref["plan"]["merged"])


def test_ddp_with_peft_lora_equals_single_process():
    ref = single_process_run(BLOCK, STEPS, 2, MICRO, GAS, CLIP, lora=True)
    assert_matches(ref, run_ranks(ddp_run, 2, BLOCK, STEPS, MICRO, GAS, CLIP, 6, True))


def _unwrapped(rank: int, world: int) -> str:
    from gradpruner_ds.config import GradPrunerConfig
    from gradpruner_ds.pruner import GradPruner
    from helpers.tiny import tiny_llama

    try:
        GradPruner(tiny_llama(4), GradPrunerConfig.from_dict(DEFAULT))
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_a_model_not_wrapped_in_a_multi_process_job_is_refused_on_every_rank():
    for msg in run_ranks(_unwrapped, 2):
        assert msg.startswith("gradpruner: this job has several processes but the model is not wrapped"), msg
