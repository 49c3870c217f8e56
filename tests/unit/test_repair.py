"""Least-squares repair of the cut (``repair``): the math against closed forms, the sums against an independent
computation on a real HF model, the fold, the phase between plan and prune, resume inside it, and every
refusal."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers.tiny import batches, tiny_llama

from gradpruner_ds.checkpoint import load_pruner_state, save_pruner_state
from gradpruner_ds.config import GradPrunerConfig
from gradpruner_ds.core.repair import fold, removed_runs, residuals, solve_map
from gradpruner_ds.errors import GradPrunerError
from gradpruner_ds.pruner import GradPruner

WINDOW, REPAIR, STEPS = 2, 3, 8


def _cfg(**kw) -> GradPrunerConfig:
    block = {"window_steps": WINDOW, "layers_to_remove": [2, 3, 5], "progress_bar": False,
             "repair": {"steps": REPAIR, "ridge": 1e-3}}  # fmt: skip
    block.update(kw)
    return GradPrunerConfig.from_dict(block)


# ---- the math -----------------------------------------------------------------------------------------
def test_removed_runs():
    assert removed_runs([5, 2, 3, 9, 10, 11]) == [(2, 4), (5, 6), (9, 12)]
    assert removed_runs([0]) == [(0, 1)]


def test_solve_map_recovers_a_linear_map_and_the_residuals_match_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g, dtype=torch.float64)
    t0 = torch.randn(6, 6, generator=g, dtype=torch.float64)
    y = x @ t0 + 0.01 * torch.randn(500, 6, generator=g, dtype=torch.float64)
    a, b, c = x.T @ x, x.T @ y, float((y * y).sum())
    t = solve_map(a, b, ridge=0.0)
    torch.testing.assert_close(t, torch.linalg.lstsq(x, y).solution)
    plain, fitted = residuals(a, b, c, t)
    assert plain == pytest.approx(float(((y - x) ** 2).sum()), rel=1e-9)
    assert fitted == pytest.approx(float(((y - x @ t) ** 2).sum()), rel=1e-6)
    # ridge toward the identity: a huge ridge is plain removal (T = I); toward zero it shrinks T to 0
    torch.testing.assert_close(solve_map(a, b, 1e9, "identity"), torch.eye(6, dtype=torch.float64), atol=1e-6, rtol=0)
    assert solve_map(a, b, 1e9, "zero").abs().max() < 1e-6
    # the diagonal map: per channel least squares
    td = solve_map(torch.diagonal(a), torch.diagonal(b), 0.0)
    torch.testing.assert_close(td, (x * y).sum(0) / (x * x).sum(0))
    plain_d, fitted_d = residuals(torch.diagonal(a), torch.diagonal(b), c, td)
    assert plain_d == pytest.approx(plain, rel=1e-9)
    assert fitted_d == pytest.approx(float(((y - x * td) ** 2).sum()), rel=1e-6)


def test_fold_turns_the_writer_output_x_into_x_t():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 10, generator=g, dtype=torch.float64)  # [d_out = residual channels, d_in]
    z = torch.randn(4, 10, generator=g, dtype=torch.float64)
    t = torch.randn(6, 6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(z @ fold(w, t).T, (z @ w.T) @ t)
    d = torch.randn(6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(z @ fold(w, d).T, (z @ w.T) * d)


# ---- the phase in a training loop --------------------------------------------------------------------
def _train(model, pruner, data, opt, start=0, stop=None):
    losses = []
    for b in data[start:stop]:
        out = model(**b)
        out.loss.backward()
        pruner.observe()
        opt.step()
        opt.zero_grad()
        losses.append(float(out.loss.detach()))
        opt, _ = pruner.maybe_prune(opt)
    return losses, opt


def _naive_sums(model, data, runs):
    """A, B, c, tokens of every run, from output_hidden_states and a hook of our own on the MLP."""
    mlp_out = {}
    hooks = [
        model.model.layers[s - 1].mlp.register_forward_hook(lambda m, a, o, s=s: mlp_out.__setitem__(s, o.detach()))
        for s, _ in runs
    ]
    sums = {r: [0, 0, 0.0, 0] for r in runs}
    with torch.no_grad():
        for b in data:
            hs = model(**b, output_hidden_states=True).hidden_states  # hs[k]: the input of layer k
            mask = b.get("attention_mask", torch.ones(b["input_ids"].shape)).reshape(-1).bool()
            for s, e in runs:
                x = mlp_out[s].double().reshape(-1, 32)[mask]
                y = (hs[e].double() - hs[s].double()).reshape(-1, 32)[mask] + x
                acc = sums[(s, e)]
                acc[0] = acc[0] + x.T @ x
                acc[1] = acc[1] + x.T @ y
                acc[2] += float((y * y).sum())
                acc[3] += int(mask.sum())
    for h in hooks:
        h.remove()
    return sums


def test_the_fold_is_the_map_of_the_repair_steps_sums_and_only_the_writers_change():
    """lr 0: the model is the same during the repair steps, so the maps can be recomputed independently from
    the same batches; the pruned model's kept layers equal the dense ones but for the folded down_proj."""
    model = tiny_llama(7)
    data = batches(STEPS, seq=10)
    for b in data[WINDOW : WINDOW + REPAIR]:  # padding in the calibration batches
        b["attention_mask"] = torch.ones_like(b["input_ids"])
        b["attention_mask"][0, 7:] = 0
        b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    runs = [(2, 4), (5, 6)]
    naive = _naive_sums(model, data[WINDOW : WINDOW + REPAIR], runs)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    pruner = GradPruner(model, _cfg(), total_steps=STEPS)
    _train(model, pruner, data, opt, stop=WINDOW + REPAIR)
    assert pruner.plan is not None and list(pruner.plan.removed) == [2, 3, 5]
    report = pruner.report["repair"]
    assert [r["layers"] for r in report["runs"]] == [[2, 3], [5]]
    assert [r["folded_into"] for r in report["runs"]] == [1, 4]
    kept = [0, 1, 4, 6]
    for r, (s, e) in zip(report["runs"], runs, strict=True):
        a, b, c, tokens = naive[(s, e)]
        assert r["tokens"] == tokens == REPAIR * (4 * 10 - 3)  # the padded positions are not counted
        t = solve_map(a, b, 1e-3)
        plain, fitted = residuals(a, b, c, t)
        assert r["residual_plain"] == pytest.approx(plain, rel=1e-6)
        assert r["residual_repaired"] == pytest.approx(fitted, rel=1e-6)
        assert 0.0 < r["explained"] < 1.0
        new = model.model.layers[kept.index(s - 1)].mlp.down_proj.weight
        expect = fold(before[f"model.layers.{s - 1}.mlp.down_proj.weight"], t).float()
        torch.testing.assert_close(new.data, expect, rtol=1e-5, atol=1e-6)
    for i, orig in enumerate(kept):  # nothing else changed
        for name, p in model.model.layers[i].named_parameters():
            if not (name == "mlp.down_proj.weight" and orig in (1, 4)):
                assert torch.equal(p.data, before[f"model.layers.{orig}.{name}"]), (orig, name)


