"""The activation and static criteria: hand-computed values, exact shard additivity, and the pruner
integration (hooks live only during the window)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from helpers.tiny import VOCAB, batches, tiny_llama

from gradpruner_ds.config import GradPrunerConfig
from gradpruner_ds.core.criteria import CRITERIA, ScoreContext, layer_scores
from gradpruner_ds.core.plan import select_layers
from gradpruner_ds.errors import GradPrunerError
from gradpruner_ds.pruner import GradPruner
from gradpruner_ds.statistics import HiddenStateStatistic, LayerGateStatistic
from gradpruner_ds.statistics.hidden_states import pair_stats


def test_pair_stats_known_cosines():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    b = torch.tensor([[0.0, 3.0], [1.0, 1.0], [-1.0, 0.0], [5.0, 0.0]])
    # cos = 0, 1/sqrt2, -1, 1  ->  1-cos = 1, 1-1/sqrt2, 2, 0 ; angle/pi = 1/2, 1/4, 1, 0
    out = pair_stats(a, b)
    assert out[0].item() == pytest.approx(1 + (1 - 1 / math.sqrt(2)) + 2 + 0)
    assert out[1].item() == pytest.approx(0.5 + 0.25 + 1.0 + 0.0, abs=1e-6)
    assert out[2].item() == 4
    masked = pair_stats(a, b, torch.tensor([1, 0, 1, 0]))
    assert masked.tolist() == pytest.approx([3.0, 1.5, 2.0], abs=1e-6)


def _ctx(num_layers, **kw):
    return ScoreContext(num_layers, ("self_attn.o_proj", "mlp.down_proj"), **kw)


def test_shortgpt_bi_is_the_mean_one_minus_cos():
    # 3 layers, 10 tokens each; sums of (1 - cos): 2, 0.5, 4 -> BI = 0.2, 0.05, 0.4
    table = torch.tensor([[2.0, 0.5, 4.0], [9.0, 9.0, 9.0], [10.0, 10.0, 10.0]], dtype=torch.float64)
    scores = layer_scores(table, [], "shortgpt_bi", _ctx(3, spans=(1,)))
    assert scores == pytest.approx([0.2, 0.05, 0.4])
    assert select_layers(scores, 1, 0)[0] == [1]


def test_angular_removes_the_closest_contiguous_block():
    # 4 layers, budget 2: blocks start at 0, 1, 2 with mean angular distance 0.3, 0.1, 0.2
    counts = [5.0] * 4
    ang_sums = [1.5, 0.5, 1.0, 0.0]
    table = torch.tensor([[0.0] * 4, ang_sums, counts], dtype=torch.float64)
    scores = layer_scores(table, [], "angular", _ctx(4, budget=2, spans=(2,)))
    assert scores[1] == pytest.approx(0.1) and scores[2] == pytest.approx(0.1)
    assert scores[0] == pytest.approx(0.3)  # only block 0 contains layer 0
    assert scores[3] == pytest.approx(0.2)  # only block 2 contains layer 3
    dropped, _ = select_layers(scores, 2, 0)
    assert sorted(dropped) == [1, 2]


def test_angular_tie_elsewhere_never_splits_the_block():
    # blocks 0 and 2 have the same distance: the first (block 0) wins, layer 2 must stay above it
    table = torch.tensor([[0.0] * 4, [0.1, 0.5, 0.1, 0.0], [1.0] * 4], dtype=torch.float64)
    scores = layer_scores(table, [], "angular", _ctx(4, budget=2, spans=(2,)))
    assert sorted(select_layers(scores, 2, 0)[0]) == [0, 1]
    assert scores[2] > scores[1]


def test_reverse_and_random():
    assert layer_scores(torch.zeros(1, 5), [], "reverse", _ctx(5)) == [5.0, 4.0, 3.0, 2.0, 1.0]
    assert sorted(select_layers(layer_scores(torch.zeros(1, 5), [], "reverse", _ctx(5)), 2, 0)[0]) == [3, 4]
    r0 = layer_scores(torch.zeros(1, 8), [], "random", _ctx(8, seed=0))
    assert sorted(r0) == [float(i) for i in range(1, 9)]
    assert r0 == layer_scores(torch.zeros(1, 8), [], "random", _ctx(8, seed=0))
    assert r0 != layer_scores(torch.zeros(1, 8), [], "random", _ctx(8, seed=1))


def test_registered_sources():
    assert CRITERIA["igia_sum"].reads == ("igia",)
    assert CRITERIA["shortgpt_bi"].reads == ("hidden_states",) and CRITERIA["angular"].reads == ("hidden_states",)
    assert CRITERIA["reverse"].reads == () and CRITERIA["random"].reads == ()
    assert CRITERIA["angular"].spans is not None and CRITERIA["angular"].spans(3) == (3,)


def _padded_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (4, 10), generator=g)
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[1, 7:] = 0
    mask[3, 4:] = 0
    return ids, mask


def test_collector_matches_hidden_states_and_ignores_padding():
    model = tiny_llama(4)
    model.train()
    col = HiddenStateStatistic(model, spans=(1, 2))
    ids, mask = _padded_batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert col.partial_table().abs().sum().item() == 0.0  # pending until the step is committed
    col.update(True)
    hs = out.hidden_states  # hs[l] = input of layer l for l < 4 (hs[4] is after the final norm)
    table = col.partial_table()
    col.close()
    n = float(mask.sum())
    assert table[-1].tolist() == [n] * 4
    for layer in range(3):  # span 1 blocks whose output is an un-normed hidden state
        expect = pair_stats(hs[layer], hs[layer + 1], mask)
        assert table[0, layer].item() == pytest.approx(expect[0].item(), rel=1e-5)
        assert table[1, layer].item() == pytest.approx(expect[1].item(), rel=1e-5)
    for start in range(2):  # span 2
        expect = pair_stats(hs[start], hs[start + 2], mask)
        assert table[2, start].item() == pytest.approx(expect[0].item(), rel=1e-5)
        assert table[3, start].item() == pytest.approx(expect[1].item(), rel=1e-5)
    assert table[2, 3].item() == 0.0  # a span-2 block cannot start at the last layer


def test_collector_tables_of_two_shards_add_up_to_the_whole_batch():
    model = tiny_llama(4)
    model.train()
    ids, mask = _padded_batch(1)
    whole = HiddenStateStatistic(model, spans=(1, 3))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    whole.update(True)
    t_whole = whole.partial_table()
    whole.close()
    parts = []
    for sl in (slice(0, 2), slice(2, 4)):
        col = HiddenStateStatistic(model, spans=(1, 3))
        with torch.no_grad():
            model(input_ids=ids[sl], attention_mask=mask[sl])
        col.update(True)
        parts.append(col.partial_table())
        col.close()
    torch.testing.assert_close(parts[0] + parts[1], t_whole, rtol=1e-5, atol=1e-6)


def test_collector_skips_eval_forwards_and_removes_its_hooks():
    model = tiny_llama(3)
    col = HiddenStateStatistic(model, spans=(1,))
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    col.update(True)
    assert col.partial_table().abs().sum().item() == 0.0
    col.close()
    assert all(not layer._forward_hooks for layer in model.model.layers)
    assert not model._forward_pre_hooks


@pytest.mark.parametrize("criterion", ["shortgpt_bi", "angular", "gate_fisher", "reverse", "random"])
def test_pruner_with_non_igia_criteria(tmp_path, criterion):
    steps, window = 4, 2
    model = tiny_llama(6)
    model.train()
    cfg = GradPrunerConfig.from_dict(
        {
            "window_steps": window,
            "num_drop": 2,
            "criterion": criterion,
            "output_dir": str(tmp_path),
            "plot": False,
        }
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pruner = GradPruner(model, cfg, total_steps=steps, seed=3)
    for batch in batches(steps, seed=2):
        model(**batch).loss.backward()
        pruner.observe()
        opt.step()
        opt.zero_grad()
        opt, _ = pruner.maybe_prune(opt)
    assert pruner.plan is not None and len(pruner.plan.removed) == 2
    assert model.config.num_hidden_layers == 4
    assert pruner.statistics == {}
    assert all(not layer._forward_hooks for layer in model.model.layers)
    assert not model._forward_pre_hooks and not model._forward_hooks
    if criterion == "reverse":
        assert sorted(pruner.plan.removed) == [4, 5]
    if criterion == "angular":
        assert sorted(pruner.plan.removed) in ([i, i + 1] for i in range(5))


def test_gate_fisher_is_the_mean_squared_gate_gradient():
    # 2 layers; per-sequence gate gradients: layer 0: (1, -3) -> mean s^2 = 5 ; layer 1: (0.5, 0.5) -> 0.25
    table = torch.tensor([[10.0, 0.5], [-2.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    scores = layer_scores(table, [], "gate_fisher", _ctx(2))
    assert scores == pytest.approx([5.0, 0.25])
    assert CRITERIA["gate_fisher"].reads == ("layer_gates",)


def _sum_loss(model, ids, mask):
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    tgt = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tgt.reshape(-1), reduction="sum")


def test_gate_gradients_match_autograd_and_add_up_over_shards():
    model = tiny_llama(4)
    model.train()
    ids, mask = _padded_batch(2)
    # reference: dL/da_l = sum_t <dL/dh_{l+1}, h_{l+1} - h_l> per sequence, from retained hidden grads
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    hs = out.hidden_states
    for h in hs:
        h.retain_grad()
    logits = out.logits[:, :-1]
    tgt = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tgt.reshape(-1), reduction="sum").backward()
    model.zero_grad()
    whole = LayerGateStatistic(model)
    _sum_loss(model, ids, mask).backward()
    whole.update(True)
    t_whole = whole.partial_table()
    whole.close()
    model.zero_grad()
    for layer in range(3):  # hs[layer + 1] is layer's output (un-normed) for layer < 3
        s = ((hs[layer + 1].grad * (hs[layer + 1] - hs[layer]).detach()).sum(-1) * mask).sum(-1)
        assert t_whole[0, layer].item() == pytest.approx(float(s.square().sum()), rel=1e-4)
        assert t_whole[1, layer].item() == pytest.approx(float(s.sum()), rel=1e-4, abs=1e-6)
    assert t_whole[2].tolist() == [4.0] * 4
    parts = []
    for sl in (slice(0, 2), slice(2, 4)):
        col = LayerGateStatistic(model)
        _sum_loss(model, ids[sl], mask[sl]).backward()
        col.update(True)
        parts.append(col.partial_table())
        col.close()
        model.zero_grad()
    torch.testing.assert_close(parts[0] + parts[1], t_whole, rtol=1e-4, atol=1e-6)


def _pruner_plan(tmp_path, criterion, checkpointing):
    model = tiny_llama(6)
    model.train()
    if checkpointing is not None:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": checkpointing})
    cfg = GradPrunerConfig.from_dict(
        {"window_steps": 2, "num_drop": 2, "criterion": criterion, "output_dir": str(tmp_path), "plot": False}
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pruner = GradPruner(model, cfg, total_steps=3, seed=3)
    for batch in batches(3, seed=2):
        model(**batch).loss.backward()
        pruner.observe()
        opt.step()
        opt.zero_grad()
        opt, _ = pruner.maybe_prune(opt)
    assert pruner.plan is not None
    return pruner.plan


@pytest.mark.parametrize("criterion", ["angular", "gate_fisher", "shortgpt_bi"])
def test_activation_criteria_under_gradient_checkpointing_give_the_plain_plan(tmp_path, criterion):
    """transformers' gradient checkpointing (both use_reentrant modes) leaves the window statistics, hence
    the scores and the plan, as they are without it."""
    plain = _pruner_plan(tmp_path / "plain", criterion, None)
    for reentrant in (False, True):
        ckpt = _pruner_plan(tmp_path / f"re{reentrant}", criterion, reentrant)
        assert ckpt.dropped == plain.dropped
        assert ckpt.scores == pytest.approx(plain.scores, rel=1e-5, abs=1e-12)


def _checkpoint_inner_model(model, reentrant: bool) -> None:
    """Run the decoder stack under torch.utils.checkpoint: the backward recomputes every layer through its
    __call__ (module hooks included), outside the model's own forward."""
    inner = model.model
    forward = inner.forward

    def checkpointed(input_ids=None, **kwargs):
        fn = functools.partial(forward, **kwargs)
        return torch.utils.checkpoint.checkpoint(fn, input_ids, use_reentrant=reentrant)

    inner.forward = checkpointed


