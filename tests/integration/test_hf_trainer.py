"""GradPrunerCallback inside a real transformers.Trainer run (one process)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.tiny import batches, tiny_llama
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

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
    cb = GradPrunerCallback(
        {"window_steps": 3, "num_drop": 1, "num_merge": 1, "progress_bar": False}, save_final=True
    )
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
        train=lambda *a, **k: None,
        save_model=lambda *a, **k: None,
    )
    cb = add_gradpruner(ok)
    assert added == [cb] and cb.config.num_drop == 1 and cb.trainer is ok
    assert not any(tmp_path.iterdir())


def _resume_args(out, save: bool = True) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=8,
        learning_rate=1e-3,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="steps" if save else "no",
        save_steps=2,
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
    )


BLOCK = {"window_steps": 3, "num_drop": 2, "progress_bar": False, "plot": False}


def _logits(model):
    ids = batches(1, seed=11)[0]["input_ids"]
    model.eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer_full")
    model = tiny_llama(6)
    trainer = Trainer(model=model, args=_resume_args(out), train_dataset=_Data())
    from gradpruner_ds.integrations.hf_trainer import add_gradpruner

    cb = add_gradpruner(trainer, BLOCK)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"out": out, "plan": cb.plan, "losses": losses, "logits": _logits(model)}


@pytest.mark.parametrize("at", [2, 4])
def test_trainer_resumes_from_its_own_checkpoint_inside_the_window_and_after_the_prune(tmp_path, uninterrupted, at):
    """Trainer.train(resume_from_checkpoint=...) with add_gradpruner: from checkpoint-2 (inside the 3-step
    window) the window is finished with the saved statistics; from checkpoint-4 (after the prune) the pruned
    architecture is rebuilt before the Trainer loads weights and optimizer, and nothing is observed again.
    Both end with the uninterrupted run's plan, losses and model."""
    from gradpruner_ds.integrations.hf_trainer import add_gradpruner

    ckpt = uninterrupted["out"] / f"checkpoint-{at}"
    assert (ckpt / "gradpruner" / "state.json").exists()
    model = tiny_llama(6)  # the dense model, as a user rebuilds it
    trainer = Trainer(model=model, args=_resume_args(tmp_path, save=False), train_dataset=_Data())
    cb = add_gradpruner(trainer, BLOCK, save_final=True)
    trainer.train(resume_from_checkpoint=str(ckpt))
    assert cb.plan is not None and cb.plan.dropped == uninterrupted["plan"].dropped
    assert cb.plan.scores == pytest.approx(uninterrupted["plan"].scores, rel=1e-6)
    assert model.config.num_hidden_layers == 4 and trainer.state.global_step == 8
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses == pytest.approx(uninterrupted["losses"], abs=1e-5)  # the history of steps 1..at is restored
    torch.testing.assert_close(_logits(model), uninterrupted["logits"], rtol=1e-5, atol=1e-5)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "gradpruner_final").config.num_hidden_layers == 4


def test_a_trainer_resume_with_other_gradpruner_settings_is_refused_before_any_work(tmp_path, uninterrupted):
    """After the prune, the checkpoint's plan was made with the saved block: resuming with another one would
    replay a surgery the settings did not make. Refused before the model is touched or anything written."""
    from gradpruner_ds.integrations.hf_trainer import add_gradpruner

    model = tiny_llama(6)
    trainer = Trainer(model=model, args=_resume_args(tmp_path / "out", save=False), train_dataset=_Data())
    add_gradpruner(trainer, {**BLOCK, "num_drop": 1})
    with pytest.raises(ValueError, match="^gradpruner: the gradpruner block must be the same as when"):
        trainer.train(resume_from_checkpoint=str(uninterrupted["out"] / "checkpoint-4"))
    assert model.config.num_hidden_layers == 6 and not any((tmp_path / "out").iterdir())  # the Trainer made it


