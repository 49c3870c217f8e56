"""Progressive removal (``stages > 1``): the budget cut in stages, each planned from a fresh window on the model
the previous stage left (checked against a separate single-stage pruner on a copy of that model), the
combined plan in original indices, the saved record, resume between and inside stages, repair per stage."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.tiny import batches, tiny_llama

from gradpruner_ds.backends.plain import Backend
from gradpruner_ds.checkpoint import load_pruner_state, save_pruner_state
from gradpruner_ds.config import GradPrunerConfig
from gradpruner_ds.errors import GradPrunerError
from gradpruner_ds.pruner import GradPruner

WINDOW, INTERVAL, STEPS = 2, 3, 12
BLOCK = {"window_steps": WINDOW, "num_drop": 3, "stages": 3, "stage_interval": INTERVAL, "progress_bar": False}


def _opt(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-3)


def _step(model, pruner, opt, b):
    out = model(**b)
    out.loss.backward()
    pruner.observe()
    opt.step()
    opt.zero_grad()
    return float(out.loss.detach()), pruner.maybe_prune(opt)[0]


def test_stage_budgets_and_refusals():
    cfg = GradPrunerConfig.from_dict({**BLOCK, "num_drop": 8})
    assert cfg.stage_budgets(30) == [3, 3, 2]
    bad = [
        ({"stage_interval": None}, "needs stage_interval"),
        ({"num_merge": 1}, "num_merge > 0"),
        ({"observe_only": True}, "observe_only"),
        ({"stage_interval": 1}, "at least 2"),
        ({"stage_interval": 3, "repair": {"steps": 2}}, "at least 4"),
        ({"stages": 1}, "stage_interval applies only"),
    ]
    for extra, match in bad:
        with pytest.raises(GradPrunerError, match=match):
            GradPrunerConfig.from_dict({**BLOCK, **extra})
    with pytest.raises(GradPrunerError, match="one layer per stage"):
        GradPrunerConfig.from_dict({**BLOCK, "num_drop": 2}).stage_budgets(7)
    with pytest.raises(GradPrunerError, match="last cut"):
        GradPrunerConfig.from_dict(BLOCK).resolve_window(8)  # cuts at 2, 5, 8: none after the last


def test_each_stage_is_planned_on_the_model_the_previous_left_like_a_fresh_pruner():
    model = tiny_llama(7)
    data = batches(STEPS, seq=10)
    opt = _opt(model)
    pruner = GradPruner(model, GradPrunerConfig.from_dict(BLOCK), total_steps=STEPS)
    layers, fresh_plans = [], []
    for i, b in enumerate(data):
        if i in (0, INTERVAL, 2 * INTERVAL):  # a stage's window starts: a separate pruner on a copy of the model
            twin = Backend().make_teacher(model).requires_grad_(True)  # a copy without the pruner's hooks
            twin_opt = _opt(twin)
            twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch would share the moment tensors
            single = {**BLOCK, "stages": 1, "stage_interval": None, "num_drop": 1, "prune_again": i > 0}
            fresh = GradPruner(twin, GradPrunerConfig.from_dict(single))
            with pruner.paused():
                for tb in data[i : i + WINDOW]:
                    _step(twin, fresh, twin_opt, tb)
            fresh_plans.append(fresh.plan)
        _, opt = _step(model, pruner, opt, b)
        layers.append(len(model.model.layers))
    assert layers == [7, 6, 6, 6, 5, 5, 5, 4, 4, 4, 4, 4]
    assert [p.num_layers for p in pruner.stage_plans] == [7, 6, 5]
    for got, want in zip(pruner.stage_plans, fresh_plans, strict=True):
        assert got.scores == pytest.approx(want.scores, rel=1e-6)
        assert got.dropped == want.dropped
    plan = pruner.plan
    assert plan is not None and plan.num_layers == 7 and len(plan.dropped) == 3
    assert [s["step"] for s in plan.extra["stages"]] == [2, 5, 8]
    record = model.config.gradpruner
    assert record["original_num_layers"] == 7 and record["kept_layers"] == list(plan.kept)
    assert [len(s["removed_original"]) for s in pruner.report["stages"]] == [1, 1, 1]
    assert sorted(x for s in pruner.report["stages"] for x in s["removed_original"]) == list(plan.dropped)


def test_with_repair_each_stage_repairs_its_own_cut():
    block = {**BLOCK, "stage_interval": 4, "repair": {"steps": 2}, "protect_layers": [0]}
    model = tiny_llama(7)
    opt = _opt(model)
    pruner = GradPruner(model, GradPrunerConfig.from_dict(block), total_steps=14)
    for b in batches(14, seq=10):
        _, opt = _step(model, pruner, opt, b)
    stages = pruner.report["stages"]
    assert [s["plan"]["step"] for s in stages] == [2, 6, 10]  # planned after each window, cut 2 steps later
    assert all(s["repair"]["runs"] and s["repair"]["runs"][0]["explained"] > 0 for s in stages)


@pytest.mark.parametrize("stop", [3, 4, 6])  # between stages 1 and 2, inside stage 2's window, and after its cut
def test_resume_between_and_inside_stages_is_exact(tmp_path, stop):
    data = batches(STEPS, seq=10)
    cfg = GradPrunerConfig.from_dict(BLOCK)
    model = tiny_llama(7)
    opt = _opt(model)
    whole = GradPruner(model, cfg, total_steps=STEPS)
    straight = []
    for b in data:
        loss, opt = _step(model, whole, opt, b)
        straight.append(loss)

    model = tiny_llama(7)
    opt = _opt(model)
    pruner = GradPruner(model, cfg, total_steps=STEPS)
    first = []
    for b in data[:stop]:
        loss, opt = _step(model, pruner, opt, b)
        first.append(loss)
    save_pruner_state(pruner, tmp_path)
    weights, opt_state = model.state_dict(), opt.state_dict()

    dense = tiny_llama(7)
    resumed = GradPruner(dense, cfg, total_steps=STEPS)
    plan = load_pruner_state(resumed, tmp_path)
    assert plan is not None and len(plan.removed) == len(pruner.stage_plans)
    opt = _opt(dense)
    opt = resumed.replay(plan, opt)[0]
    dense.load_state_dict(weights)
    opt.load_state_dict(opt_state)
    rest = []
    for b in data[stop:]:
        loss, opt = _step(dense, resumed, opt, b)
        rest.append(loss)
    assert first + rest == pytest.approx(straight, abs=1e-6)
    assert resumed.plan is not None and whole.plan is not None and resumed.plan.dropped == whole.plan.dropped
