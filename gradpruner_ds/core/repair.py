"""Least-squares repair of a removed run of layers (ReplaceMe-style), as pure tensor math.

For a contiguous run of removed decoder layers ``s .. e-1`` the kept layer ``s-1`` writes ``X`` (its MLP
branch, before the residual add) into the residual stream, and the removed run would have added
``h(e) - h(s)`` on top. One linear map ``T`` (d x d) applied to ``X`` stands in for the run:

    X T ~ Y,   Y = h(e) - h(s) + X     (h(k): the hidden state after layer k-1)

fitted over the tokens of a few training steps from the sums ``A = sum X^T X`` and ``B = sum X^T Y`` (and
``c = sum ||Y||^2`` for the fit report) -- sums over tokens, so the partial sums of disjoint micro-batches
add up over ranks. ``X T = z W_down^T T`` with ``z`` the MLP's inner activation, so the map is folded into
the kept layer's down-projection, ``W_down <- T^T W_down``, and the model keeps its standard architecture.

Ridge (``lambda = ridge x tr(A) / d``): toward zero, ``T = (A + lambda I)^-1 B`` (ReplaceMe); toward the
identity, ``T = (A + lambda I)^-1 (B + lambda I)`` (a large ``lambda`` is plain removal, ``T = I``). The
diagonal map (one scale per channel, LinearPatch-like) needs only the diagonals of ``A`` and ``B``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

RidgeTarget = Literal["zero", "identity"]


def removed_runs(removed: Sequence[int]) -> list[tuple[int, int]]:
    """Contiguous runs ``(s, e)`` (layers ``s .. e-1``) of the removed layer indices, ascending."""
    runs: list[tuple[int, int]] = []
    for i in sorted(set(removed)):
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def ridge_lambda(a_trace: float, dim: int, ridge: float) -> float:
    """The ridge added to ``A``'s diagonal: ``ridge`` relative to the mean eigenvalue ``tr(A) / d``."""
    return ridge * a_trace / dim


def solve_map(a: torch.Tensor, b: torch.Tensor, ridge: float, target: RidgeTarget = "zero") -> torch.Tensor:
    """The map ``T`` from the sums: full ``[d, d]`` sums give a ``[d, d]`` map; diagonals (``[d]``) a ``[d]``
    per-channel scale. Solved in float64; deterministic for the same inputs (every rank solves the same)."""
    a, b = a.double(), b.double()
    d = a.shape[0]
    if a.dim() == 1:
        lam = ridge_lambda(float(a.sum()), d, ridge)
        num = b + (lam if target == "identity" else 0.0)
        return num / (a + lam).clamp_min(torch.finfo(torch.float64).tiny)
    lam = ridge_lambda(float(torch.diagonal(a).sum()), d, ridge)
    eye = torch.eye(d, dtype=torch.float64)
    rhs = b + lam * eye if target == "identity" else b
    return torch.linalg.solve(a + lam * eye, rhs)


def residuals(a: torch.Tensor, b: torch.Tensor, c: float, t: torch.Tensor) -> tuple[float, float]:
    """``(||Y - X||^2, ||Y - X T||^2)`` summed over the calibration tokens, from the sums (``c = sum ||Y||^2``):
    what plain removal leaves out, and what the map leaves out."""
    a, b = a.double(), b.double()
    if a.dim() == 1:
        plain = c - 2.0 * float(b.sum()) + float(a.sum())
        fitted = c - 2.0 * float((t * b).sum()) + float((t * t * a).sum())
    else:
        plain = c - 2.0 * float(torch.diagonal(b).sum()) + float(torch.diagonal(a).sum())
        fitted = c - 2.0 * float((t * b).sum()) + float((t * (a @ t)).sum())
    return plain, fitted


def fold(weight: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``T^T W`` for a writer weight ``W`` ``[d, k]`` (rows are the residual-stream channels): the new weight,
    in float64. A ``[d]`` map scales the rows."""
    w = weight.double()
    if t.dim() == 1:
        return t.double()[:, None] * w
    return t.double().T @ w