def test_a_plain_callback_resumes_when_the_arguments_name_the_checkpoint(tmp_path, uninterrupted):
    """callbacks=[GradPrunerCallback(...)] sees TrainingArguments.resume_from_checkpoint at the Trainer's init
    (the example scripts' way); a checkpoint handed only to trainer.train() cannot be seen in time and the
    Trainer's own optimizer load fails loudly (add_gradpruner handles that form)."""
    ckpt = str(uninterrupted["out"] / "checkpoint-4")
    args = _resume_args(tmp_path, save=False)
    args.resume_from_checkpoint = ckpt
    model = tiny_llama(6)
    cb = GradPrunerCallback(BLOCK)
    trainer = Trainer(model=model, args=args, train_dataset=_Data(), callbacks=[cb])
    trainer.train(resume_from_checkpoint=ckpt)
    torch.testing.assert_close(_logits(model), uninterrupted["logits"], rtol=1e-5, atol=1e-5)
    blind = Trainer(model=tiny_llama(6), args=_resume_args(tmp_path, save=False), train_dataset=_Data(),
                    callbacks=[GradPrunerCallback(BLOCK)])  # fmt: skip
    with pytest.raises(ValueError, match="parameter group"):
        blind.train(resume_from_checkpoint=ckpt)


def test_the_prune_reaches_the_trainer_log(tmp_path):
    """add_gradpruner: the prune's events go through trainer.log (every reporting integration and
    log_history) at the step of the prune."""
    from gradpruner_ds.integrations.hf_trainer import add_gradpruner

    trainer = Trainer(model=tiny_llama(6), args=_resume_args(tmp_path, save=False), train_dataset=_Data())
    add_gradpruner(trainer, BLOCK)
    trainer.train()
    rows = [h for h in trainer.state.log_history if "gradpruner/layers_after" in h]
    assert len(rows) == 1 and rows[0]["step"] == 3
    assert rows[0]["gradpruner/layers_before"] == 6 and rows[0]["gradpruner/layers_after"] == 4
    assert sum(rows[0][f"gradpruner/removed/{i}"] for i in range(6)) == 2
    assert rows[0]["gradpruner/params_after"] < rows[0]["gradpruner/params_before"]


def test_the_prune_events_leave_the_trainers_own_logging_alone(tmp_path):
    from gradpruner_ds.integrations.hf_trainer import add_gradpruner

    trainer = Trainer(model=tiny_llama(6), args=_resume_args(tmp_path, save=False), train_dataset=_Data())
    add_gradpruner(trainer, BLOCK)
    trainer.train()
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == list(range(1, 9))


def test_trainer_save_model_writes_the_pruned_model(tmp_path):
    """The Trainer's own save (full fine-tuning) is the pruned model: from_pretrained loads its layers."""
    from gradpruner_ds.integrations.hf_trainer import add_gradpruner

    model = tiny_llama(6)
    trainer = Trainer(model=model, args=_resume_args(tmp_path, save=False), train_dataset=_Data())
    add_gradpruner(trainer, BLOCK)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    assert not (tmp_path / "gradpruner_final").exists()  # not asked: the Trainer's own save is the model
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert loaded.config.num_hidden_layers == 4 and loaded.config.gradpruner["original_num_layers"] == 6
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=1e-5, atol=1e-5)


def test_trainer_with_peft_default_lora_leaves_a_complete_pruned_model(tmp_path):
    """peft's default LoraConfig under the Trainer: the default criterion needs no adapters anywhere, and
    gradpruner_final/ (written by default for peft runs) is the pruned base with the adapters merged in."""
    from peft import LoraConfig, get_peft_model

    from gradpruner_ds.integrations.hf_trainer import add_gradpruner

    model = get_peft_model(tiny_llama(6), LoraConfig(r=4, task_type="CAUSAL_LM"))
    args = _resume_args(tmp_path, save=False)
    args.learning_rate = 1e-2
    trainer = Trainer(model=model, args=args, train_dataset=_Data())
    add_gradpruner(trainer, BLOCK)
    trainer.train()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "gradpruner_final")
    assert loaded.config.num_hidden_layers == 4
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=1e-5, atol=1e-5)
    # the Trainer's own save of the adapters: they now name the pruned base, and load to the same model
    from peft import AutoPeftModelForCausalLM

    trainer.save_model()
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        (tmp_path / "gradpruner_base").resolve()
    )
    adapted = AutoPeftModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(_logits(adapted), _logits(model), rtol=1e-5, atol=1e-5)


