"""The sums of the least-squares repair (``repair``): for each contiguous run of removed layers, what the kept
layer below it writes and what the run would have added (:mod:`gradpruner_ds.core.repair` for the math).

Collected after the plan is fixed, over ``repair.steps`` further training steps of the still dense model,
from forward hooks: on the MLP branch of layer ``s-1`` (``X``, before its residual add) and on the outputs
of layers ``s-1`` and ``e-1`` (``Y = h(e) - h(s) + X``). Per run, over the non-padding tokens of the
counted forwards: ``A = sum X^T X`` and ``B = sum X^T Y`` (``[d, d]`` each; their diagonals only for the
diagonal map), ``c = sum ||Y||^2`` and the token count. Which forwards count (a recompute under activation
checkpointing never does), padding and steps: :mod:`.hooks`; the MLP hook is gated like the layer hooks.

Table layout (flat, float64 or float32): per run ``[A, B, c, tokens]`` in run order. Sums over tokens:
the tables of disjoint micro-batches add up over ranks (one all-reduce).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gradpruner_ds.arch import ArchSpec, decoder_layers
from gradpruner_ds.errors import user_error
from gradpruner_ds.statistics.base import BuildContext
from gradpruner_ds.statistics.hooks import LayerHookStatistic


class RepairStatistic(LayerHookStatistic):
    """``A``, ``B``, ``c`` and tokens of every run ``(s, e)`` with ``s >= 1`` (see the module docstring)."""

    name = "repair"

    def __init__(
        self,
        model: nn.Module,
        spec: ArchSpec,
        runs: Sequence[tuple[int, int]],
        *,
        diagonal: bool = False,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        if spec.mlp_branch is None:
            raise AssertionError("the caller refuses repair for this family")
        self.runs = [(int(s), int(e)) for s, e in runs]
        if any(s < 1 for s, _ in self.runs):
            raise AssertionError("a run starting at layer 0 has no kept layer below it to fold into")
        hf_layers = decoder_layers(model)
        mlp = hf_layers[0].get_submodule(spec.mlp_branch)
        writer = mlp.get_submodule(spec.mlp_writer.removeprefix(spec.mlp_branch + "."))
        dim = int(getattr(writer, "out_features"))  # noqa: B009 - the residual channels (also when ZeRO-3 partitions)
        self.dim = dim
        self.diagonal = diagonal
        self.block = (2 * dim if diagonal else 2 * dim * dim) + 2
        super().__init__(model, 0, shape=(self.block * len(self.runs),), dtype=dtype)
        self._by_below = {s - 1: r for r, (s, _) in enumerate(self.runs)}
        self._by_end = {e - 1: r for r, (_, e) in enumerate(self.runs)}
        self._x: dict[int, torch.Tensor] = {}
        self._h: dict[int, torch.Tensor] = {}
        for s, _ in self.runs:
            branch = hf_layers[s - 1].get_submodule(spec.mlp_branch)
            self._handles.append(branch.register_forward_hook(self._make_mlp_hook(self._by_below[s - 1])))

    @classmethod
    def build(cls, ctx: BuildContext) -> RepairStatistic:
        raise AssertionError("built by the repair phase (gradpruner_ds.repair.Repairer), not by a criterion")

    def _make_mlp_hook(self, run: int):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if self.paused or not self._in_model_forward or not (module.training or torch.is_grad_enabled()):
                return
            out = output[0] if isinstance(output, tuple | list) else output
            if isinstance(out, torch.Tensor):
                self._x[run] = out.detach()

        return hook

    def _forward_begun(self) -> None:
        self._x, self._h = {}, {}

    @torch.no_grad()
    def _layer(self, idx: int, h_in: torch.Tensor, h_out: torch.Tensor, mask: torch.Tensor | None) -> None:
        below = self._by_below.get(idx)
        if below is not None:
            self._h[below] = h_out.detach()
        run = self._by_end.get(idx)
        if run is None or run not in self._x or run not in self._h:
            return
        x, h_s = self._x.pop(run), self._h.pop(run)
        acc = self._acc(h_out.device)
        dt = acc.dtype
        y = (h_out.detach().to(dt) - h_s.to(dt)) + x.to(dt)
        x = x.to(dt).reshape(-1, self.dim)
        y = y.reshape(-1, self.dim)
        if mask is not None:
            keep = mask.reshape(-1).bool()
            x, y = x[keep], y[keep]
        base = run * self.block
        d = self.dim
        if self.diagonal:
            acc[base : base + d] += (x * x).sum(0)
            acc[base + d : base + 2 * d] += (x * y).sum(0)
            tail = base + 2 * d
        else:
            acc[base : base + d * d] += (x.T @ x).reshape(-1)
            acc[base + d * d : base + 2 * d * d] += (x.T @ y).reshape(-1)
            tail = base + 2 * d * d
        acc[tail] += (y * y).sum()
        acc[tail + 1] += float(x.shape[0])

    def sums(self, table: torch.Tensor, run: int) -> tuple[torch.Tensor, torch.Tensor, float, int]:
        """``(A, B, c, tokens)`` of run number ``run`` from a (reduced) table; ``A``/``B`` are ``[d]`` for the
        diagonal map, else ``[d, d]``."""
        base, d = run * self.block, self.dim
        if self.diagonal:
            a, b, tail = table[base : base + d], table[base + d : base + 2 * d], base + 2 * d
        else:
            a = table[base : base + d * d].view(d, d)
            b = table[base + d * d : base + 2 * d * d].view(d, d)
            tail = base + 2 * d * d
        return a, b, float(table[tail]), int(table[tail + 1])

    def check(self, table: torch.Tensor) -> None:
        empty = [self.runs[r] for r in range(len(self.runs)) if self.sums(table, r)[3] == 0]
        if empty:
            raise user_error(
                "repair fits its maps on the training forwards of the steps after the plan, but saw no token "
                "for some removed runs",
                empty,
                "run the forward with gradients enabled (not under torch.no_grad) during the repair steps, and "
                "call observe() once per optimizer step after backward",
            )

    def _settings(self) -> dict[str, Any]:
        return {"runs": [list(r) for r in self.runs], "diagonal": self.diagonal, "dim": self.dim}

    def close(self) -> None:
        super().close()
        self._x, self._h = {}, {}
