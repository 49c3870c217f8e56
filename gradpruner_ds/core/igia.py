"""IGIA: Initial Gradient Information Accumulation, F_W = (1/t) * sum_i G_i ** 2 (element-wise).

``G_i`` is the true gradient of a linear weight (full fine-tuning) or the LoRA "simulated gradient"
``grad(B) @ grad(A)`` (method.md section 2). The accumulator keeps, per observed matrix, its local
piece only:

* full mode: ``sum_sq`` = sum_i G_i ** 2 over the local gradient shard (one fp32 value per local
  gradient element);
* LoRA mode: the per-step factor gradients (B: d_out x r, A: r x d_in, fp32), from which the
  element-wise IGIA of any matrix can be rebuilt later. Scores never need the d_out x d_in product:
  ``||B A||_F^2 = trace((B^T B)(A A^T))`` is an r x r computation.

Per step it also records each matrix's partial squared Frobenius norm ``||G_i||_F^2`` (over the local
piece), so the paper's score, the reference code's unsquared-norm variant and normalised variants all
come from one table that adds up over shards.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

Key = tuple[int, str]
"""An observed matrix: (decoder layer index, linear sublayer name), e.g. (3, "mlp.down_proj")."""


def simulated_gradient(b_grad: torch.Tensor, a_grad: torch.Tensor) -> torch.Tensor:
    """LoRA simulated gradient ``G = grad(B) @ grad(A)`` (d_out x d_in), in fp32."""
    return b_grad.float() @ a_grad.float()


def lora_sq_frobenius(b_grad: torch.Tensor, a_grad: torch.Tensor) -> torch.Tensor:
    """``||grad(B) @ grad(A)||_F^2`` without forming the product: ``trace((B^T B)(A A^T))`` (r x r)."""
    b = b_grad.float()
    a = a_grad.float()
    gram_b_rr = b.T @ b
    gram_a_rr = a @ a.T
    # both Gram matrices are symmetric, so trace(X @ Y) = sum(X * Y)
    return (gram_b_rr * gram_a_rr).sum()


def product_flat_slice(b: torch.Tensor, a: torch.Tensor, offset: int, numel: int) -> torch.Tensor:
    """Entries ``[offset, offset + numel)`` of ``(b @ a).flatten()``, building only the rows they touch.

    This is how a rank rebuilds the simulated gradient over exactly the flat slice of the base weight
    that it holds (ZeRO-3 shards are flat slices of the flattened parameter).
    """
    d_in = a.shape[1]
    if numel == 0:
        return torch.zeros(0, dtype=torch.float32, device=a.device)
    row_lo = offset // d_in
    row_hi = (offset + numel - 1) // d_in + 1
    rows = (b[row_lo:row_hi].float() @ a.float()).flatten()
    start = offset - row_lo * d_in
    return rows[start : start + numel]


def _sq_norm_t(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.float()
    return torch.dot(flat, flat) if flat.numel() else flat.new_zeros(())


def sq_norms(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Squared L2 norm of each tensor as a float64 CPU vector: one read pass each (``dot(t, t)``, no
    temporary for fp32 tensors) where the tensors live, copied to the host once (one device sync per
    call, not one per tensor). An entry is non-finite iff some value of its tensor is inf/nan (or squares
    beyond the fp32 range, ~1.8e19: treated as non-finite too)."""
    parts = [_sq_norm_t(t) for t in tensors]
    if not parts:
        return torch.zeros(0, dtype=torch.float64)
    devices = {x.device for x in parts}
    if len(devices) == 1:
        return torch.stack(parts).double().cpu()
    return torch.stack([x.double().cpu() for x in parts])


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """True when every tensor holds only finite values (a step with inf/nan gradients is not observed)."""
    return bool(torch.isfinite(sq_norms(tensors)).all())