def test_the_phase_keeps_the_model_dense_then_prunes_and_resets_the_folded_moments():
    model = tiny_llama(7)
    data = batches(STEPS, seq=10)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pruner = GradPruner(model, _cfg(), total_steps=STEPS)
    states = []
    for b in data:
        model(**b).loss.backward()
        pruner.observe()
        opt.step()
        opt.zero_grad()
        opt, _ = pruner.maybe_prune(opt)
        states.append((pruner.observing, pruner.repairing, len(model.model.layers)))
    assert states[:WINDOW] == [(True, False, 7)] * (WINDOW - 1) + [(True, True, 7)]
    assert states[WINDOW : WINDOW + REPAIR - 1] == [(True, True, 7)] * (REPAIR - 1)
    assert states[WINDOW + REPAIR - 1 :] == [(False, False, 4)] * (STEPS - WINDOW - REPAIR + 1)
    assert pruner.plan.step == WINDOW  # planned at the window's end, cut after the repair steps
    # the step counts stay those of the run (the reset zeroes the moments only: test below)
    folded = model.model.layers[1].mlp.down_proj.weight
    other = model.model.layers[1].mlp.up_proj.weight
    assert int(opt.state[folded]["step"]) == int(opt.state[other]["step"]) == STEPS


def test_carry_keeps_the_moments_and_reset_zeroes_them():
    results = {}
    for mode in ("reset", "carry"):
        model = tiny_llama(7)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        cfg = _cfg(repair={"steps": REPAIR, "optimizer_state": mode})
        pruner = GradPruner(model, cfg, total_steps=STEPS)
        _train(model, pruner, batches(STEPS, seq=10), opt, stop=WINDOW + REPAIR)
        results[mode] = float(opt.state[model.model.layers[1].mlp.down_proj.weight]["exp_avg_sq"].sum())
        assert float(opt.state[model.model.layers[1].mlp.up_proj.weight]["exp_avg_sq"].sum()) > 0
    assert results["reset"] == 0.0 and results["carry"] > 0.0