def test_gradpruner_final_carries_the_trainers_tokenizer(tmp_path):
    """The tokenizer the Trainer holds (``processing_class``) is written beside the pruned model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from gradpruner_ds.integrations.hf_trainer import add_gradpruner
    from launch.train import load_tokenizer

    model = get_peft_model(tiny_llama(6), LoraConfig(r=4, task_type="CAUSAL_LM"))
    trainer = Trainer(model=model, args=_resume_args(tmp_path, save=False), train_dataset=_Data(),
                      processing_class=load_tokenizer())  # fmt: skip
    add_gradpruner(trainer, BLOCK)
    trainer.train()
    assert AutoTokenizer.from_pretrained(tmp_path / "gradpruner_final").vocab_size > 0


KD_BLOCK = {**BLOCK, "window_steps": 2, "recovery": {"distill_steps": 3, "temperature": 2.0, "weight": 0.5}}


class _InOrder(Trainer):
    """The Trainer with its rows in dataset order, so a loop of one's own can see the same batches."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def _kd_args(out) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=7,
        learning_rate=1e-3, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
    )  # fmt: skip


def test_add_gradpruner_distills_in_the_trainer_like_a_loop_of_ones_own(tmp_path):
    """recovery under the HF Trainer: add_gradpruner adds the distillation term to the Trainer's loss at the
    Trainer's own gradient-accumulation scale; the run equals ``pruner.distill(out.loss, ...) / GAS`` in a
    plain loop over the same batches (every logged loss, the final weights)."""
    from gradpruner_ds.config import GradPrunerConfig
    from gradpruner_ds.integrations.hf_trainer import add_gradpruner
    from gradpruner_ds.pruner import GradPruner

    model = tiny_llama(6)
    trainer = _InOrder(model=model, args=_kd_args(tmp_path), train_dataset=_Data())
    cb = add_gradpruner(trainer, KD_BLOCK)
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert cb.pruner.distiller is not None and cb.pruner.distiller.steps_done == 3
    assert not cb.pruner.distilling  # the teacher was freed after its 3 steps

    rows = _Data().rows
    data = [{k: torch.stack([r[k] for r in rows[i : i + 4]]) for k in rows[0]} for i in range(0, 56, 4)]
    own = tiny_llama(6)
    own.train()
    opt = torch.optim.AdamW(own.parameters(), lr=1e-3, weight_decay=0.0)
    pruner = GradPruner(own, GradPrunerConfig.from_dict(KD_BLOCK), total_steps=7)
    losses, plain = [], []
    for step in range(7):
        total = task = 0.0
        for b in data[2 * step : 2 * step + 2]:
            out = own(**b)
            loss = pruner.distill(out.loss, out.logits, b) / 2
            loss.backward()
            total, task = total + float(loss), task + float(out.loss) / 2
        torch.nn.utils.clip_grad_norm_(own.parameters(), 1.0)
        pruner.observe()
        opt.step()
        opt.zero_grad()
        opt, _ = pruner.maybe_prune(opt)
        losses.append(total)
        plain.append(task)
    assert pruner.plan.removed == cb.plan.removed
    assert [abs(a - b) > 1e-6 for a, b in zip(losses, plain, strict=True)] == [False] * 2 + [True] * 3 + [False] * 2
    assert logged == pytest.approx(losses, abs=2e-4)  # the Trainer logs 4 decimals
    torch.testing.assert_close(_logits(model), _logits(own), atol=1e-5, rtol=1e-4)