def test_collector_ignores_layers_recomputed_in_the_backward():
    ids, mask = _padded_batch(2)
    plain_model = tiny_llama(4)
    plain_model.train()
    plain = [HiddenStateStatistic(plain_model, spans=(1, 3)), LayerGateStatistic(plain_model)]
    _sum_loss(plain_model, ids, mask).backward()
    for stat in plain:
        stat.update(True)
    model = tiny_llama(4)
    model.train()
    _checkpoint_inner_model(model, reentrant=False)
    calls: list[int] = []
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda *a, i=i: calls.append(i))
    stats = [HiddenStateStatistic(model, spans=(1, 3)), LayerGateStatistic(model)]
    _sum_loss(model, ids, mask).backward()
    assert calls == [0, 1, 2, 3, 0, 1, 2, 3]  # the forward, then the recompute in the backward
    for stat, ref in zip(stats, plain, strict=True):
        stat.update(True)
        torch.testing.assert_close(stat.partial_table(), ref.partial_table(), rtol=1e-6, atol=1e-9)
        assert stat.forwards == 1


def test_gate_fisher_refuses_a_forward_without_layer_gradients():
    """A wrapper that runs the layers without grad in the forward (reentrant checkpointing around the
    layers' __call__) leaves no output to read the gate gradient from: a clear error, not silent zeros."""
    model = tiny_llama(3)
    model.train()
    _checkpoint_inner_model(model, reentrant=True)
    ids, mask = _padded_batch(2)
    hidden = HiddenStateStatistic(model, spans=(1, 3))  # the hidden-state statistics need no gradients
    model(input_ids=ids, attention_mask=mask)
    hidden.close()
    col = LayerGateStatistic(model)
    with pytest.raises(GradPrunerError, match="gradpruner: 'gate_fisher' reads the gradient"):
        model(input_ids=ids, attention_mask=mask)
    col.close()


def test_a_criterion_registered_by_the_user_is_selected_by_its_name():
    """The public registry: a criterion that reads no data, registered from outside the package, drives a real
    prune by its name in the config."""
    import torch

    from gradpruner_ds.config import GradPrunerConfig
    from gradpruner_ds.core.criteria import CRITERIA, register_criterion
    from gradpruner_ds.pruner import GradPruner

    @register_criterion("first_layers_test", "Remove the first layers (a test).", reads=())
    def _first(table, keys, ctx):
        return torch.arange(ctx.num_layers, dtype=torch.float64)

    try:
        model = tiny_llama(5)
        pruner = GradPruner(model, GradPrunerConfig.from_dict({"window_steps": 1, "num_drop": 2, "criterion": "first_layers_test", "progress_bar": False}))  # fmt: skip
        b = batches(1)[0]
        model(**b).loss.backward()
        pruner.observe()
        pruner.maybe_prune()
        assert list(pruner.plan.dropped) == [0, 1]
    finally:
        CRITERIA.pop("first_layers_test")