def test_the_diagonal_map_and_float32_sums_repair_too():
    for extra in ({"map": "diagonal"}, {"dtype": "float32"}):
        model = tiny_llama(7)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        pruner = GradPruner(model, _cfg(repair={"steps": REPAIR, **extra}), total_steps=STEPS)
        losses, _ = _train(model, pruner, batches(STEPS, seq=10), opt)
        assert all(r["explained"] > 0 for r in pruner.report["repair"]["runs"]), extra
        assert all(x == x for x in losses)


def test_activation_checkpointing_counts_every_token_once():
    sums = []
    for reentrant in (None, False, True):  # no checkpointing, then both of transformers' modes
        model = tiny_llama(7)
        model.train()
        if reentrant is not None:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        pruner = GradPruner(model, _cfg(), total_steps=STEPS)
        _train(model, pruner, batches(STEPS, seq=10), opt, stop=WINDOW + REPAIR)
        sums.append([v for r in pruner.report["repair"]["runs"] for v in (r["tokens"], r["residual_plain"])])
    assert sums[0] == pytest.approx(sums[1], rel=1e-6) and sums[0] == pytest.approx(sums[2], rel=1e-6)
    assert sums[0][0] == REPAIR * 4 * 10


def test_a_run_starting_at_layer_0_is_removed_unrepaired_with_a_warning(caplog):
    model = tiny_llama(7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pruner = GradPruner(model, _cfg(layers_to_remove=[0, 1, 4]), total_steps=STEPS)
    with caplog.at_level(logging.WARNING, logger="gradpruner"):
        _train(model, pruner, batches(STEPS, seq=10), opt)
    assert "starts at layer 0" in caplog.text
    rep = pruner.report["repair"]
    assert rep["unrepaired_runs"] == [[0, 2]]
    assert [r["layers"] for r in rep["runs"]] == [[4]]


def test_resume_inside_the_repair_phase_is_exact(tmp_path):
    data = batches(STEPS, seq=10)
    model = tiny_llama(7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pruner = GradPruner(model, _cfg(), total_steps=STEPS)
    straight, _ = _train(model, pruner, data, opt)

    model = tiny_llama(7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pruner = GradPruner(model, _cfg(), total_steps=STEPS)
    stop = WINDOW + 1  # inside the repair phase
    first, opt = _train(model, pruner, data, opt, stop=stop)
    assert pruner.repairing
    save_pruner_state(pruner, tmp_path)
    weights, opt_state = model.state_dict(), opt.state_dict()

    model = tiny_llama(7)
    model.load_state_dict(weights)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.load_state_dict(opt_state)
    pruner = GradPruner(model, _cfg(), total_steps=STEPS)
    assert load_pruner_state(pruner, tmp_path) is None
    assert pruner.repairing and pruner.repairer.steps_seen == 1
    rest, _ = _train(model, pruner, data, opt, start=stop)
    assert first + rest == pytest.approx(straight, abs=1e-6)
    assert pruner.report["repair"]["runs"][0]["tokens"] == REPAIR * 40


def test_refusals_before_any_work():
    with pytest.raises(GradPrunerError, match="repair.*num_merge > 0"):
        GradPrunerConfig.from_dict({"window_steps": 2, "num_drop": 2, "num_merge": 1, "repair": {"steps": 2}})
    with pytest.raises(GradPrunerError, match="repair.*observe_only"):
        GradPrunerConfig.from_dict({"window_steps": 2, "num_drop": 2, "observe_only": True, "repair": {"steps": 2}})
    with pytest.raises(GradPrunerError, match="repair.steps"):
        GradPrunerConfig.from_dict({"window_steps": 2, "num_drop": 2, "repair": {"steps": 0}})
    with pytest.raises(GradPrunerError, match="did you mean 'ridge'"):
        GradPrunerConfig.from_dict({"window_steps": 2, "num_drop": 2, "repair": {"steps": 2, "ridg": 1}})
    from transformers import Gemma2Config, Gemma2ForCausalLM

    gemma = Gemma2ForCausalLM(
        Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8)
    )  # fmt: skip
    with pytest.raises(GradPrunerError, match="normalises its MLP branch"):
        GradPruner(gemma, GradPrunerConfig.from_dict({"window_steps": 2, "num_drop": 1, "repair": {"steps": 2}}))
    assert not any(m._forward_hooks for m in gemma.modules())  # nothing left behind
