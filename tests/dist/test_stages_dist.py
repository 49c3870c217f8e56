"""Progressive removal (``stages > 1``, each stage with its own repair) on real gloo ranks: every stage's plan,
fit and every loss equal the single-process run under ZeRO-2, ZeRO-3 and FSDP2 (a new engine per stage under
DeepSpeed); a ZeRO-3 resume between the stages equals the uninterrupted run."""

from __future__ import annotations

import functools

import pytest
from helpers.ranks import run_ranks
from helpers.training import deepspeed_run, fsdp2_run, single_process_run
from test_deepspeed import CLIP, GAS, MICRO

pytestmark = pytest.mark.dist

BLOCK = {
    "window_steps": 2,
    "num_drop": 2,
    "stages": 2,
    "stage_interval": 4,  # cuts after steps 3 and 7 (window 2 + 1 repair step)
    "protect_layers": [0],
    "progress_bar": False,
    "repair": {"steps": 1, "ridge": 1e-3},
}
STEPS, LAYERS = 10, 7
_ref: list[dict] = []


def reference() -> dict:
    if not _ref:
        _ref.append(single_process_run(BLOCK, STEPS, 2, MICRO, GAS, CLIP, num_layers=LAYERS))
        assert len(_ref[0]["plan"]["extra"]["stages"]) == 2
    return _ref[0]


def assert_matches(ref: dict, results: list[dict]) -> None:
    for r in results:
        plan, want = r["plan"], ref["plan"]  # the combined plan: every stage's step and removed layers
        assert plan["dropped"] == want["dropped"]
        assert plan["scores"] == pytest.approx(want["scores"], rel=1e-5)
        strip = [{k: v for k, v in s.items() if k != "plan_digest"} for s in want["extra"]["stages"]]
        assert [{k: v for k, v in s.items() if k != "plan_digest"} for s in plan["extra"]["stages"]] == strip
        assert r["losses"] == pytest.approx(ref["losses"], abs=1e-5)
        assert r["repair"]["runs"][0]["tokens"] == ref["repair"]["runs"][0]["tokens"]


@pytest.mark.parametrize("stage", [2, 3])
def test_progressive_removal_under_deepspeed_equals_single_process(stage):
    assert_matches(reference(), run_ranks(deepspeed_run, 2, BLOCK, STEPS, stage, MICRO, GAS, CLIP, LAYERS))


def test_progressive_removal_under_fsdp2_equals_single_process():
    assert_matches(reference(), run_ranks(fsdp2_run, 2, BLOCK, STEPS, MICRO, GAS, CLIP, LAYERS))


def test_zero3_resume_between_stages_equals_the_uninterrupted_run(tmp_path):
    run = functools.partial(deepspeed_run, num_layers=LAYERS, ckpt_dir=str(tmp_path))
    first = run_ranks(functools.partial(run, save_at=4), 2, BLOCK, STEPS, 3, MICRO, GAS, CLIP)  # stage 1 cut
    rest = run_ranks(functools.partial(run, resume=True), 2, BLOCK, STEPS, 3, MICRO, GAS, CLIP)
    ref = reference()
    for a, b in zip(first, rest, strict=True):
        assert a["losses"] + b["losses"] == pytest.approx(ref["losses"], abs=1e-5)
        assert b["plan"]["dropped"] == ref["plan"]["dropped"]
