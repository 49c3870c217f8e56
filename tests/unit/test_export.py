"""``gradpruner_ds.save_pretrained``: the pruned model a run leaves behind loads with ``from_pretrained`` and
gives the trained model's logits, also when the run trained peft LoRA adapters (merged on export)."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny import batches, tiny_llama
from transformers import AutoModelForCausalLM

import gradpruner_ds
from gradpruner_ds.config import GradPrunerConfig
from gradpruner_ds.pruner import GradPruner


def _train_and_prune(model, steps: int = 4):
    cfg = GradPrunerConfig.from_dict({"window_steps": 2, "num_drop": 2, "progress_bar": False})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    pruner = GradPruner(model, cfg, total_steps=steps)
    for b in batches(steps, seed=3):
        model(**b).loss.backward()
        pruner.observe()
        opt.step()
        opt.zero_grad()
        opt, _ = pruner.maybe_prune(opt)
    assert pruner.plan is not None
    return pruner.plan


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_saved_pruned_model_loads_to_the_same_logits(tmp_path):
    model = tiny_llama(6)
    model.train()
    _train_and_prune(model)
    out = gradpruner_ds.save_pretrained(model, tmp_path / "final")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = batches(1, seed=9)[0]["input_ids"]
    assert loaded.config.num_hidden_layers == 4
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("targets", [None, "all-linear"])
def test_peft_lora_run_saves_the_complete_pruned_model(tmp_path, targets):
    """peft's default LoraConfig (q_proj / v_proj) and all-linear: the folder is the pruned base with the
    trained adapters merged in, not the adapters alone and not the unpruned base."""
    from peft import LoraConfig, get_peft_model

    kw = {} if targets is None else {"target_modules": targets}
    model = get_peft_model(tiny_llama(6), LoraConfig(r=4, task_type="CAUSAL_LM", **kw))
    model.train()
    plan = _train_and_prune(model)
    ids = batches(1, seed=9)[0]["input_ids"]
    expect = _logits(model, ids)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gradpruner_ds.save_pretrained(model, tmp_path / "final")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # training model untouched
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert loaded.config.num_hidden_layers == 6 - len(plan.removed)
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    torch.testing.assert_close(_logits(loaded, ids), expect, rtol=1e-5, atol=1e-5)
