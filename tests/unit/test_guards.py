"""The loop that drives GradPruner, used wrongly: every misuse is a message, never a quiet wrong result
(observe() after zero_grad, observe() per micro-batch, a run that ends without its prune)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from helpers.tiny import batches, tiny_llama

from gradpruner_ds.config import GradPrunerConfig
from gradpruner_ds.errors import GradPrunerError
from gradpruner_ds.pruner import GradPruner


@pytest.mark.parametrize("criterion", ["shortgpt_bi", "igia_sum"])
def test_observe_after_zero_grad_names_the_order_of_the_calls(criterion):
    model = tiny_llama(4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pruner = GradPruner(model, GradPrunerConfig.from_dict({"window_steps": 2, "num_drop": 1, "criterion": criterion}))
    model(**batches(1)[0]).loss.backward()
    opt.step()
    opt.zero_grad()
    with pytest.raises(GradPrunerError, match="observe\\(\\) found no gradient.*before optimizer.zero_grad"):
        pruner.observe()


def test_observe_per_micro_batch_is_warned_once(caplog):
    """A loop with gradient accumulation that calls observe() after every micro-batch: the window would end
    after half the optimizer steps; one warning names the fix."""
    model = tiny_llama(4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pruner = GradPruner(model, GradPrunerConfig.from_dict({"window_steps": 4, "num_drop": 1, "progress_bar": False}))
    data = batches(4)
    with caplog.at_level(logging.WARNING, logger="gradpruner"):
        for step in range(2):
            for b in data[2 * step : 2 * step + 2]:  # two micro-batches per optimizer step
                (model(**b).loss / 2).backward()
                pruner.observe()
            opt.step()
            opt.zero_grad()
            opt, _ = pruner.maybe_prune(opt)
    assert caplog.text.count("observe() was called 2 times in one optimizer step") == 1
    assert "once per optimizer step, after the last micro-batch's backward" in caplog.text


@pytest.mark.parametrize("observe", [False, True])
def test_a_run_that_ends_without_its_prune_says_so(tmp_path, caplog, observe):
    """No observe() at all, or a window longer than what the loop fed it: at the last step a warning, and the
    report says ``"pruned": false`` with the reason; the model keeps every layer."""
    model = tiny_llama(4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = {"window_steps": 4, "num_drop": 1, "progress_bar": False, "output_dir": str(tmp_path)}
    pruner = GradPruner(model, GradPrunerConfig.from_dict(cfg), total_steps=5)
    with caplog.at_level(logging.WARNING, logger="gradpruner"):
        for i, b in enumerate(batches(5)):
            model(**b).loss.backward()
            if observe and i < 2:  # only two steps observed
                pruner.observe()
            opt.step()
            opt.zero_grad()
            opt, _ = pruner.maybe_prune(opt)
    assert "without the prune it was configured for" in caplog.text and "was NOT pruned" in caplog.text
    report = json.loads((tmp_path / "gradpruner_report.json").read_text())
    assert report["pruned"] is False and ("never called" in report["why"]) != observe
    assert len(model.model.layers) == 4


def test_a_pruned_run_reports_pruned():
    model = tiny_llama(4)
    pruner = GradPruner(model, GradPrunerConfig.from_dict({"window_steps": 1, "num_drop": 1, "progress_bar": False}))
    model(**batches(1)[0]).loss.backward()
    pruner.observe()
    pruner.maybe_prune()
    assert pruner.report["pruned"] is True


def test_a_pruned_model_is_pruned_again_only_when_asked_and_keeps_every_prune_on_record(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(6)
    first = GradPruner(model, GradPrunerConfig.from_dict({"layers_to_remove": [1, 2], "window_steps": 1}))
    model(**batches(1)[0]).loss.backward()
    first.observe()
    first.maybe_prune()
    model.zero_grad()
    assert model.config.gradpruner["kept_layers"] == [0, 3, 4, 5]
    model.save_pretrained(tmp_path / "once")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "once")
    with pytest.raises(GradPrunerError, match='already pruned.*"prune_again": true'):
        GradPruner(reloaded, GradPrunerConfig.from_dict({"window_steps": 1, "num_drop": 1}))
    again = GradPruner(reloaded, GradPrunerConfig.from_dict({"layers_to_remove": [1], "window_steps": 1, "prune_again": True}))
    reloaded(**batches(1)[0]).loss.backward()
    again.observe()
    again.maybe_prune()
    record = reloaded.config.gradpruner
    assert record["original_num_layers"] == 6 and record["kept_layers"] == [0, 4, 5]  # layer 3 of the original
    assert len(record["prunes"]) == 2


def test_a_second_gradpruner_on_one_trainer_is_refused():
    from transformers import Trainer, TrainingArguments

    from gradpruner_ds.integrations.hf_trainer import add_gradpruner

    trainer = Trainer(model=tiny_llama(4), args=TrainingArguments(output_dir="/tmp/gp_unused", report_to=[], use_cpu=True))
    add_gradpruner(trainer, {"window_steps": 1, "num_drop": 1})
    with pytest.raises(GradPrunerError, match="a Trainer takes one GradPruner"):
        add_gradpruner(trainer, {"window_steps": 1, "num_drop": 1})