def test_a_callback_without_the_trainer_warns_that_it_cannot_distill(tmp_path, caplog):
    """A GradPrunerCallback in callbacks=[...] cannot reach the Trainer's loss: the run says so once instead
    of silently training the pruned model without the configured distillation."""
    import logging

    logging.getLogger("gradpruner_ds").propagate = True
    try:
        with caplog.at_level(logging.WARNING, logger="gradpruner_ds"):
            cb = GradPrunerCallback(KD_BLOCK)
            Trainer(model=tiny_llama(6), args=_kd_args(tmp_path), train_dataset=_Data(), callbacks=[cb]).train()
    finally:
        logging.getLogger("gradpruner_ds").propagate = False
    at_start = [r for r in caplog.records if "cannot add the term to the Trainer's loss" in r.getMessage()]
    assert at_start and "add_gradpruner(trainer, config)" in at_start[0].getMessage()  # before any step
    warned = [r for r in caplog.records if "added no distillation term" in r.getMessage()]
    assert len({id(r) for r in warned}) == 1  # once (caplog may list the same record twice)
    assert "add_gradpruner" in warned[0].getMessage()
    assert cb.plan is not None and not cb.pruner.distilling


def test_a_trainer_loss_the_distillation_scale_cannot_read_exactly_is_warned_about(tmp_path, caplog):
    """The distillation term's scale is read off the Trainer's loss as loss / mean cross-entropy: exact for the
    plain loss (no warning), approximate with label smoothing, which add_gradpruner says when it is added."""
    import logging

    from gradpruner_ds.integrations.hf_trainer import add_gradpruner

    logging.getLogger("gradpruner_ds").propagate = True
    try:
        with caplog.at_level(logging.WARNING, logger="gradpruner_ds"):
            add_gradpruner(Trainer(model=tiny_llama(6), args=_kd_args(tmp_path), train_dataset=_Data()), KD_BLOCK)
            plain = [r.getMessage() for r in caplog.records if "scale is read off" in r.getMessage()]
            args = _kd_args(tmp_path)
            args.label_smoothing_factor = 0.1
            add_gradpruner(Trainer(model=tiny_llama(6), args=args, train_dataset=_Data()), KD_BLOCK)
            add_gradpruner(Trainer(model=tiny_llama(6), args=args, train_dataset=_Data()), BLOCK)  # no recovery
    finally:
        logging.getLogger("gradpruner_ds").propagate = False
    said = {r.getMessage() for r in caplog.records if "scale is read off" in r.getMessage()}
    assert not plain and len(said) == 1 and "label smoothing" in said.pop()


def test_a_trainer_resume_during_the_distillation_gives_the_uninterrupted_run(tmp_path, caplog):
    """Trainer checkpoints saved while the teacher lived (pruned after step 2, 3 distillation steps): a new
    Trainer resumed from checkpoint-3 (1 step done) restores the teacher -- the dense model's copy, made
    before the surgery, with the saved weights -- distills for the 2 remaining steps, and saves checkpoint-4
    with the teacher again; a third run from that one (2 done) distills 1 step. Every resumed run logs the
    uninterrupted run's losses and ends with its model."""
    from gradpruner_ds.integrations.hf_trainer import add_gradpruner

    args = _kd_args(tmp_path / "first")
    args.save_strategy, args.save_steps = "steps", 1  # a resumed Trainer keeps the saved run's save_steps
    first = _InOrder(model=(full := tiny_llama(6)), args=args, train_dataset=_Data())
    add_gradpruner(first, KD_BLOCK)
    first.train()
    want = [h["loss"] for h in first.state.log_history if "loss" in h]
    ckpt = tmp_path / "first" / "checkpoint-3"  # pruned after step 2; one of the 3 distillation steps done
    assert (ckpt / "gradpruner" / "stats_rank0.safetensors").exists()  # the teacher's weights were saved

    def resume(out, checkpoint):
        args = _kd_args(out)
        args.save_strategy, args.save_steps = "steps", 1
        trainer = _InOrder(model=(model := tiny_llama(6)), args=args, train_dataset=_Data())
        cb = add_gradpruner(trainer, KD_BLOCK)
        trainer.train(resume_from_checkpoint=str(checkpoint))
        assert cb.plan is not None and trainer.state.global_step == 7 and not cb.distilling  # teacher freed
        assert [h["loss"] for h in trainer.state.log_history if "loss" in h] == pytest.approx(want, abs=2e-4)
        torch.testing.assert_close(_logits(model), _logits(full), atol=1e-5, rtol=1e-4)
        return cb

    assert resume(tmp_path / "second", ckpt)._resumed_distiller.steps_done == 3
    again = tmp_path / "second" / "checkpoint-4"  # saved by the resumed run: two steps done, teacher kept
    assert (again / "gradpruner" / "stats_rank0.safetensors").exists()
    assert resume(tmp_path / "third", again)._resumed_distiller.steps_done == 3
    import logging

    logging.getLogger("gradpruner_ds").propagate = True  # a callback that does not know its block yet says so
    try:
        with caplog.at_level(logging.WARNING, logger="gradpruner_ds"):
            GradPrunerCallback(None).prepare_resume(ckpt, tiny_llama(6))
    finally:
        logging.getLogger("gradpruner_ds").propagate = False
    assert any("WITHOUT the remaining distillation steps" in r.getMessage() for r in caplog.records)
    plain = _InOrder(model=tiny_llama(6), args=_kd_args(tmp_path / "plain"), train_dataset=_Data())
    add_gradpruner(plain, BLOCK | {"window_steps": 2})  # the run without the recovery block differs
    plain.train()
    assert [h["loss"] for h in plain.state.log_history if "loss" in h][3] != pytest.approx(want[3], abs=1e-3)


