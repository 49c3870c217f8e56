"""Sparsify merged layers (top-p by IGIA) and merge them sign-consistently into kept layers.

Masks: ``M_p = 1[F_{W_p} >= kth largest value of F_{W_p}]`` with ``k = ceil(keep_fraction * numel)``
(ties at the threshold are kept). The threshold is a global order statistic; ``kth_largest`` finds it
exactly by radix selection over the float bits, where the per-digit histograms are the only thing
that must be summed over shards (``reduce_`` is an in-place SUM; identity in one process).

Merge (method.md section 2): ``W_r <- W_r + sum_p W_p * M_p * 1[sign(W_r) == sign(W_p) != 0]``, every
sign test against the ORIGINAL ``W_r``. Signs are compared directly (not through ``W_r * W_p > 0``)
so tiny bf16 values cannot underflow the test.

A baseline rule, LaCo-style reserving-differences merging (Yang et al., 2024):
``W_r <- W_r + sum_p (W_p - W_r)``, unmasked, every difference against the ORIGINAL ``W_r``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch

Reducer = Callable[[torch.Tensor], None]
MergeRule = Literal["gradpruner", "laco"]
"""The config's ``merge_rule``: ``gradpruner``, the paper's top-p masked merge (sign-consistent unless
``sign_consistent=False``, an ablation); ``laco``, LaCo-style unmasked differences (a baseline)."""


def keep_count(numel: int, keep_fraction: float) -> int:
    """How many entries a top-p mask keeps: ``ceil(keep_fraction * numel)``, at least 1."""
    return max(1, min(numel, math.ceil(keep_fraction * numel - 1e-9)))


def _identity(_: torch.Tensor) -> None:
    return None


def kth_largest(
    local_values: Sequence[torch.Tensor],
    ks: Sequence[int],
    reduce_: Reducer = _identity,
) -> list[float]:
    """Exact k-th largest value of each (possibly sharded) non-negative float32 tensor.

    ``local_values[m]`` is this process's piece of matrix m; ``ks[m]`` counts over the whole matrix.
    Four passes of 8-bit radix selection; each pass calls ``reduce_`` once on an int64
    [num_matrices, 256] histogram, so a sharded caller makes exactly four small all-reduces.
    """
    n = len(local_values)
    bits = []
    for v in local_values:
        v32 = v.detach().reshape(-1).float()
        if bool((v32 < 0).any()) or not bool(torch.isfinite(v32).all()):
            raise AssertionError("kth_largest needs finite non-negative values")
        # non-negative IEEE floats order like their bit patterns read as integers
        bits.append(v32.view(torch.int32).to(torch.int64))
    prefix = [0] * n
    k_rem = list(ks)
    for shift in (24, 16, 8, 0):
        hist = torch.zeros(n, 256, dtype=torch.int64)
        for m, b in enumerate(bits):
            cand = b if shift == 24 else b[(b >> (shift + 8)) == (prefix[m] >> (shift + 8))]
            hist[m] = torch.bincount((cand >> shift) & 255, minlength=256)
        reduce_(hist)
        for m in range(n):
            from_top = hist[m].flip(0).cumsum(0)  # from_top[j] = count of digits >= 255 - j
            j = int(torch.searchsorted(from_top, torch.tensor(k_rem[m])).item())
            digit = 255 - j
            above = int(from_top[j - 1]) if j > 0 else 0
            k_rem[m] -= above
            prefix[m] |= digit << shift
    return [torch.tensor(p, dtype=torch.int32).view(torch.float32).item() for p in prefix]


def topk_mask(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean mask of the entries ``>= threshold`` (the local piece of a top-p mask)."""
    return values >= threshold


def sign_consistent_merge_(
    target: torch.Tensor,
    sources: Sequence[tuple[torch.Tensor, torch.Tensor]],
    sign_consistent: bool = True,
) -> list[int]:
    """Add each masked source into ``target`` in place; returns, per source, how many entries were added.

    ``sources`` holds ``(W_p, M_p)`` pairs laid out like ``target`` (the same local piece). With
    ``sign_consistent=False`` (an ablation) the sign test is skipped: ``W_r += W_p * M_p``.
    """
    orig_pos = target > 0
    orig_neg = target < 0
    added = []
    for w_p, mask in sources:
        sel = mask.to(torch.bool)
        if sign_consistent:
            sel = sel & ((orig_pos & (w_p > 0)) | (orig_neg & (w_p < 0)))
        target.add_(
            torch.where(sel, w_p.to(target.dtype), torch.zeros((), dtype=target.dtype, device=target.device))
        )
        added.append(int(sel.sum()))
    return added


def difference_merge_(
    target: torch.Tensor, sources: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> list[int]:
    """LaCo-style merge in place: ``W_r += sum_p M_p * (W_p - W_r_original)``; with all-true masks this
    is LaCo's reserving-differences merge. Returns, per source, how many entries were changed."""
    orig = target.clone()
    zero = torch.zeros((), dtype=target.dtype, device=target.device)
    added = []
    for w_p, mask in sources:
        sel = mask.to(torch.bool)
        target.add_(torch.where(sel, w_p.to(target.dtype) - orig, zero))
        added.append(int(sel.sum()))
    return added


def merge_(
    target: torch.Tensor,
    sources: Sequence[tuple[torch.Tensor, torch.Tensor]],
    merge_rule: MergeRule = "gradpruner",
    sign_consistent: bool = True,
) -> list[int]:
    """Merge ``sources`` (``(W_p, M_p)`` pairs laid out like ``target``) into ``target`` by the config's
    ``merge_rule`` and ``sign_consistent``."""
    if merge_rule == "laco":
        return difference_merge_(target, sources)
    return sign_consistent_merge_(target, sources, sign_consistent=sign_consistent)
