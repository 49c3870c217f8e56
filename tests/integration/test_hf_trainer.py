"""GradPrunerCallback inside a real transformers.Trainer run (one process)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.tiny import batches, tiny_llama
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from gradpruner_ds.integrations.hf_trainer import GradPrunerCallback


class _Data(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.rows = [{k: v[i] for k, v in b.items()} for b in batches(16, batch=4, seed=3) for i in range(4)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def test_trainer_callback_prunes_in_place_and_training_continues(tmp_path):
    model = tiny_llama(6)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=8,
        learning_rate=1e-3,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
    )
    cb = GradPrunerCallback({"window_steps": 3, "num_drop": 1, "num_merge": 1, "progress_bar": False})
    trainer = Trainer(model=model, args=args, train_dataset=_Data(), callbacks=[cb])
    trainer.train()
    plan = cb.pruner.plan
    assert plan is not None and plan.step == 3 and plan.observed_steps == 3
    assert trainer.state.global_step == 8  # training went on after the prune
    assert model.config.num_hidden_layers == 4
    opt = trainer.optimizer.optimizer
    live = {id(p) for p in model.parameters()}
    assert all(id(p) in live for g in opt.param_groups for p in g["params"])
    kept = model.model.layers[0].self_attn.q_proj.weight
    assert opt.state[kept]["step"].item() == 8  # Adam state carried through the prune, not reset
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and all(x == x for x in losses)
    report = json.loads((tmp_path / "gradpruner" / "gradpruner_report.json").read_text())
    assert report["params_after"] < report["params_before"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "gradpruner_final")
    assert reloaded.config.num_hidden_layers == 4
    ids = batches(1)[0]["input_ids"]
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-5)


def test_trainer_callback_under_deepspeed_needs_the_trainer(tmp_path):
    class Args:
        deepspeed = "ds.json"
        output_dir = str(tmp_path)

    cb = GradPrunerCallback({"window_steps": 3, "num_drop": 1})
    with pytest.raises(ValueError, match="^gradpruner: GradPrunerCallback under DeepSpeed needs the Trainer"):
        cb.on_train_begin(Args(), None, None, model=tiny_llama(4))
    assert not any(tmp_path.iterdir())  # nothing written


def test_trainer_callback_without_config_or_deepspeed_is_refused(tmp_path):
    class Args:
        output_dir = str(tmp_path)

    with pytest.raises(ValueError, match="^gradpruner: GradPrunerCallback needs a config"):
        GradPrunerCallback().on_train_begin(Args(), None, None, model=tiny_llama(4))


def test_add_gradpruner_validates_the_block_before_training(tmp_path):
    from types import SimpleNamespace

    from gradpruner_ds.integrations.hf_trainer import add_gradpruner

    no_ds = SimpleNamespace(args=SimpleNamespace(deepspeed=None), add_callback=lambda cb: None)
    with pytest.raises(ValueError, match="^gradpruner: add_gradpruner needs a config"):
        add_gradpruner(no_ds)
    typo = SimpleNamespace(
        args=SimpleNamespace(deepspeed={"zero_optimization": {"stage": 2}, "grad_pruner": {"num_drop": 1}}),
        add_callback=lambda cb: None,
    )
    with pytest.raises(ValueError, match="looks like a misspelling"):
        add_gradpruner(typo)
    added = []
    ok = SimpleNamespace(
        args=SimpleNamespace(deepspeed={"gradpruner": {"window_steps": 2, "num_drop": 1}}),
        add_callback=added.append,
    )
    cb = add_gradpruner(ok)
    assert added == [cb] and cb.config.num_drop == 1 and cb.trainer is ok
    assert not any(tmp_path.iterdir())
