"""An independent, deliberately naive implementation of GradPruner's formulas (method.md), used to
check the product: full products, Python sorting, no sharding tricks, no shared code with the core."""

from __future__ import annotations

import math

import torch

LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def igia(step_grads: list[torch.Tensor]) -> torch.Tensor:
    """F = (1/t) sum_i G_i**2 with G_i given as full d_out x d_in matrices."""
    total = torch.zeros_like(step_grads[0], dtype=torch.float64)
    for g in step_grads:
        total += g.double() ** 2
    return total / len(step_grads)


def scores(per_layer_step_grads: list[dict[str, list[torch.Tensor]]]) -> list[float]:
    """S_j = sum_k sum(F_{W_k})."""
    return [sum(float(igia(gs).sum()) for gs in layer.values()) for layer in per_layer_step_grads]


def plan(scores_: list[float], n_drop: int, n_merge: int) -> tuple[list[int], list[int], dict[int, int]]:
    order = sorted(range(len(scores_)), key=lambda i: (scores_[i], i))
    dropped, merged = sorted(order[:n_drop]), sorted(order[n_drop : n_drop + n_merge])
    kept = [i for i in range(len(scores_)) if i not in dropped and i not in merged]
    targets = {}
    for p in merged:
        below = [k for k in kept if k < p]
        targets[p] = below[-1] if below else [k for k in kept if k > p][0]
    return dropped, merged, targets


def topp_mask(f: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """Entries whose IGIA is >= the k-th largest, k = ceil(p * numel)."""
    flat = sorted(f.flatten().tolist(), reverse=True)
    k = max(1, math.ceil(keep_fraction * len(flat) - 1e-9))
    return f >= flat[k - 1]


def merge(
    w_r: torch.Tensor, sources: list[tuple[torch.Tensor, torch.Tensor]], sign_rule: bool = True
) -> torch.Tensor:
    """W_r + sum_p W_p * M_p * 1[W_r * W_p > 0], element by element, against the original W_r."""
    out = w_r.clone()
    rows, cols = w_r.shape
    for w_p, m_p in sources:
        for i in range(rows):
            for j in range(cols):
                if m_p[i, j] and (not sign_rule or float(w_r[i, j]) * float(w_p[i, j]) > 0):
                    out[i, j] += w_p[i, j]
    return out
