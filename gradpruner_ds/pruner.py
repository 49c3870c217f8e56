"""GradPruner inside a training loop: observe the first steps, plan, merge, cut, and go on.

Usage with any engine (plain PyTorch shown; ``gradpruner_ds.backends`` adapts DeepSpeed / FSDP2)::

    pruner = GradPruner(model, config, total_steps=num_steps)
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        pruner.observe()                    # after backward and clipping, before the optimizer step
        optimizer.step(); scheduler.step(); optimizer.zero_grad()
        optimizer, scheduler = pruner.maybe_prune(optimizer, scheduler)
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradpruner_ds.activations import ActivationCollector
from gradpruner_ds.arch import (
    ArchSpec,
    decoder_layers,
    get_arch,
    layer_linears,
    linear_weight,
    lora_factors,
    unwrap_model,
)
from gradpruner_ds.backends.base import Backend
from gradpruner_ds.config import GradPrunerConfig
from gradpruner_ds.core.igia import IGIAAccumulator, Key, keys_for, sq_norms
from gradpruner_ds.core.merge import MergeRule, keep_count, kth_largest, topk_mask
from gradpruner_ds.core.plan import PrunePlan, make_plan
from gradpruner_ds.core.scoring import ScoreContext, get_criterion, layer_scores, partial_table
from gradpruner_ds.errors import user_error
from gradpruner_ds.log import get_logger
from gradpruner_ds.report import build_report, write_report
from gradpruner_ds.surgery import remove_layers

log = get_logger("pruner")


def count_params(model: nn.Module, backend: Backend | None = None) -> int:
    """Total number of model parameters (whole tensors, also when the engine shards them)."""
    total = 0
    for p in model.parameters():
        total += backend.global_numel(p) if backend is not None else p.numel()  # type: ignore[arg-type]
    return total


class GradPruner:
    """Observes IGIA for a window of optimizer steps, then prunes the model in place.

    ``model`` is an HF CausalLM (or a peft-wrapped one) of a registered family. ``total_steps`` (the
    run's optimizer steps) is needed for ``window_fraction`` and checks the window fits in the run.
    """

    def __init__(
        self,
        model: nn.Module,
        config: GradPrunerConfig,
        *,
        total_steps: int | None = None,
        backend: Backend | None = None,
        seed: int = 0,
    ) -> None:
        self.config = config
        self.seed = seed  # only read by the 'random' criterion
        self.model = model
        self.backend = backend or Backend()
        self.spec: ArchSpec = get_arch(model)
        self.num_layers = len(decoder_layers(model))
        self.window = config.resolve_window(total_steps)
        self.num_drop, self.num_merge = config.resolve_budget(self.num_layers)
        self.mode = self._resolve_mode()
        self.keys = keys_for(self.num_layers, self.spec.linear_names)
        self.weights: dict[Key, nn.Parameter] = {}
        self.factors: dict[Key, tuple[nn.Parameter, nn.Parameter]] = {}
        for layer_idx, layer in enumerate(decoder_layers(model)):
            for name, module in layer_linears(layer, self.spec).items():
                self.weights[(layer_idx, name)] = linear_weight(module)
                if self.mode == "lora":
                    pair = lora_factors(module, config.lora_adapter)
                    assert pair is not None  # checked by _resolve_mode
                    self.factors[(layer_idx, name)] = pair
        if self.mode == "full":
            frozen = [k for k, p in self.weights.items() if not p.requires_grad]
            if frozen:
                raise user_error(
                    "mode 'full' reads the true gradients of the linear weights, but some are frozen",
                    f"{len(frozen)} frozen, e.g. layer {frozen[0][0]} {frozen[0][1]}",
                    "unfreeze them, or use mode 'lora' with peft LoRA adapters",
                )
        self.acc: IGIAAccumulator | None = IGIAAccumulator(
            keys=self.keys,
            mode=self.mode,
            slices=self.backend.lora_slices(self.weights) if self.mode == "lora" else None,
            owns_lora_scalars=self.backend.rank == 0,
            window=self.window,
        )
        crit = get_criterion(config.effective_criterion)
        self.collector: ActivationCollector | None = None
        if config.enabled and crit.source == "activation":
            assert crit.spans is not None
            self.collector = ActivationCollector(
                model, crit.spans(self.num_drop + self.num_merge), gate_grads=crit.gate_grads
            )
        self.steps_seen = 0
        self.plan: PrunePlan | None = None
        self.report: dict[str, Any] | None = None
        self._bar: Any = None
        log.info(
            "observing %d steps (%s gradients, criterion %s); then removing %d of %d layers (%d dropped, %d merged)",
            self.window,
            self.mode,
            config.effective_criterion,
            self.num_drop + self.num_merge,
            self.num_layers,
            self.num_drop,
            self.num_merge,
        )

    # ---- state --------------------------------------------------------------------------------------
    def _resolve_mode(self) -> str:
        first = decoder_layers(self.model)[0]
        has_lora = any(
            lora_factors(m, self.config.lora_adapter) is not None
            for m in layer_linears(first, self.spec).values()
        )
        mode = self.config.mode
        if mode == "auto":
            mode = "lora" if has_lora else "full"
        if mode == "lora" and not has_lora:
            raise user_error(
                f"mode 'lora' needs peft LoRA adapters named '{self.config.lora_adapter}' on every scored linear layer",
                "no adapter found",
                f"wrap the model with peft (target_modules={list(self.spec.linear_names)}) or use mode 'full'",
            )
        return mode

    @property
    def observing(self) -> bool:
        """True while the observation window is open."""
        return self.config.enabled and self.plan is None and self.steps_seen < self.window

    @property
    def ready(self) -> bool:
        """True once the window is complete and the model is not pruned yet."""
        return self.config.enabled and self.plan is None and self.steps_seen >= self.window

    # ---- observation --------------------------------------------------------------------------------
    def observe(self) -> None:
        """Accumulate IGIA from the current gradients. Call after backward (and clipping), before the
        optimizer step, once per optimizer step. A no-op outside the window."""
        if not self.observing or not self.backend.at_boundary():
            return
        assert self.acc is not None
        if self.mode == "full":
            grads = self.backend.full_grads(self.weights)
            norms = sq_norms(grads.values())  # one read of each gradient piece, one host sync
            ok, scale = self.backend.step_check(grads.values(), norms, self.weights.values())
            if ok:
                self.acc.add_full_step(grads, scale, norms)
        else:
            lgrads = self.backend.lora_grads(self.factors)
            ok, scale = self.backend.step_check(t for pair in lgrads.values() for t in pair)
            if ok:
                self.acc.add_lora_step(lgrads, scale)
        if not ok:
            self.acc.skip_step()
        if not ok:
            log.warning("step %d has non-finite gradients: not observed", self.steps_seen)
        self.steps_seen += 1
        self._progress()

    def _progress(self) -> None:
        if not self.config.progress_bar or self.backend.rank != 0:
            return
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.window, desc="gradpruner: observing", unit="step", leave=False)
        self._bar.update(1)
        if self.steps_seen >= self.window:
            self._bar.close()
            self._bar = None

    # ---- the decision ---------------------------------------------------------------------------------
    def compute_scores(self) -> list[float]:
        """Global per-layer scores: one SUM all-reduce of the packed partial table."""
        assert self.acc is not None
        crit = get_criterion(self.config.effective_criterion)
        spans: tuple[int, ...] = ()
        if crit.source == "activation":  # hidden-state statistics replace the IGIA table
            assert self.collector is not None
            table = self.collector.table()
            spans = self.collector.spans
            self.backend.all_reduce_sum_(table)
        elif crit.source == "static":  # no data: nothing to reduce
            table = torch.zeros(1, self.num_layers, dtype=torch.float64)
        else:
            weights = None
            if crit.needs_saliency or crit.needs_weight_norm:
                weights = self.backend.local_weights(self.weights)
            table = partial_table(self.acc, crit.name, weights)
            self.backend.all_reduce_sum_(table)
        ctx = ScoreContext(
            self.num_layers,
            self.spec.residual_writers,
            budget=self.num_drop + self.num_merge,
            spans=spans,
            seed=self.seed,
            given=tuple(self.config.layers_to_remove or ()),
        )
        return layer_scores(table, self.keys, crit.name, ctx)

    def make_plan(self, step: int | None = None) -> PrunePlan:
        """Scores -> the frozen plan, checked for agreement across ranks."""
        assert self.acc is not None
        if self.acc.steps == 0:
            raise user_error(
                "the observation window must contain at least one step with finite gradients",
                f"{self.acc.skipped} of {self.steps_seen} steps non-finite",
                "lower the learning rate / fix the loss scale, or lengthen window_steps",
            )
        if self.acc.skipped and self.acc.steps < (self.steps_seen + 1) // 2:
            log.warning(
                "only %d of %d observed steps had finite gradients: the scores rest on few steps "
                "(lengthen window_steps, or check the loss scale / learning rate)",
                self.acc.steps,
                self.steps_seen,
            )
        scores = self.compute_scores()
        plan = make_plan(
            scores,
            self.num_drop,
            self.num_merge,
            criterion=self.config.effective_criterion,
            observed_steps=self.acc.steps,
            skipped_steps=self.acc.skipped,
            step=self.steps_seen if step is None else step,
            config_digest=self.config.config_digest(),
            model_type=str(getattr(unwrap_model(self.model).config, "model_type", "")),
            extra={
                "mode": self.mode,
                "keep_fraction": self.config.keep_fraction,
                "sign_consistent": self.config.sign_consistent,
                "merge_rule": self.config.merge_rule,
            },
            protect=self.config.protect_layers,
        )
        self.backend.check_plan(plan, self.config.consensus_timeout_s)
        return plan

    # ---- the merge ------------------------------------------------------------------------------------
    def merge(self, plan: PrunePlan) -> dict[str, Any]:
        """Sparsify each merged layer by its IGIA and add it, sign-consistently, into its target.

        Returns merge statistics (global fractions of entries selected by the top-p mask and merged).
        """
        assert self.acc is not None
        if not plan.merged:
            return {"merge": []}
        names = list(self.spec.linear_names)
        mkeys = [(p, n) for p in plan.merged for n in names]
        igia = {k: self.acc.igia(k).reshape(-1) for k in mkeys}
        rule: MergeRule
        if self.config.merge_rule == "laco":  # unmasked: every entry of this rank's piece
            rule = "laco"
            masks = {k: torch.ones_like(igia[k], dtype=torch.bool) for k in mkeys}
        else:
            rule = "sign" if self.config.sign_consistent else "masked"
            ks = [
                keep_count(self.backend.global_numel(self.weights[k]), self.config.keep_fraction)
                for k in mkeys
            ]
            thresholds = kth_largest([igia[k] for k in mkeys], ks, self.backend.all_reduce_sum_)
            masks = {k: topk_mask(igia[k], thr) for k, thr in zip(mkeys, thresholds, strict=True)}
        del igia
        by_target: dict[int, list[int]] = defaultdict(list)
        for p, t in plan.targets:
            by_target[t].append(p)
        groups = [
            ((t, n), [((p, n), masks[(p, n)]) for p in sources])
            for t, sources in sorted(by_target.items())
            for n in names
        ]
        # each target matrix is merged in one call, so every source's sign test sees the ORIGINAL target
        local_counts = self.backend.apply_merge(self.weights, groups, rule)
        counts = torch.tensor([list(local_counts.get(k, (0, 0))) for k in mkeys], dtype=torch.int64)
        self.backend.all_reduce_sum_(counts)
        col = {k: i for i, k in enumerate(mkeys)}
        stats = []
        for k in mkeys:
            numel = self.backend.global_numel(self.weights[k])
            sel, added = counts[col[k]].tolist()
            stats.append(
                {
                    "layer": k[0],
                    "sublayer": k[1],
                    "mask_density": sel / numel,
                    "merged_density": added / numel,
                }
            )
        return {"merge": stats}

    # ---- the whole prune ----------------------------------------------------------------------------
    def maybe_prune(self, optimizer: Any = None, lr_scheduler: Any = None) -> tuple[Any, Any]:
        """Prune if the window is complete; returns the (possibly rebuilt) optimizer and scheduler."""
        if not self.ready:
            return optimizer, lr_scheduler
        return self.prune(optimizer, lr_scheduler)

    def prune(self, optimizer: Any = None, lr_scheduler: Any = None) -> tuple[Any, Any]:
        """Plan, merge, remove the layers and rebuild the optimizer; training continues after it."""
        plan = self.make_plan()
        if self.collector is not None:  # the activation hooks end with the window
            self.collector.remove()
            self.collector = None
        params_before = count_params(self.model, self.backend)
        merge_stats = self.merge(plan)
        optimizer, lr_scheduler = self._cut(plan, optimizer, lr_scheduler)
        params_after = count_params(self.model, self.backend)
        self.report = build_report(
            plan, params_before=params_before, params_after=params_after, extra=merge_stats
        )
        self._write_report()
        log.info(
            "pruned layers %s (dropped %s, merged %s); parameters %d -> %d (%.1f%%)",
            list(plan.removed),
            list(plan.dropped),
            [f"{p}->{t}" for p, t in plan.targets],
            params_before,
            params_after,
            100.0 * params_after / params_before,
        )
        return optimizer, lr_scheduler

    def _cut(self, plan: PrunePlan, optimizer: Any, lr_scheduler: Any) -> tuple[Any, Any]:
        """Remove the plan's layers, forget every reference to them, rebuild the optimizer/engine."""
        removed_layers = [decoder_layers(self.model)[i] for i in plan.removed]
        removed_params = [p for layer in removed_layers for p in layer.parameters()]
        remove_layers(self.model, list(plan.removed))
        unwrap_model(self.model).config.gradpruner = {
            "plan_digest": plan.digest(),
            "kept_layers": list(plan.kept),
            "original_num_layers": plan.num_layers,
        }
        self.plan = plan
        self.acc = None  # frees the IGIA state
        self.weights, self.factors = {}, {}  # no reference to removed parameters may survive
        del removed_layers
        return self.backend.rebuild(self.model, removed_params, optimizer, lr_scheduler)

    def replay(self, plan: PrunePlan, optimizer: Any = None, lr_scheduler: Any = None) -> tuple[Any, Any]:
        """Re-apply a saved plan's surgery to the dense model (resume): no scoring and no merge, since
        the checkpoint that is loaded next holds the merged weights."""
        if plan.num_layers != self.num_layers or plan.config_digest != self.config.config_digest():
            raise user_error(
                "a saved plan must come from the same model and gradpruner settings",
                f"plan for {plan.num_layers} layers / config {plan.config_digest[:12]}",
                "resume with the dense model and the gradpruner block of the run that saved it",
            )
        if self.plan is not None:
            raise AssertionError("the model is already pruned")
        self.backend.check_plan(plan, self.config.consensus_timeout_s)
        log.info("resuming a pruned run: replaying the plan's surgery (layers %s)", list(plan.removed))
        return self._cut(plan, optimizer, lr_scheduler)

    def _write_report(self) -> None:
        if self.config.output_dir is None or self.backend.rank != 0:
            return
        assert self.plan is not None and self.report is not None
        paths = write_report(Path(self.config.output_dir), self.report, self.plan, plot=self.config.plot)
        log.info("report written: %s", ", ".join(str(p) for p in paths))
