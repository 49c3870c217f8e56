"""The least-squares repair (``repair``) on real gloo ranks: statistics from each rank's own micro-batches (one
all-reduce), the maps solved on every rank, the fold through each engine (ZeRO-1/2/3, FSDP2), with and
without peft LoRA; the plan, the fit, every loss and the saved sums equal the single-process run; a resume
inside the repair phase under ZeRO-3 equals the uninterrupted run."""

from __future__ import annotations

import functools

import pytest
from helpers.ranks import run_ranks
from helpers.training import deepspeed_run, fsdp2_run, single_process_run
from test_deepspeed import CLIP, GAS, MICRO

pytestmark = pytest.mark.dist

BLOCK = {
    "window_steps": 2,
    "layers_to_remove": [2, 3, 5],  # runs 2-3 (folded into 1) and 5 (folded into 4)
    "progress_bar": False,
    "repair": {"steps": 2, "ridge": 1e-3},
}
STEPS = 8
_refs: dict[bool, dict] = {}


def reference(lora: bool = False) -> dict:
    if lora not in _refs:
        _refs[lora] = single_process_run(BLOCK, STEPS, 2, MICRO, GAS, CLIP, num_layers=7, lora=lora)
        plain = single_process_run({**BLOCK, "repair": None}, STEPS, 2, MICRO, GAS, CLIP, num_layers=7, lora=lora)
        after = BLOCK["window_steps"] + BLOCK["repair"]["steps"]  # the first step of the repaired model
        assert _refs[lora]["losses"][after] != pytest.approx(plain["losses"][after], abs=1e-4)
    return _refs[lora]


def assert_matches(ref: dict, results: list[dict]) -> None:
    for r in results:
        assert r["plan"]["dropped"] == ref["plan"]["dropped"]
        assert r["losses"] == pytest.approx(ref["losses"], abs=1e-5)
        rep, ref_rep = r["repair"], ref["repair"]
        assert rep["maps_digest"] and len(rep["runs"]) == 2
        for got, want in zip(rep["runs"], ref_rep["runs"], strict=True):
            assert got["tokens"] == want["tokens"]
            assert got["folded_into"] == want["folded_into"]
            for k in ("residual_plain", "residual_repaired"):
                assert got[k] == pytest.approx(want[k], rel=1e-6), k


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_repair_under_deepspeed_equals_single_process(stage):
    results = run_ranks(deepspeed_run, 2, BLOCK, STEPS, stage, MICRO, GAS, CLIP, 7)
    assert_matches(reference(), results)
    # the fold moved only the two folded matrices: at most their fp32 size on each rank (O(d x d_ff))
    d, d_ff = 32, 64
    assert 0 < results[0]["repair"]["bytes_moved"] <= 2 * d * d_ff * 4


def test_repair_under_fsdp2_equals_single_process():
    assert_matches(reference(), run_ranks(fsdp2_run, 2, BLOCK, STEPS, MICRO, GAS, CLIP, 7))


@pytest.mark.parametrize("stage", [2, 3])
def test_repair_with_peft_lora_under_deepspeed_equals_single_process(stage):
    """peft LoRA on every linear: the fold goes into the frozen base down_proj and its trainable B factor."""
    assert_matches(reference(lora=True), run_ranks(deepspeed_run, 2, BLOCK, STEPS, stage, MICRO, GAS, CLIP, 7, True))


def test_repair_with_peft_lora_under_fsdp2_equals_single_process():
    assert_matches(reference(lora=True), run_ranks(fsdp2_run, 2, BLOCK, STEPS, MICRO, GAS, CLIP, 7, True))


def test_zero3_resume_inside_the_repair_phase_equals_the_uninterrupted_run(tmp_path):
    save_at = BLOCK["window_steps"] + 1  # the plan is made, one of the two repair steps is done
    run = functools.partial(deepspeed_run, num_layers=7, ckpt_dir=str(tmp_path))
    first = run_ranks(functools.partial(run, save_at=save_at), 2, BLOCK, STEPS, 3, MICRO, GAS, CLIP)
    assert (tmp_path / "global_step3" / "gradpruner" / "stats_rank1.safetensors").exists()
    rest = run_ranks(functools.partial(run, resume=True), 2, BLOCK, STEPS, 3, MICRO, GAS, CLIP)
    ref = reference()
    for a, b in zip(first, rest, strict=True):
        assert a["losses"] + b["losses"] == pytest.approx(ref["losses"], abs=1e-5)
        assert b["repair"]["runs"][0]["tokens"] == ref["repair"]["runs"][0]["tokens"]


@pytest.mark.parametrize("save_at", [3, 5])  # inside the repair phase, after the cut
def test_fsdp2_resume_from_an_engine_neutral_checkpoint_equals_the_uninterrupted_run(tmp_path, save_at):
    """``gradpruner_ds.save_checkpoint`` / ``load_checkpoint`` on an FSDP2 loop: each rank's shards of the weights
    and of the optimizer state, the scheduler and GradPruner's state; the resumed run equals one process."""
    run = functools.partial(fsdp2_run, num_layers=7, ckpt_dir=str(tmp_path))
    first = run_ranks(functools.partial(run, save_at=save_at), 2, BLOCK, STEPS, MICRO, GAS, CLIP)
    assert (tmp_path / f"step{save_at}" / "engine_rank1.safetensors").exists()
    rest = run_ranks(functools.partial(run, resume=True), 2, BLOCK, STEPS, MICRO, GAS, CLIP)
    ref = reference()
    for a, b in zip(first, rest, strict=True):
        assert a["losses"] + b["losses"] == pytest.approx(ref["losses"], abs=1e-5)
