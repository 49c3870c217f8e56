"""The pruner's statistics: only what the criterion reads is collected, every statistic excludes exactly
the steps IGIA excludes, the whole state survives a checkpoint, and a window measured in an unusual way
(eval mode, peft's default LoRA targets) either works or says why not."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from helpers.tiny import batches, tiny_llama

from gradpruner_ds.checkpoint import load_pruner_state, save_pruner_state
from gradpruner_ds.config import GradPrunerConfig
from gradpruner_ds.core.criteria import CRITERIA
from gradpruner_ds.errors import GradPrunerError
from gradpruner_ds.pruner import GradPruner

ALL = sorted(set(CRITERIA) - {"given"})


def _cfg(criterion: str, **kw) -> GradPrunerConfig:
    return GradPrunerConfig.from_dict(
        {"window_steps": 3, "num_drop": 2, "criterion": criterion, "progress_bar": False, **kw}
    )


def _observe(model, pruner, data, opt=None) -> None:
    for b in data:
        model(**b).loss.backward()
        pruner.observe()
        if opt is not None:
            opt.step()
        model.zero_grad()


def _scores(pruner: GradPruner) -> list[float]:
    plan = pruner.make_plan()
    return list(plan.scores)


@pytest.mark.parametrize("criterion", ALL)
def test_resume_inside_the_window_gives_the_uninterrupted_plan(tmp_path, criterion):
    data = batches(3, seed=4)
    model = tiny_llama(6)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    whole = GradPruner(model, _cfg(criterion, num_merge=1 if criterion == "igia_sum" else 0), seed=1)
    _observe(model, whole, data, opt)
    expect = whole.make_plan()

    model = tiny_llama(6)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    first = GradPruner(model, _cfg(criterion, num_merge=1 if criterion == "igia_sum" else 0), seed=1)
    _observe(model, first, data[:2], opt)
    save_pruner_state(first, tmp_path / "ck")
    for stat in first.statistics.values():  # the process that saved is gone: its hooks too
        stat.close()
    resumed = GradPruner(model, _cfg(criterion, num_merge=1 if criterion == "igia_sum" else 0), seed=1)
    assert load_pruner_state(resumed, tmp_path / "ck") is None
    assert resumed.steps_seen == 2 and resumed.observed_steps == 2
    _observe(model, resumed, data[2:], opt)
    plan = resumed.make_plan()
    assert plan.dropped == expect.dropped and plan.merged == expect.merged
    assert plan.scores == pytest.approx(expect.scores, rel=1e-6)


@pytest.mark.parametrize("criterion", ALL)
def test_resume_after_the_prune_gives_the_uninterrupted_model(tmp_path, criterion):
    """Saved after the prune (the plan, no statistics), resumed into a new dense model: the replayed surgery and
    the saved weights give the uninterrupted run's plan, structure and next losses."""
    data = batches(6, seed=7)
    num_merge = 1 if criterion.startswith(("igia", "obd")) else 0

    def run(model, pruner, opt, part):
        losses = []
        for b in part:
            loss = model(**b).loss
            loss.backward()
            pruner.observe()
            opt.step()
            opt.zero_grad()
            opt, _ = pruner.maybe_prune(opt)
            losses.append(float(loss))
        return losses, opt

    model = tiny_llama(6)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    whole = GradPruner(model, _cfg(criterion, num_merge=num_merge), seed=1)
    expect, _ = run(model, whole, opt, data)

    model = tiny_llama(6)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    first = GradPruner(model, _cfg(criterion, num_merge=num_merge), seed=1)
    losses, opt = run(model, first, opt, data[:4])  # window 3, pruned after step 3, one step after it
    save_pruner_state(first, tmp_path / "ck")
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    dense = tiny_llama(6)
    resumed = GradPruner(dense, _cfg(criterion, num_merge=num_merge), seed=1)
    plan = load_pruner_state(resumed, tmp_path / "ck")
    assert plan is not None and plan.to_dict() == whole.plan.to_dict()
    opt = torch.optim.SGD(dense.parameters(), lr=1e-2)
    opt, _ = resumed.replay(plan, opt)
    dense.load_state_dict(weights)
    rest, _ = run(dense, resumed, opt, data[4:])
    assert dense.config.num_hidden_layers == model.config.num_hidden_layers
    assert losses + rest == pytest.approx(expect, abs=1e-6)


@pytest.mark.parametrize(
    ("criterion", "num_merge", "igia"),
    [("shortgpt_bi", 0, False), ("angular", 0, False), ("random", 0, False), ("igia_sum", 0, True),
     ("obd", 0, True), ("shortgpt_bi", 1, True)],
)  # fmt: skip
def test_only_the_statistics_a_criterion_reads_are_collected(criterion, num_merge, igia):
    model = tiny_llama(4)
    p = GradPruner(model, _cfg(criterion, num_merge=num_merge))
    assert ("igia" in p.statistics) == igia
    assert set(p.statistics) == set(CRITERIA[criterion].reads) | ({"igia"} if igia else set())