@dataclass
class IGIAAccumulator:
    """Accumulates IGIA over the observation window for a fixed, ordered list of matrices.

    ``keys`` fixes the column order of every per-step table, so it must be the same on every rank.
    ``slices`` (LoRA mode only) gives, per key, the (offset, numel) of the flat slice of the base weight
    that this process holds; ``None`` means the whole matrix.
    """

    keys: list[Key]
    mode: str  # "full" or "lora"
    slices: dict[Key, tuple[int, int]] | None = None
    owns_lora_scalars: bool = True
    window: int | None = None  # LoRA mode: planned steps, to pick the cheaper representation per matrix
    steps: int = 0
    skipped: int = 0
    sum_sq: dict[Key, torch.Tensor] = field(default_factory=dict)
    factors: dict[Key, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    step_sq_norms: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in ("full", "lora"):
            raise AssertionError(f"unknown IGIA mode {self.mode!r}")
        self._col = {k: i for i, k in enumerate(self.keys)}

    def skip_step(self) -> None:
        """Record a step that is not observed (non-finite gradients, loss-scaler overflow)."""
        self.skipped += 1

    def add_full_step(
        self, grads: Mapping[Key, torch.Tensor], scale: float = 1.0, norms: torch.Tensor | None = None
    ) -> None:
        """Observe one step of true gradients (local shards; any shape, flat shards included).

        ``scale`` multiplies the gradients first (a clipping / loss-scale factor the engine applies
        after the point where they are read). ``norms``: :func:`sq_norms` of ``grads.values()`` (in
        that order) when the caller already has them (the step check needs them too)."""
        s2 = float(scale) * float(scale)
        if norms is None:
            norms = sq_norms(grads.values())
        row = torch.zeros(len(self.keys), dtype=torch.float64)
        for (key, _), n2 in zip(grads.items(), norms.tolist(), strict=True):
            row[self._col[key]] = n2 * s2
        for key, grad in grads.items():
            g = grad.detach()
            if g.dtype != torch.float32:
                g = g.float()
            acc = self.sum_sq.get(key)
            if acc is None:
                self.sum_sq[key] = g.square().mul_(s2)
            else:
                acc.addcmul_(g, g, value=s2)  # one pass, no temporary
        self.step_sq_norms.append(row)
        self.steps += 1

    def add_lora_step(
        self, factor_grads: Mapping[Key, tuple[torch.Tensor, torch.Tensor]], scale: float = 1.0
    ) -> None:
        """Observe one step of LoRA factor gradients ``(grad(B), grad(A))`` (whole small factors).

        The squared Frobenius norm of the simulated gradient is recorded for the whole matrix on the
        process that ``owns_lora_scalars`` and as 0 elsewhere, so the table still adds up over ranks.
        """
        row = torch.zeros(len(self.keys), dtype=torch.float64)
        for key, (b_grad, a_grad) in factor_grads.items():
            b32 = b_grad.detach().float().mul(scale)
            a32 = a_grad.detach().float().mul(scale)
            if self._keep_factors(key, b32, a32):
                self.factors.setdefault(key, []).append((b32, a32))
            else:  # cheaper to accumulate the product over the local slice, like full mode
                offset, numel = self._slice_of(key, b32, a32)
                sq = product_flat_slice(b32, a32, offset, numel).square()
                acc = self.sum_sq.get(key)
                self.sum_sq[key] = sq if acc is None else acc.add_(sq)
            if self.owns_lora_scalars:
                row[self._col[key]] = lora_sq_frobenius(b32, a32).double().item()
        self.step_sq_norms.append(row)
        self.steps += 1

    def _slice_of(self, key: Key, b32: torch.Tensor, a32: torch.Tensor) -> tuple[int, int]:
        """(offset, numel) of the local flat slice of ``key``'s base weight (whole matrix if unsharded)."""
        if self.slices is not None and key in self.slices:
            return self.slices[key]
        return 0, b32.shape[0] * a32.shape[1]

    def _keep_factors(self, key: Key, b32: torch.Tensor, a32: torch.Tensor) -> bool:
        """Store the per-step factors (r x (d_out + d_in) per step) only while that is smaller than one
        fp32 accumulator over the local slice; else accumulate the product (fixed memory)."""
        if key in self.factors:
            return True
        if key in self.sum_sq:
            return False
        steps = self.window if self.window is not None else 1
        return steps * (b32.numel() + a32.numel()) < self._slice_of(key, b32, a32)[1]

    def igia(self, key: Key) -> torch.Tensor:
        """The local piece of ``F_W = (1/t) sum_i G_i ** 2`` for one matrix (fp32)."""
        if self.steps == 0:
            raise AssertionError("IGIA requested before any observed step")
        if self.mode == "full" or key in self.sum_sq:
            return self.sum_sq[key] / self.steps
        offset, numel = self._slice_of(key, *self.factors[key][0])
        acc: torch.Tensor | None = None
        for b32, a32 in self.factors[key]:
            g = product_flat_slice(b32, a32, offset, numel)
            acc = g.square() if acc is None else acc.add_(g.square())
        assert acc is not None
        return acc / self.steps

    def sq_norm_table(self) -> torch.Tensor:
        """Per-step partial ``||G_i||_F^2`` per matrix: float64 [steps, len(keys)] (adds up over shards)."""
        if not self.step_sq_norms:
            return torch.zeros(0, len(self.keys), dtype=torch.float64)
        return torch.stack(self.step_sq_norms)

    def weighted_sums(self, weights: Mapping[Key, torch.Tensor]) -> torch.Tensor:
        """Partial ``sum(F_W * W**2)`` per matrix over the local pieces: float64 [len(keys)]."""
        out = torch.zeros(len(self.keys), dtype=torch.float64)
        for key, w in weights.items():
            f = self.igia(key).reshape(-1)
            out[self._col[key]] = (f.double() * w.detach().reshape(-1).double().square()).sum().item()
        return out

    def state_dict(self) -> dict[str, Any]:
        """Tensors and counters needed to resume the window exactly (no Python objects beyond lists)."""
        return {
            "mode": self.mode,
            "keys": [list(k) for k in self.keys],
            "steps": self.steps,
            "skipped": self.skipped,
            "sum_sq": {f"{k[0]}:{k[1]}": v for k, v in self.sum_sq.items()},
            "factors": {f"{k[0]}:{k[1]}": [list(f) for f in v] for k, v in self.factors.items()},
            "step_sq_norms": self.sq_norm_table(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` saved (keys and mode must match this accumulator)."""
        keys = [(int(k[0]), str(k[1])) for k in state["keys"]]
        if keys != self.keys or state["mode"] != self.mode:
            raise AssertionError("IGIA state belongs to another set of matrices or mode")

        def parse(name: str) -> Key:
            idx, sub = name.split(":", 1)
            return int(idx), sub

        self.steps = int(state["steps"])
        self.skipped = int(state["skipped"])
        self.sum_sq = {parse(k): v for k, v in state["sum_sq"].items()}
        self.factors = {parse(k): [(f[0], f[1]) for f in v] for k, v in state["factors"].items()}
        table = state["step_sq_norms"]
        self.step_sq_norms = list(table.unbind(0)) if table.numel() else []


def keys_for(num_layers: int, linear_names: Sequence[str]) -> list[Key]:
    """The canonical, rank-independent order of observed matrices: by layer, then sublayer name order."""
    return [(layer, name) for layer in range(num_layers) for name in linear_names]
