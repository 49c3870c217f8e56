"""In-job recovery by self-distillation: the pre-prune model as a frozen teacher for K steps after the
prune, then freed; the KL term against an independent computation; resume during the distillation."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny import batches, tiny_llama

from gradpruner_ds.checkpoint import load_pruner_state, save_pruner_state
from gradpruner_ds.config import GradPrunerConfig
from gradpruner_ds.errors import GradPrunerError
from gradpruner_ds.pruner import GradPruner
from gradpruner_ds.recovery import distill_kl

K, WINDOW, STEPS = 3, 2, 7


def _cfg(**kw) -> GradPrunerConfig:
    return GradPrunerConfig.from_dict(
        {"window_steps": WINDOW, "num_drop": 2, "progress_bar": False,
         "recovery": {"distill_steps": K, "temperature": 2.0, "weight": 0.5}, **kw}
    )  # fmt: skip


def test_distill_kl_matches_an_independent_kl():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    T = 2.0
    ref = torch.nn.KLDivLoss(reduction="none")(torch.log_softmax(s / T, -1), torch.softmax(t / T, -1)).sum(
        -1
    )  # KL(teacher || student) per position
    expect = ref[mask].mean() * T * T
    assert distill_kl(s, t, mask, T).item() == pytest.approx(expect.item(), rel=1e-6)


def _run(model, pruner, data, opt, start=0, stop=None):
    losses, task = [], []
    for i, b in enumerate(data[start:stop], start=start):
        out = model(**b)
        loss = pruner.distill(out.loss, out.logits, b)
        loss.backward()
        pruner.observe()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
        task.append(float(out.loss))
        if i + 1 == WINDOW:  # the model the teacher must equal
            with torch.no_grad():
                pre = model(**data[-1]).logits.clone()
        opt, _ = pruner.maybe_prune(opt)
        if i + 1 == WINDOW:
            with torch.no_grad():
                teacher = pruner.distiller.teacher(**{"input_ids": data[-1]["input_ids"]}).logits
            torch.testing.assert_close(teacher, pre)
    return losses, task, opt


def test_the_teacher_is_the_pre_prune_model_for_k_steps_then_freed():
    data = batches(STEPS, seed=4)
    model = tiny_llama(6)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pruner = GradPruner(model, _cfg(), total_steps=STEPS)
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # the tied head counted once
    losses, task, opt = _run(model, pruner, data, opt)
    assert pruner.plan is not None and model.config.num_hidden_layers == 4
    # the KL term is in the loss exactly for the K steps after the prune
    distilled = [abs(a - b) > 1e-9 for a, b in zip(losses, task, strict=True)]
    assert distilled == [False] * WINDOW + [True] * K + [False] * (STEPS - WINDOW - K)
    assert not pruner.distiller.active and pruner.distiller.steps_done == K
    assert pruner.report["recovery"]["teacher_bytes"] == dense_bytes  # the pre-prune model's weights, once
    live = {id(p) for g in opt.param_groups for p in g["params"]}
    assert len(live) == sum(1 for _ in model.parameters())  # the teacher never reached the optimizer


def test_resume_during_the_distillation_gives_the_uninterrupted_losses(tmp_path):
    data = batches(STEPS, seed=4)
    model = tiny_llama(6)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    whole = GradPruner(model, _cfg(), total_steps=STEPS)
    expect, _, _ = _run(model, whole, data, opt)

    model = tiny_llama(6)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = GradPruner(model, _cfg(), total_steps=STEPS)
    stop = WINDOW + 1  # one distilled step done
    losses, _, opt = _run(model, first, data, opt, stop=stop)
    save_pruner_state(first, tmp_path / "ck")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    opt_state = opt.state_dict()

    dense = tiny_llama(6)  # a new process: the dense model, the pruner's state, then the engine's
    dense.train()
    resumed = GradPruner(dense, _cfg(), total_steps=STEPS)
    plan = load_pruner_state(resumed, tmp_path / "ck")
    assert plan is not None and resumed.distiller is not None and resumed.distiller.steps_done == 1
    resumed.replay(plan)
    dense.load_state_dict(weights)
    opt = torch.optim.AdamW(dense.parameters(), lr=1e-3)
    opt.load_state_dict(opt_state)
    rest, _, _ = _run(dense, resumed, data, opt, start=stop)
    assert losses + rest == pytest.approx(expect, abs=1e-6)


def test_recovery_is_refused_before_any_work_when_the_engine_cannot_hold_a_teacher():
    """ZeRO-3 with a DoRA model: the teacher is rebuilt from the base model's class with plain LoRA merged in,
    which DoRA is not; the pruner refuses at construction, before any hook or statistic exists."""
    from peft import LoraConfig, get_peft_model

    from gradpruner_ds.backends.zero3 import Zero3Backend

    class Engine:  # what Zero3Backend reads of a ZeRO-3 engine, around a peft model
        module = get_peft_model(tiny_llama(4), LoraConfig(use_dora=True))

    class TwoZero3Ranks(Zero3Backend):  # the real adapter's refusal, without a process group
        def __new__(cls):
            return object.__new__(cls)

        def __init__(self):
            self.rank, self.world_size = 0, 2
            self.teacher_refused = Zero3Backend.refusal(Engine.module)

        def check_settings(self, settings, timeout_s):
            self.timeout_s = timeout_s

    model = Engine.module
    with pytest.raises(GradPrunerError, match="recovery .* needs a teacher laid out like the student: .*not a plain LoRA"):
        GradPruner(model, _cfg(), total_steps=STEPS, backend=TwoZero3Ranks())
    assert not any(layer._forward_hooks for layer in model.base_model.model.model.layers)  # before any hook
    assert Zero3Backend.refusal(tiny_llama(4)) is None
    assert Zero3Backend.refusal(get_peft_model(tiny_llama(4), LoraConfig())) is None  # plain LoRA: merged in


def test_a_loop_that_never_calls_distill_is_warned_about(caplog):
    """A 'recovery' block with a loop (or the HF Trainer) that does not add the term: one warning, not a
    silent run without distillation."""
    import logging

    data = batches(STEPS, seed=4)
    model = tiny_llama(6)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pruner = GradPruner(model, _cfg(), total_steps=STEPS)
    logging.getLogger("gradpruner_ds").propagate = True
    try:
        with caplog.at_level(logging.WARNING, logger="gradpruner_ds"):
            for b in data:
                model(**b).loss.backward()
                pruner.observe()
                opt.step()
                opt.zero_grad()
                opt, _ = pruner.maybe_prune(opt)
    finally:
        logging.getLogger("gradpruner_ds").propagate = False
    warned = [r for r in caplog.records if "added no distillation term" in r.getMessage()]
    assert len({id(r) for r in warned}) == 1 and not pruner.distiller.active  # once (caplog may list it twice)


def test_the_teacher_copy_carries_no_hooks_and_the_student_keeps_them():
    """An engine's or a statistic's hook copied into the teacher would run on the teacher's forward (a copy
    of the engine, the student's statistics fed the teacher's activations): the copy has none, the model
    keeps every one."""
    from gradpruner_ds.backends.plain import Backend

    model = tiny_llama(4)
    seen = []
    layer = model.model.layers[1]
    layer.register_forward_hook(lambda m, i, o: seen.append(1))
    layer.self_attn.register_forward_pre_hook(lambda m, a, k: seen.append(2), with_kwargs=True)
    teacher = Backend().make_teacher(model)
    assert all(not p.requires_grad for p in teacher.parameters())
    ids = batches(1, seed=0)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(teacher(input_ids=ids).logits, model(input_ids=ids).logits)
    assert seen == [2, 1]  # the student's hooks ran once, the teacher's forward ran none
    assert layer._forward_hooks and layer.self_attn._forward_pre_hooks_with_kwargs


def test_the_distillation_is_logged_and_a_k_beyond_the_run_is_warned_about(caplog):
    import logging

    logging.getLogger("gradpruner_ds").propagate = True
    try:
        with caplog.at_level(logging.INFO, logger="gradpruner_ds"):
            GradPruner(tiny_llama(6), _cfg(recovery={"distill_steps": 9}), total_steps=STEPS)
            beyond = [r.getMessage() for r in caplog.records if "follow the prune" in r.getMessage()]
            assert beyond and "distill_steps is 9 but only 5 steps follow the prune" in beyond[0]
            caplog.clear()
            data = batches(STEPS, seed=4)
            model = tiny_llama(6)
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            _run(model, GradPruner(model, _cfg(), total_steps=STEPS), data, opt)
    finally:
        logging.getLogger("gradpruner_ds").propagate = False
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("recovery:")]
    assert "loss = (1 - 0.5) * task loss + 0.5 * T^2 * KL" in said[0] and "teacher freed" in said[-1]
    assert not [r for r in caplog.records if "follow the prune" in r.getMessage()]


def test_fsdp2_teacher_rebuild_accepts_plain_lora_and_names_what_it_cannot_merge():
    """Under FSDP2 the teacher is the base model rebuilt from its config with plain LoRA merged in; DoRA and
    modules_to_save are refused before any work (with the layer named)."""
    from peft import LoraConfig, get_peft_model

    from gradpruner_ds.peft_support import teacher_refusal

    assert teacher_refusal(tiny_llama(4)) is None
    assert teacher_refusal(get_peft_model(tiny_llama(4), LoraConfig())) is None  # peft's defaults
    dora = teacher_refusal(get_peft_model(tiny_llama(4), LoraConfig(use_dora=True)))
    assert dora is not None and "not a plain LoRA Linear" in dora
    saved = teacher_refusal(get_peft_model(tiny_llama(4), LoraConfig(modules_to_save=["lm_head"])))
    assert saved is not None and "modules_to_save" in saved
