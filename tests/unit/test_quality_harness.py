"""The short-protocol quality harness (benchmarks/quality/run.py) shares one observation window between
every arm through the pruner's own ``state_dict()`` / ``load_state_dict()``: an arm built from the shared
window must decide exactly what a pruner that observed the same window itself decides (scores, plan,
merged weights)."""

from __future__ import annotations

import argparse
import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from helpers.tiny import batches, tiny_llama

from gradpruner_ds.config import GradPrunerConfig
from gradpruner_ds.pruner import GradPruner

ROOT = Path(__file__).resolve().parents[2]


def _harness():
    spec = importlib.util.spec_from_file_location("quality_run", ROOT / "benchmarks" / "quality" / "run.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ARGS = argparse.Namespace(window=3, retune=2, lr=1e-3)
BUDGET = 0.34  # 2 of 6 layers

ARMS = [
    {"criterion": "shortgpt_bi"},
    {"criterion": "angular"},
    {"criterion": "gate_fisher"},
    {"criterion": "igia_sum"},
    {"criterion": "obd"},
    {"criterion": "igia_relative", "num_merge": 1},
    {"criterion": "shortgpt_bi", "num_merge": 1},
]


@pytest.fixture(scope="module")
def window():
    harness = _harness()
    data = [{**b, "attention_mask": torch.ones_like(b["input_ids"])} for b in batches(4, seed=11)]
    model = tiny_llama(6)
    win = harness.run_window(ARGS, model, data, [BUDGET])
    hooks = [h for layer in model.model.layers for h in layer._forward_hooks.values()]
    assert not [h for h in hooks if h.__module__.startswith("gradpruner_ds")]  # the probes closed theirs
    assert not model._forward_pre_hooks
    return harness, win, data


@pytest.mark.parametrize("arm", ARMS, ids=lambda a: a["criterion"] + f"+m{a.get('num_merge', 0)}")
def test_an_arm_from_the_shared_window_equals_its_own_observation(window, arm):
    harness, win, data = window
    block = {"window_steps": ARGS.window, "prune_ratio": BUDGET, "progress_bar": False, **arm}

    # the arm as the harness builds it: the window's model and optimizer state, the shared statistics
    model = tiny_llama(6)
    model.load_state_dict(win["model"])
    opt = harness.new_opt(model, ARGS.lr)
    opt.load_state_dict(copy.deepcopy(win["opt"]))
    shared = harness.window_pruner(model, block, ARGS, win)
    shared.maybe_prune(opt)

    # the same arm observing the window itself (same batches, optimizer, clipping)
    own_model = tiny_llama(6)
    own_model.train()
    own_opt = harness.new_opt(own_model, ARGS.lr)
    own = GradPruner(own_model, GradPrunerConfig.from_dict(block), total_steps=ARGS.window + ARGS.retune)
    for b in data[: ARGS.window]:
        harness.step(own_model, own_opt, b, [own])
    own.maybe_prune(own_opt)

    assert shared.plan is not None and own.plan is not None
    assert shared.plan.dropped == own.plan.dropped and shared.plan.targets == own.plan.targets
    assert shared.plan.scores == pytest.approx(own.plan.scores, rel=1e-5)
    for a, b in zip(model.state_dict().values(), own_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