@pytest.mark.parametrize("criterion", ["shortgpt_bi", "angular", "gate_fisher", "igia_sum"])
def test_a_non_finite_step_is_left_out_of_every_statistic(criterion):
    """A step whose forward (and hence gradients) went non-finite is excluded from the hidden-state sums
    exactly like from IGIA: the scores equal those of the same window without that step."""
    data = batches(3, seed=5)
    clean_model = tiny_llama(5)
    clean = GradPruner(clean_model, _cfg(criterion, window_steps=2))
    _observe(clean_model, clean, [data[0], data[2]])

    model = tiny_llama(5)
    p = GradPruner(model, _cfg(criterion, window_steps=3))
    _observe(model, p, data[:1])
    w = model.model.layers[2].mlp.up_proj.weight
    saved = w.detach().clone()
    with torch.no_grad():
        w.fill_(float("inf"))  # layers 2.. see non-finite hidden states, every gradient goes non-finite
    _observe(model, p, data[1:2])
    with torch.no_grad():
        w.copy_(saved)
    _observe(model, p, data[2:])
    assert p.skipped_steps == 1 and p.observed_steps == 2
    scores = _scores(p)
    assert all(math.isfinite(s) for s in scores)
    assert scores == pytest.approx(_scores(clean), rel=1e-6)


def test_a_non_finite_score_is_an_error_naming_the_layer():
    model = tiny_llama(4)
    p = GradPruner(model, _cfg("shortgpt_bi"))
    _observe(model, p, batches(3))
    p.statistics["hidden_states"]._table[0, 2] = float("nan")  # what a NaN that slipped through would do
    with pytest.raises(GradPrunerError, match=r"non-finite scores of layers \{2: nan\}"):
        p.maybe_prune()
    assert p.plan is None and model.config.num_hidden_layers == 4


def test_a_window_in_eval_mode_is_measured_and_warned_about(caplog):
    """from_pretrained returns a model in eval mode: the hidden-state criteria still measure the window
    (the tiny model has no dropout, so the scores equal the train-mode ones) and a warning says so."""
    data = batches(3, seed=6)
    train_model = tiny_llama(5)
    train_model.train()
    ref = GradPruner(train_model, _cfg("shortgpt_bi"))
    _observe(train_model, ref, data)
    model = tiny_llama(5)
    model.eval()
    p = GradPruner(model, _cfg("shortgpt_bi"))
    with caplog.at_level(logging.WARNING, logger="gradpruner_ds"):
        logging.getLogger("gradpruner_ds").propagate = True
        try:
            _observe(model, p, data)
        finally:
            logging.getLogger("gradpruner_ds").propagate = False
    assert len({r.getMessage() for r in caplog.records if "eval mode" in r.getMessage()}) == 1
    assert _scores(p) == pytest.approx(_scores(ref), rel=1e-6)


def test_a_window_without_gradient_forwards_is_an_error():
    model = tiny_llama(4)
    p = GradPruner(model, _cfg("shortgpt_bi"))
    for b in batches(3):
        with torch.no_grad():
            model.eval()
            model(**b)  # an evaluation forward: not a training step
        model.train()
        model.zero_grad()
        for q in model.parameters():
            q.grad = torch.zeros_like(q)
        p.observe()
    with pytest.raises(GradPrunerError, match="saw none that counts"):
        p.maybe_prune()


def _peft(model, **kw):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, task_type="CAUSAL_LM", **kw))


def test_peft_default_lora_with_the_default_criterion_needs_no_adapters_anywhere():
    model = _peft(tiny_llama(4))  # peft's default targets: q_proj and v_proj only
    p = GradPruner(model, _cfg("shortgpt_bi", num_drop=1))
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-3)
    for b in batches(4):
        model(**b).loss.backward()
        p.observe()
        opt.step()
        opt.zero_grad()
        opt, _ = p.maybe_prune(opt)
    assert p.plan is not None and p.statistics == {} and p.mode == "none"


def test_peft_default_lora_with_an_igia_criterion_scores_the_adapted_sublayers(caplog):
    model = _peft(tiny_llama(4))
    with caplog.at_level(logging.WARNING, logger="gradpruner_ds"):
        logging.getLogger("gradpruner_ds").propagate = True
        try:
            p = GradPruner(model, _cfg("igia_sum", num_drop=1))
        finally:
            logging.getLogger("gradpruner_ds").propagate = False
    assert p.mode == "lora"
    assert p.igia is not None and {name for _, name in p.igia.keys} == {"self_attn.q_proj", "self_attn.v_proj"}
    assert any("not scored" in r.getMessage() and "mlp.down_proj" in r.getMessage() for r in caplog.records)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-2)
    _observe(model, p, batches(3), opt)  # peft's B starts at 0: the first step's simulated gradient is 0
    assert all(s > 0 for s in _scores(p))
    with pytest.raises(GradPrunerError, match="merge needs the IGIA of every linear"):
        GradPruner(_peft(tiny_llama(4)), _cfg("igia_sum", num_drop=1, num_merge=1))


def test_lora_on_some_layers_only_is_refused_for_igia_criteria():
    model = _peft(tiny_llama(4), layers_to_transform=[0, 1])
    with pytest.raises(GradPrunerError, match=r"layers without adapters: \[2, 3\]"):
        GradPruner(model, _cfg("igia_sum", num_drop=1))
    GradPruner(_peft(tiny_llama(4), layers_to_transform=[0, 1]), _cfg("shortgpt_bi", num_drop=1))


@pytest.mark.parametrize("criterion", ["shortgpt_bi", "igia_sum"])
def test_paused_steps_are_not_observed(criterion):
    """Steps inside pruner.paused() leave every statistic as if they had not happened."""
    data = batches(3, seed=8)
    clean_model = tiny_llama(5)
    clean = GradPruner(clean_model, _cfg(criterion, window_steps=2))
    _observe(clean_model, clean, [data[0], data[2]])
    model = tiny_llama(5)
    p = GradPruner(model, _cfg(criterion, window_steps=2))
    _observe(model, p, data[:1])
    with p.paused():
        _observe(model, p, data[1:2])
    _observe(model, p, data[2:])
    assert p.steps_seen == 2
    assert _scores(p) == pytest.approx(_scores(clean), rel=1e-6)
