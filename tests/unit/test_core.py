"""Hand-computed examples for every formula of the core (method.md section 2)."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from gradpruner_ds.core.criteria import ScoreContext, layer_scores
from gradpruner_ds.core.criteria.igia import partial_table
from gradpruner_ds.core.igia import (
    IGIAAccumulator,
    all_finite,
    keys_for,
    lora_sq_frobenius,
    product_flat_slice,
    simulated_gradient,
)
from gradpruner_ds.core.merge import (
    difference_merge_,
    keep_count,
    kth_largest,
    merge_,
    sign_consistent_merge_,
    topk_mask,
)
from gradpruner_ds.core.plan import PrunePlan, make_plan, merge_targets, rank_layers, select_layers


def test_simulated_gradient_is_b_grad_times_a_grad():
    b = torch.tensor([[1.0], [2.0]])  # d_out x r
    a = torch.tensor([[3.0, 4.0]])  # r x d_in
    assert torch.equal(simulated_gradient(b, a), torch.tensor([[3.0, 4.0], [6.0, 8.0]]))
    assert lora_sq_frobenius(b, a).item() == pytest.approx(9 + 16 + 36 + 64)


def test_trace_identity_matches_product_norm():
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(7, 3, generator=g), torch.randn(3, 5, generator=g)
    assert lora_sq_frobenius(b, a).item() == pytest.approx((b @ a).square().sum().item(), rel=1e-5)


@pytest.mark.parametrize("offset,numel", [(0, 35), (0, 3), (4, 9), (13, 22), (34, 1), (10, 0)])
def test_product_flat_slice(offset, numel):
    g = torch.Generator().manual_seed(1)
    b, a = torch.randn(7, 3, generator=g), torch.randn(3, 5, generator=g)
    want = (b @ a).flatten()[offset : offset + numel]
    assert torch.allclose(product_flat_slice(b, a, offset, numel), want)


def test_igia_full_mode_hand_example():
    acc = IGIAAccumulator(keys=[(0, "w")], mode="full")
    acc.add_full_step({(0, "w"): torch.tensor([[1.0, -2.0]])})
    acc.add_full_step({(0, "w"): torch.tensor([[3.0, 0.0]])})
    # F = mean of squares = [[(1 + 9) / 2, (4 + 0) / 2]]
    assert torch.equal(acc.igia((0, "w")), torch.tensor([[5.0, 2.0]]))
    assert acc.sq_norm_table().flatten().tolist() == [5.0, 9.0]


def test_igia_lora_mode_matches_full_mode_on_the_product():
    g = torch.Generator().manual_seed(2)
    key = (0, "w")
    lora = IGIAAccumulator(keys=[key], mode="lora")
    full = IGIAAccumulator(keys=[key], mode="full")
    for _ in range(3):
        b, a = torch.randn(4, 2, generator=g), torch.randn(2, 6, generator=g)
        lora.add_lora_step({key: (b, a)})
        full.add_full_step({key: b @ a})
    assert torch.allclose(lora.igia(key).reshape(4, 6), full.igia(key), rtol=1e-5)
    assert torch.allclose(lora.sq_norm_table(), full.sq_norm_table(), rtol=1e-5)


def test_igia_partials_add_up_over_flat_shards():
    g = torch.Generator().manual_seed(3)
    keys = [(0, "w")]
    whole = IGIAAccumulator(keys=keys, mode="full")
    shards = [IGIAAccumulator(keys=keys, mode="full") for _ in range(3)]
    for _ in range(4):
        grad = torch.randn(5, 7, generator=g)
        whole.add_full_step({keys[0]: grad})
        for acc, piece in zip(shards, torch.tensor_split(grad.flatten(), [10, 26]), strict=True):
            acc.add_full_step({keys[0]: piece})
    total = sum(a.sq_norm_table() for a in shards)
    assert torch.allclose(total, whole.sq_norm_table())
    assert torch.allclose(torch.cat([a.igia(keys[0]) for a in shards]), whole.igia(keys[0]).flatten())


def test_non_finite_detection_and_skip():
    assert all_finite([torch.ones(3)])
    assert not all_finite([torch.ones(3), torch.tensor([1.0, float("nan")])])
    assert not all_finite([torch.tensor([float("inf")])])
    acc = IGIAAccumulator(keys=[(0, "w")], mode="full")
    acc.skip_step()
    assert (acc.steps, acc.skipped) == (0, 1)


def _two_layer_table() -> tuple[torch.Tensor, list, ScoreContext]:
    keys = keys_for(2, ["q", "o"])  # (0,q) (0,o) (1,q) (1,o)
    steps = torch.tensor([[4.0, 9.0, 1.0, 16.0], [16.0, 1.0, 9.0, 4.0]], dtype=torch.float64)
    saliency = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    wsq = torch.tensor([[10.0, 10.0, 1.0, 1.0]], dtype=torch.float64)
    return torch.cat([steps, saliency, wsq]), keys, ScoreContext(num_layers=2, residual_writers=("o",))


def test_scores_hand_example():
    table, keys, ctx = _two_layer_table()
    # paper: mean over steps of ||G||^2 summed over the layer's sublayers
    assert layer_scores(table, keys, "igia_sum", ctx) == [
        (4 + 16) / 2 + (9 + 1) / 2,
        (1 + 9) / 2 + (16 + 4) / 2,
    ]
    # reference code: unsquared norms summed over steps and sublayers
    assert layer_scores(table, keys, "igia_norm_sum", ctx) == [2 + 4 + 3 + 1, 1 + 3 + 4 + 2]
    assert layer_scores(table, keys, "obd", ctx) == [3.0, 7.0]
    assert layer_scores(table, keys, "obd_residual", ctx) == [2.0, 4.0]
    assert layer_scores(table, keys, "igia_relative", ctx) == [15.0 / 20.0, 15.0 / 2.0]


def test_partial_table_saliency_and_weight_norm():
    key = (0, "w")
    acc = IGIAAccumulator(keys=[key], mode="full")
    acc.add_full_step({key: torch.tensor([2.0, 0.0])})
    w = {key: torch.tensor([3.0, 5.0])}
    t = partial_table(acc, "obd", w)
    assert t[:, 0].tolist() == [4.0, 4.0 * 9.0, 0.0]
    t = partial_table(acc, "igia_relative", w)
    assert t[:, 0].tolist() == [4.0, 0.0, 34.0]


def test_ranking_ties_by_index_and_nan_first():
    assert rank_layers([3.0, 1.0, 1.0, 2.0]) == [1, 2, 3, 0]
    assert rank_layers([1.0, float("nan"), 0.5]) == [1, 2, 0]
    assert select_layers([5.0, 1.0, 1.0, 2.0, 9.0], num_drop=2, num_merge=1) == ([1, 2], [3])


def test_merge_targets_nearest_kept_below_else_above():
    # layers 0..5; drop 2; merge 0, 3, 4 -> 3 and 4 go to kept 1; layer 0 has no kept below -> 1
    assert merge_targets(6, dropped=[2], merged=[0, 3, 4]) == {0: 1, 3: 1, 4: 1}
    assert merge_targets(4, dropped=[], merged=[3]) == {3: 2}


def _plan() -> PrunePlan:
    return make_plan(
        [5.0, 1.0, 0.5, 2.0],
        1,
        1,
        criterion="igia_sum",
        observed_steps=3,
        skipped_steps=0,
        step=3,
        config_digest="abc",
    )


def test_plan_digest_and_json_roundtrip():
    plan = _plan()
    assert plan.dropped == (2,) and plan.merged == (1,) and plan.targets == ((1, 0),) and plan.kept == (0, 3)
    back = PrunePlan.from_json(plan.to_json())
    assert back == plan and back.digest() == plan.digest()
    other = make_plan(
        [5.0, 1.0, 0.5, 2.0 + 1e-9],
        1,
        1,
        criterion="igia_sum",
        observed_steps=3,
        skipped_steps=0,
        step=3,
        config_digest="abc",
    )
    assert other.digest() != plan.digest()


def test_plan_corrupt_or_edited_is_rejected():
    text = _plan().to_json()
    with pytest.raises(ValueError, match="^gradpruner: a plan's digest"):
        PrunePlan.from_json(text.replace('"dropped": [\n    2\n  ]', '"dropped": [\n    3\n  ]'))
    with pytest.raises(ValueError, match="^gradpruner: a plan file must be valid JSON"):
        PrunePlan.from_json(text[: len(text) // 2])
    with pytest.raises(ValueError, match="^gradpruner: a plan must have schema_version"):
        PrunePlan.from_json(text.replace('"schema_version": 1', '"schema_version": 99'))


def test_keep_count():
    assert keep_count(10, 0.2) == 2
    assert keep_count(11, 0.2) == 3  # ceil(2.2)
    assert keep_count(5, 1.0) == 5
    assert keep_count(3, 0.01) == 1


@pytest.mark.parametrize("seed", range(4))
def test_kth_largest_matches_topk(seed):
    g = torch.Generator().manual_seed(seed)
    mats = [torch.rand(50, 30, generator=g) ** 4, torch.rand(1000, generator=g) * 1e-20, torch.zeros(40)]
    mats[2][:5] = torch.tensor([3.0, 3.0, 3.0, 1.0, 2.0])  # ties and zeros
    ks = [keep_count(m.numel(), 0.2) for m in mats] + [1]
    mats.append(torch.tensor([7.0]))
    got = kth_largest(mats, ks)
    for m, k, v in zip(mats, ks, got, strict=True):
        assert v == torch.topk(m.flatten(), k).values[-1].item()


def test_kth_largest_sharded_equals_whole():
    """Two 'ranks' (threads) holding disjoint pieces agree on the exact threshold of the whole."""
    g = torch.Generator().manual_seed(7)
    whole = torch.rand(997, generator=g).square()
    pieces = torch.tensor_split(whole, [400])
    k = keep_count(whole.numel(), 0.2)
    barrier = threading.Barrier(2)
    deposit: list[torch.Tensor | None] = [None, None]
    results: list[float | None] = [None, None]

    def rank(r: int) -> None:
        def reduce_(t: torch.Tensor) -> None:
            deposit[r] = t.clone()
            barrier.wait()
            total = deposit[0] + deposit[1]  # type: ignore[operator]
            barrier.wait()
            t.copy_(total)

        results[r] = kth_largest([pieces[r]], [k], reduce_)[0]

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    want = torch.topk(whole, k).values[-1].item()
    assert results == [want, want]
    assert int(topk_mask(whole, want).sum()) == k


def test_sign_consistent_merge_hand_example():
    target = torch.tensor([1.0, -1.0, 0.0, 2.0, -3.0])
    source = torch.tensor([3.0, 2.0, 5.0, -1.0, -1.0])
    mask = torch.tensor([True, True, True, True, False])
    added = sign_consistent_merge_(target, [(source, mask)])
    # +1/+3 agree -> 4; -1/+2 differ; 0 never merges; 2/-1 differ; -3/-1 agree but masked out
    assert target.tolist() == [4.0, -1.0, 0.0, 2.0, -3.0]
    assert added == [1]


def test_sign_merge_tests_every_source_against_the_original():
    target = torch.tensor([1.0, -2.0])
    s1 = (torch.tensor([2.0, -1.0]), torch.tensor([True, True]))
    s2 = (torch.tensor([-5.0, -1.0]), torch.tensor([True, True]))
    added = sign_consistent_merge_(target, [s1, s2])
    assert target.tolist() == [3.0, -4.0]
    assert added == [2, 1]


def test_merge_without_sign_rule_is_plain_masked_addition():
    target = torch.tensor([1.0, -1.0, 0.0])
    sign_consistent_merge_(
        target, [(torch.tensor([3.0, 2.0, 5.0]), torch.tensor([True, False, True]))], sign_consistent=False
    )
    assert target.tolist() == [4.0, -1.0, 5.0]


def test_laco_difference_merge_hand_example():
    # LaCo's reserving-differences merge: W_r + sum_p (W_p - W_r), each difference to the ORIGINAL W_r
    target = torch.tensor([1.0, -2.0, 0.0])
    s1 = (torch.tensor([3.0, 2.0, 5.0]), torch.tensor([True, True, True]))
    s2 = (torch.tensor([-1.0, -2.0, 1.0]), torch.tensor([True, True, True]))
    added = difference_merge_(target, [s1, s2])
    assert target.tolist() == [1.0 + 2.0 - 2.0, -2.0 + 4.0 + 0.0, 0.0 + 5.0 + 1.0]
    assert added == [3, 3]
    # one source: the target becomes the source; merge_ dispatches by rule
    t = torch.tensor([1.0, -2.0])
    merge_(t, [(torch.tensor([7.0, 8.0]), torch.tensor([True, True]))], "laco")
    assert t.tolist() == [7.0, 8.0]
    t = torch.tensor([1.0, -1.0])
    merge_(t, [(torch.tensor([2.0, 2.0]), torch.tensor([True, True]))], "gradpruner", sign_consistent=False)
    assert t.tolist() == [3.0, 1.0]


def test_merge_sign_test_survives_bf16_underflow():
    tiny = torch.tensor([1e-30], dtype=torch.bfloat16)
    target = tiny.clone()
    sign_consistent_merge_(target, [(tiny.clone(), torch.tensor([True]))])
    assert target.item() == pytest.approx(2 * tiny.item(), rel=1e-2)
    assert math.isfinite(target.item())


def test_sq_norms_batches_the_norms_and_flags_non_finite_tensors():
    from gradpruner_ds.core.igia import all_finite, sq_norms

    ts = [torch.randn(5, 3), torch.randn(7).to(torch.bfloat16), torch.zeros(0)]
    out = sq_norms(ts)
    assert out.dtype == torch.float64 and out.shape == (3,)
    for t, n in zip(ts, out.tolist(), strict=True):
        flat = t.float().reshape(-1)
        assert n == pytest.approx(float(torch.dot(flat, flat)) if flat.numel() else 0.0, rel=1e-6)
        assert n == pytest.approx(float(t.double().square().sum()), rel=1e-3)
    assert sq_norms([]).shape == (0,)
    assert all_finite(ts)
    assert not all_finite([torch.ones(3), torch.tensor([1.0, float("nan")])])
    assert not all_finite([torch.tensor([float("inf")])])


def test_add_full_step_with_given_norms_equals_computing_them():
    from gradpruner_ds.core.igia import sq_norms

    keys = [(0, "mlp.down_proj"), (1, "mlp.down_proj")]
    grads = {k: torch.randn(4, 6) for k in keys}
    a = IGIAAccumulator(keys=keys, mode="full")
    b = IGIAAccumulator(keys=keys, mode="full")
    a.add_full_step(grads, 0.5)
    b.add_full_step(grads, 0.5, sq_norms(grads.values()))
    torch.testing.assert_close(a.sq_norm_table(), b.sq_norm_table())
    for k in keys:
        torch.testing.assert_close(a.igia(k), b.igia(k))
