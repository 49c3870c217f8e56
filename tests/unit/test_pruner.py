"""GradPruner in one process: scores and merge equal a naive implementation of the formulas, and the
losses after the in-place prune equal a reference that builds the pruned model separately."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import naive
from helpers.tiny import batches, tiny_llama, tiny_llama_config
from transformers import LlamaForCausalLM

from gradpruner_ds.config import GradPrunerConfig
from gradpruner_ds.pruner import GradPruner

WINDOW, STEPS, LR = 3, 9, 1e-3


def lr_lambda(step: int) -> float:
    return min(1.0, (step + 1) / 2) * (1.0 - step / (STEPS + 1))


def make_opt(model):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.01)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)


def train_step(model, opt, sched, batch, pruner=None, record=None):
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if record is not None:
        record(model)
    if pruner is not None:
        pruner.observe()
    opt.step()
    sched.step()
    opt.zero_grad()
    return loss.item()


def _cfg(tmp_path, **kw):
    block = {
        "window_steps": WINDOW,
        "criterion": "igia_sum",  # these tests check the IGIA formulas themselves
        "num_drop": 1,
        "num_merge": 2,
        "keep_fraction": 0.3,
        "output_dir": str(tmp_path),
    }
    block.update(kw)
    return GradPrunerConfig.from_dict(block)


def test_full_mode_matches_naive_reference_and_separately_built_pruned_model(tmp_path):
    data = batches(STEPS, seed=1)
    model = tiny_llama(6)
    ref = copy.deepcopy(model)

    # --- the product: observe, prune in place, go on -----------------------------------------
    opt, sched = make_opt(model)
    pruner = GradPruner(model, _cfg(tmp_path), total_steps=STEPS)
    losses = []
    for step, batch in enumerate(data):
        losses.append(train_step(model, opt, sched, batch, pruner))
        opt, sched = pruner.maybe_prune(opt, sched)
        if step == WINDOW - 1:
            assert pruner.plan is not None
            at_prune = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = pruner.plan
    assert plan is not None and model.config.num_hidden_layers == 3

    # --- the reference: naive formulas, pruned model built from a fresh config ----------------
    ropt, rsched = make_opt(ref)
    grads: list[dict[str, list[torch.Tensor]]] = [{n: [] for n in naive.LINEARS} for _ in range(6)]

    def record(m):
        for i, layer in enumerate(m.model.layers):
            for n in naive.LINEARS:
                grads[i][n].append(layer.get_submodule(n).weight.grad.detach().clone())

    ref_losses = [train_step(ref, ropt, rsched, data[s], record=record) for s in range(WINDOW)]
    assert ref_losses == losses[:WINDOW]
    scores = naive.scores(grads)
    assert plan.scores == pytest.approx(scores, rel=1e-6)
    dropped, merged, targets = naive.plan(scores, 1, 2)
    assert (list(plan.dropped), list(plan.merged), dict(plan.targets)) == (dropped, merged, targets)

    kept = [i for i in range(6) if i not in dropped + merged]
    sd = ref.state_dict()
    new_sd = {k: v for k, v in sd.items() if not k.startswith("model.layers.")}
    for new_i, old_i in enumerate(kept):
        for k, v in sd.items():
            if k.startswith(f"model.layers.{old_i}."):
                new_sd[k.replace(f"model.layers.{old_i}.", f"model.layers.{new_i}.", 1)] = v.clone()
        for n in naive.LINEARS:
            sources = [
                (sd[f"model.layers.{p}.{n}.weight"], naive.topp_mask(naive.igia(grads[p][n]), 0.3))
                for p in merged
                if targets[p] == old_i
            ]
            if sources:
                new_sd[f"model.layers.{new_i}.{n}.weight"] = naive.merge(
                    sd[f"model.layers.{old_i}.{n}.weight"], sources
                )
    pruned_ref = LlamaForCausalLM(tiny_llama_config(len(kept)))
    pruned_ref.load_state_dict(new_sd, strict=False)
    pruned_ref.tie_weights()
    for n, p in pruned_ref.named_parameters():  # merged weights equal the naive merge
        assert torch.allclose(p, at_prune[n], atol=1e-7), n

    # carry Adam state by name, and the LR schedule
    popt, psched = make_opt(pruned_ref)
    old_by_name = dict(ref.named_parameters())
    name_map = {f"model.layers.{ni}.": f"model.layers.{oi}." for ni, oi in enumerate(kept)}
    for n, p in pruned_ref.named_parameters():
        src = n
        for a, b in name_map.items():
            if n.startswith(a):
                src = n.replace(a, b, 1)
                break
        popt.state[p] = {k: v.clone() for k, v in ropt.state[old_by_name[src]].items()}
    psched.load_state_dict(rsched.state_dict())
    for g_new, g_old in zip(popt.param_groups, ropt.param_groups, strict=True):
        g_new["lr"] = g_old["lr"]
    ref_after = [train_step(pruned_ref, popt, psched, data[s]) for s in range(WINDOW, STEPS)]
    assert len(ref_after) >= 5
    assert ref_after == pytest.approx(losses[WINDOW:], abs=1e-6)


def test_optimizer_state_is_carried_not_reset(tmp_path):
    model = tiny_llama(4)
    opt, sched = make_opt(model)
    pruner = GradPruner(model, _cfg(tmp_path, num_merge=0), total_steps=STEPS)
    data = batches(WINDOW, seed=2)
    for batch in data:
        train_step(model, opt, sched, batch, pruner)
    kept_param = model.model.layers[0].self_attn.q_proj.weight
    before = opt.state[kept_param]["exp_avg"].clone()
    n_params_before = sum(len(g["params"]) for g in opt.param_groups)
    opt2, sched2 = pruner.maybe_prune(opt, sched)
    assert opt2 is opt and sched2 is sched
    assert torch.equal(opt.state[kept_param]["exp_avg"], before)
    assert opt.state[kept_param]["step"].item() == WINDOW
    per_layer = len(list(model.model.layers[0].parameters()))
    assert sum(len(g["params"]) for g in opt.param_groups) == n_params_before - per_layer
    assert len(opt.state) == n_params_before - per_layer
    ids = {id(p) for p in model.parameters()}
    assert all(id(p) in ids for g in opt.param_groups for p in g["params"])


def test_lora_mode_scores_masks_and_merge_match_naive_products(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(5)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=list(naive.LINEARS), lora_dropout=0.0)
    )
    with torch.no_grad():  # B starts at 0 in peft; give it values so both factor grads are non-zero
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    layers = model.base_model.model.model.layers
    opt, sched = make_opt(model)
    pruner = GradPruner(model, _cfg(tmp_path, num_drop=1, num_merge=1), total_steps=STEPS)
    assert pruner.mode == "lora"
    grads: list[dict[str, list[torch.Tensor]]] = [{n: [] for n in naive.LINEARS} for _ in range(5)]

    def record(m):
        for i, layer in enumerate(layers):
            for n in naive.LINEARS:
                mod = layer.get_submodule(n)
                b, a = mod.lora_B["default"].weight.grad, mod.lora_A["default"].weight.grad
                grads[i][n].append((b @ a).detach().clone())  # the full product, naively

    for batch in batches(WINDOW, seed=3):
        train_step(model, opt, sched, batch, record=record, pruner=pruner)
    base_before = {
        (i, n): layers[i].get_submodule(n).base_layer.weight.detach().clone()
        for i in range(5)
        for n in naive.LINEARS
    }
    pruner.maybe_prune(opt, sched)
    plan = pruner.plan
    scores = naive.scores(grads)
    assert plan.scores == pytest.approx(scores, rel=1e-5)
    dropped, merged, targets = naive.plan(scores, 1, 1)
    assert (list(plan.dropped), list(plan.merged), dict(plan.targets)) == (dropped, merged, targets)
    p, t = merged[0], targets[merged[0]]
    new_t = list(plan.kept).index(t)
    for n in naive.LINEARS:
        want = naive.merge(
            base_before[(t, n)], [(base_before[(p, n)], naive.topp_mask(naive.igia(grads[p][n]), 0.3))]
        )
        got = model.base_model.model.model.layers[new_t].get_submodule(n).base_layer.weight
        assert torch.allclose(got, want, atol=1e-7), n
    # pruned layers' adapters left the optimizer; kept adapters still train
    assert len(model.base_model.model.model.layers) == 3
    trainable = {id(q) for q in model.parameters() if q.requires_grad}
    assert {id(q) for g in opt.param_groups for q in g["params"]} == trainable


def test_report_plot_and_plan_files(tmp_path):
    model = tiny_llama(6)
    opt, sched = make_opt(model)
    pruner = GradPruner(model, _cfg(tmp_path), total_steps=STEPS)
    for batch in batches(WINDOW):
        train_step(model, opt, sched, batch, pruner)
    pruner.maybe_prune(opt, sched)
    report = json.loads((tmp_path / "gradpruner_report.json").read_text())
    assert [row["status"] for row in report["layers"]].count("dropped") == 1
    assert sum(row["status"].startswith("merged->") for row in report["layers"]) == 2
    assert report["params_after"] < report["params_before"]
    assert report["observed_steps"] == WINDOW and report["skipped_steps"] == 0
    assert len(report["merge"]) == 2 * 7
    for m in report["merge"]:
        assert 0.3 <= m["mask_density"] < 0.31  # ties are rare in random IGIA
        assert 0 < m["merged_density"] <= m["mask_density"]
    assert (tmp_path / "gradpruner_scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from gradpruner_ds.core.plan import PrunePlan

    assert PrunePlan.from_json((tmp_path / "gradpruner_plan.json").read_text()) == pruner.plan
    assert model.config.gradpruner["kept_layers"] == list(pruner.plan.kept)


def test_non_finite_steps_are_skipped_and_counted(tmp_path):
    model = tiny_llama(4)
    opt, sched = make_opt(model)
    pruner = GradPruner(model, _cfg(tmp_path, num_merge=0, output_dir=None), total_steps=STEPS)
    for i, batch in enumerate(batches(WINDOW)):
        loss = model(**batch).loss
        loss.backward()
        if i == 1:
            model.model.layers[2].mlp.up_proj.weight.grad[0, 0] = float("nan")
        pruner.observe()
        opt.zero_grad()
    pruner.maybe_prune(opt, sched)
    assert pruner.plan.observed_steps == WINDOW - 1 and pruner.plan.skipped_steps == 1


def test_all_steps_non_finite_is_a_clear_error(tmp_path):
    model = tiny_llama(4)
    pruner = GradPruner(model, _cfg(tmp_path, num_merge=0), total_steps=STEPS)
    for batch in batches(WINDOW):
        model(**batch).loss.backward()
        model.model.layers[0].mlp.up_proj.weight.grad.fill_(float("inf"))
        pruner.observe()
        model.zero_grad()
    with pytest.raises(
        ValueError, match="^gradpruner: the observation window must contain at least one step"
    ):
        pruner.maybe_prune()
    assert len(model.model.layers) == 4 and not (tmp_path / "gradpruner_report.json").exists()


def test_bad_model_and_mode_errors(tmp_path):
    model = tiny_llama(4)
    with pytest.raises(ValueError, match="^gradpruner: mode 'lora' needs peft LoRA adapters"):
        GradPruner(model, _cfg(tmp_path, mode="lora", num_merge=0), total_steps=STEPS)
    with pytest.raises(ValueError, match="^gradpruner: the budget must leave at least 1"):
        GradPruner(model, _cfg(tmp_path, num_drop=3, num_merge=1), total_steps=STEPS)
    with pytest.raises(ValueError, match="^gradpruner: the observation window must end before"):
        GradPruner(model, _cfg(tmp_path, num_merge=0), total_steps=WINDOW)
    for p in model.model.layers[1].parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="^gradpruner: mode 'full' reads the true gradients"):
        GradPruner(model, _cfg(tmp_path, num_merge=0), total_steps=STEPS)


def test_few_valid_steps_warn(tmp_path, caplog):
    import logging

    model = tiny_llama(4)
    opt, sched = make_opt(model)
    pruner = GradPruner(model, _cfg(tmp_path, num_merge=0, output_dir=None), total_steps=STEPS)
    logging.getLogger("gradpruner_ds").propagate = True
    try:
        with caplog.at_level(logging.WARNING, logger="gradpruner_ds"):
            for i, batch in enumerate(batches(WINDOW)):
                model(**batch).loss.backward()
                if i < 2:
                    model.model.layers[1].mlp.up_proj.weight.grad[0, 0] = float("inf")
                pruner.observe()
                opt.zero_grad()
            pruner.maybe_prune(opt, sched)
    finally:
        logging.getLogger("gradpruner_ds").propagate = False
    assert pruner.plan.observed_steps == 1 and pruner.plan.skipped_steps == 2
    assert any("only 1 of 3 observed steps had finite gradients" in r.getMessage() for r in caplog.records)


def test_laco_merge_rule_adds_unmasked_differences(tmp_path):
    model = tiny_llama(5)
    opt, sched = make_opt(model)
    pruner = GradPruner(
        model,
        _cfg(tmp_path, num_drop=1, num_merge=2, merge_rule="laco", criterion="igia_sum"),
        total_steps=STEPS,
    )
    for batch in batches(WINDOW, seed=3):
        train_step(model, opt, sched, batch, pruner=pruner)
    layers = model.model.layers
    before = {
        (i, n): layers[i].get_submodule(n).weight.detach().clone() for i in range(5) for n in naive.LINEARS
    }
    pruner.maybe_prune(opt, sched)
    plan = pruner.plan
    by_target: dict[int, list[int]] = {}
    for p, t in plan.targets:
        by_target.setdefault(t, []).append(p)
    for t, sources in by_target.items():
        new_t = list(plan.kept).index(t)
        for n in naive.LINEARS:
            want = before[(t, n)] + sum(before[(p, n)] - before[(t, n)] for p in sources)
            assert torch.allclose(model.model.layers[new_t].get_submodule(n).weight, want, atol=1e-6), n
    assert plan.extra["merge_rule"] == "laco"
    assert all(s["mask_density"] == 1.0 for s in pruner.report["merge"])


def test_maybe_prune_returns_the_objects_to_use_from_now_on():
    """One meaning on every engine: a Continue(stepper, lr_scheduler) that unpacks like the given pair."""
    from helpers.tiny import batches, tiny_llama

    from gradpruner_ds.config import GradPrunerConfig
    from gradpruner_ds.pruner import Continue, GradPruner

    model = tiny_llama(4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    p = GradPruner(model, GradPrunerConfig.from_dict({"window_steps": 1, "num_drop": 1, "progress_bar": False}))
    model(**batches(1)[0]).loss.backward()
    p.observe()
    out = p.maybe_prune(opt, sched)
    assert isinstance(out, Continue) and out.stepper is opt and out.lr_scheduler is sched
    stepper, scheduler = out
    assert stepper is opt and scheduler is sched and p.plan is not None