@pytest.mark.parametrize("block", [
    {"repair": {"steps": 2}},  # plan at step 3, the repair sums over steps 4-5, the cut after step 5
    {"num_drop": 2, "stages": 2, "stage_interval": 3},  # cuts after steps 3 and 6
])  # fmt: skip
def test_trainer_callback_with_repair_and_with_stages(tmp_path, block):
    model = tiny_llama(6)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=8, learning_rate=1e-3,
        max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        dataloader_num_workers=0,
    )  # fmt: skip
    layers: list[int] = []

    class Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):  # after GradPruner's own on_step_end
            layers.append(model.config.num_hidden_layers)

    cfg = {"window_steps": 3, "num_drop": 1, "progress_bar": False, "protect_layers": [0], **block}
    trainer = Trainer(model=model, args=args, train_dataset=_Data(), callbacks=[GradPrunerCallback(cfg), Count()])
    trainer.train()
    if "repair" in block:
        assert layers == [6] * 4 + [5] * 4
        report = json.loads((tmp_path / "gradpruner" / "gradpruner_report.json").read_text())
        assert report["repair"]["runs"][0]["explained"] > 0
    else:
        assert layers == [6, 6, 5, 5, 5, 4, 4, 4]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and all(x == x for x in losses)


def test_a_trainer_checkpoint_rewritten_after_its_commit_is_refused_with_the_intact_one_named(tmp_path, uninterrupted):
    """GradPruner marks every Trainer checkpoint complete once all its files are written (their sizes and
    modification times); a checkpoint whose files changed afterwards (a save under the same name that died
    half-way) is refused, naming the newest complete checkpoint, before the model is touched."""
    import shutil

    from gradpruner_ds.integrations.hf_trainer import add_gradpruner

    out = tmp_path / "out"
    shutil.copytree(uninterrupted["out"], out)
    assert (out / "checkpoint-6" / "gradpruner" / "complete.json").exists()
    weights = next((out / "checkpoint-6").glob("model*.safetensors"))
    weights.write_bytes(weights.read_bytes())  # rewritten: same content, a new modification time
    model = tiny_llama(6)
    trainer = Trainer(model=model, args=_resume_args(tmp_path / "new", save=False), train_dataset=_Data())
    add_gradpruner(trainer, BLOCK)
    with pytest.raises(ValueError, match=r"must be complete.*checkpoint-8' \(the newest complete one\)"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-6"))
    assert model.config.num_hidden_layers == 6
