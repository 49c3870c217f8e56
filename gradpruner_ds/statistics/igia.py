"""IGIA as a statistic: which matrices are observed, the per-step update, the scoring table and the merge masks.

Full mode reads the true gradients of every linear of every decoder layer (this rank's reduced shard);
LoRA mode (peft adapters, ``mode: auto`` picks it when adapters are present) reads the factor gradients of
the linears that carry an adapter. The accumulation itself is :class:`gradpruner_ds.core.igia.IGIAAccumulator`
(pure tensor math); its table for the criteria is :func:`gradpruner_ds.core.criteria.igia.partial_table`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from gradpruner_ds.arch import decoder_layers, layer_linears
from gradpruner_ds.core.criteria import get_criterion
from gradpruner_ds.core.criteria.igia import partial_table
from gradpruner_ds.core.igia import IGIAAccumulator, Key, sq_norms
from gradpruner_ds.engine import EngineAdapter
from gradpruner_ds.errors import user_error
from gradpruner_ds.log import get_logger
from gradpruner_ds.peft_support import linear_weight, lora_factors
from gradpruner_ds.statistics.base import BuildContext, Statistic, StepGradients

log = get_logger("statistics")


class IGIAStatistic(Statistic):
    """Initial Gradient Information Accumulation (method.md section 2) over the observed linear weights.

    ``keys`` (layer, sublayer) fixes the column order of the table on every rank; ``weights`` are the base
    weights (read by saliency criteria and written by the merge); ``factors`` the LoRA pairs in LoRA mode.
    """

    name = "igia"

    def __init__(
        self,
        backend: EngineAdapter,
        criterion: str,
        mode: str,
        weights: Mapping[Key, nn.Parameter],
        factors: Mapping[Key, tuple[nn.Parameter, nn.Parameter]],
        window: int,
    ) -> None:
        self.backend = backend
        self.criterion = criterion
        self.mode = mode
        self.keys: list[Key] = list(weights)
        self.weights: dict[Key, nn.Parameter] = dict(weights)
        self.factors: dict[Key, tuple[nn.Parameter, nn.Parameter]] = dict(factors)
        self.acc = IGIAAccumulator(
            keys=self.keys,
            mode=mode,
            slices=backend.lora_slices(self.weights) if mode == "lora" else None,
            owns_lora_scalars=backend.rank == 0,
            window=window,
        )
        self._read: Any = None  # this step's gradient pieces, between step_gradients() and update()

    @classmethod
    def build(cls, ctx: BuildContext) -> IGIAStatistic:
        config = ctx.config
        linears = {
            (i, name): module
            for i, layer in enumerate(decoder_layers(ctx.model))
            for name, module in layer_linears(layer, ctx.spec).items()
        }
        with_lora = {k for k, m in linears.items() if lora_factors(m, config.lora_adapter) is not None}
        mode = config.mode if config.mode != "auto" else ("lora" if with_lora else "full")
        criterion = config.effective_criterion
        if mode == "lora":
            keys = _lora_keys(linears, with_lora, ctx)
        else:
            keys = list(linears)
        weights = {key: linear_weight(linears[key]) for key in keys}
        factors: dict[Key, tuple[nn.Parameter, nn.Parameter]] = {}
        if mode == "lora":
            for key in keys:
                pair = lora_factors(linears[key], config.lora_adapter)
                assert pair is not None
                factors[key] = pair
        else:
            frozen = [k for k, p in weights.items() if not p.requires_grad]
            if frozen:
                raise user_error(
                    "mode 'full' reads the true gradients of the linear weights, but some are frozen",
                    f"{len(frozen)} frozen, e.g. layer {frozen[0][0]} {frozen[0][1]}",
                    "unfreeze them, or use mode 'lora' with peft LoRA adapters, or a criterion that reads no "
                    "gradients (e.g. 'shortgpt_bi', the default)",
                )
        return cls(ctx.backend, criterion, mode, weights, factors, ctx.window)

    # ---- the step -----------------------------------------------------------------------------------
    def step_gradients(self) -> StepGradients:
        if self.mode == "full":
            grads = self.backend.full_grads(self.weights)
            norms = sq_norms(grads.values())  # one read of each gradient piece, one host sync
            self._read = (grads, norms)
            return StepGradients(list(grads.values()), norms, list(self.weights.values()))
        lgrads = self.backend.lora_grads(self.factors)
        self._read = lgrads
        return StepGradients([t for pair in lgrads.values() for t in pair])

    def update(self, ok: bool, scale: float = 1.0) -> None:
        read, self._read = self._read, None
        if not ok:
            self.acc.skip_step()
        elif self.mode == "full":
            grads, norms = read
            self.acc.add_full_step(grads, scale, norms)
        else:
            self.acc.add_lora_step(read, scale)

    # ---- results ------------------------------------------------------------------------------------
    def partial_table(self) -> torch.Tensor:
        crit = get_criterion(self.criterion)
        weights = None
        if crit.needs_saliency or crit.needs_weight_norm:
            weights = self.backend.local_weights(self.weights)
        return partial_table(self.acc, self.criterion, weights)

    def igia(self, key: Key) -> torch.Tensor:
        """This rank's piece of ``F_W`` for one observed matrix (the merge masks)."""
        return self.acc.igia(key)

    def nbytes(self) -> int:
        """Bytes of the accumulated state on this rank."""
        acc = self.acc
        total = sum(v.numel() * v.element_size() for v in acc.sum_sq.values())
        total += sum(
            t.numel() * t.element_size() for pairs in acc.factors.values() for pair in pairs for t in pair
        )
        return total

    def state_dict(self) -> dict[str, Any]:
        return self.acc.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.acc.load_state_dict(state)

    def close(self) -> None:
        self._read = None
        self.weights, self.factors = {}, {}  # no reference to (soon removed) parameters may survive
        self.acc = IGIAAccumulator(keys=self.keys, mode=self.mode)  # frees the accumulated state


def _lora_keys(linears: Mapping[Key, nn.Module], with_lora: set[Key], ctx: BuildContext) -> list[Key]:
    """The scored matrices in LoRA mode: those that carry an adapter (errors where that cannot work)."""
    config = ctx.config
    if not with_lora:
        raise user_error(
            f"mode 'lora' needs peft LoRA adapters named '{config.lora_adapter}' on the scored linear layers",
            "no adapter found",
            f"wrap the model with peft (target_modules e.g. {list(ctx.spec.linear_names)}) or use mode "
            "'full'; criteria that read no gradients (e.g. 'shortgpt_bi') need no adapters",
        )
    bare = sorted(set(range(ctx.num_layers)) - {i for i, _ in with_lora})
    if bare:
        raise user_error(
            f"criterion '{config.effective_criterion}' scores a layer from the gradients of its LoRA "
            "adapters, but some decoder layers carry none (they would score 0 and be removed first)",
            f"layers without adapters: {bare}",
            "put adapters on every decoder layer, or use a criterion that reads no gradients "
            "(e.g. 'shortgpt_bi', the default)",
        )
    unscored = sorted({n for _, n in linears} - {n for _, n in with_lora})
    if unscored and ctx.num_merge:
        raise user_error(
            "a merge needs the IGIA of every linear of the merged layers, but some carry no LoRA adapter",
            unscored,
            "target every linear with LoRA (target_modules='all-linear'), or set num_merge to 0",
        )
    if unscored or len(with_lora) != len(linears):
        log.warning(
            "mode 'lora': scoring only the %d of %d linears that carry a LoRA adapter; not scored: %s",
            len(with_lora),
            len(linears),
            unscored or "some layers' sublayers",
        )
    return [k for k in linears if k in with_lora]
