"""The single-process (plain PyTorch) engine: gradients, weights and the optimizer are plain PyTorch objects."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradpruner_ds.backends.optimizer_state import prune_torch_optimizer_
from gradpruner_ds.core.igia import Key, sq_norms
from gradpruner_ds.core.merge import MergeRule, merge_
from gradpruner_ds.core.plan import PrunePlan
from gradpruner_ds.engine import MergeGroup
from gradpruner_ds.errors import user_error


class Backend:
    """One process, no sharding: gradients, weights and the optimizer are plain PyTorch objects (the
    :class:`~gradpruner_ds.engine.EngineAdapter` contract's reference implementation).

    Sharded engines subclass this and override the hooks: where the reduced local gradient shard is,
    which piece of a weight this rank holds, how to sum over ranks, and how to rebuild the engine.
    """

    rank: int = 0
    world_size: int = 1
    timeout_s: float | None = None
    teacher_refused: str | None = None
    """Why this engine cannot hold a distillation teacher (``recovery``), or None when it can."""
    """Every collective of the pruner is bounded by this (``consensus_timeout_s``; set by check_settings)."""

    def at_boundary(self) -> bool:
        """True when the gradients are complete for an optimizer step (always, for plain PyTorch:
        call ``observe`` once per optimizer step, after the last backward of the accumulation)."""
        return True

    # ---- collectives (identity in one process) --------------------------------------------------
    def all_reduce_sum_(self, t: torch.Tensor) -> None:
        """Sum ``t`` in place over all ranks."""

    def all_true(self, flag: bool) -> bool:
        """True iff ``flag`` holds on every rank."""
        return flag

    def check_settings(self, settings: dict[str, Any], timeout_s: float) -> None:
        """Fail on every rank if any rank runs other GradPruner settings (no-op in one process)."""
        self.timeout_s = timeout_s

    def check_plan(self, plan: PrunePlan, timeout_s: float) -> None:
        """Fail on every rank if any rank holds a different plan (no-op in one process)."""

    def check_same(self, digest: str, what: str) -> None:
        """Fail on every rank if any rank computed another ``digest`` of ``what`` (no-op in one process)."""

    def step_check(
        self,
        observed: Iterable[torch.Tensor],
        norms: torch.Tensor | None = None,
        params: Collection[nn.Parameter] = (),
    ) -> tuple[bool, float]:
        """``(ok, scale)`` for the gradients of this step: ok iff every rank's are finite; ``scale``
        turns the gradients read into the ones the optimizer applies (loss-scale and clipping factor
        when the engine applies them after our read; 1.0 when the user already clipped).

        ``norms``: :func:`~gradpruner_ds.core.igia.sq_norms` of ``observed`` when the caller has them
        (then the gradients are not read again); ``params``: the parameters whose local gradient
        pieces ``observed`` are (from :meth:`full_grads`), for backends that need every trainable
        gradient's norm and can then skip these."""
        if norms is None:
            norms = sq_norms(observed)
        return self.all_true(bool(torch.isfinite(norms).all())), 1.0

    # ---- reading gradients and weights ------------------------------------------------------------
    def local_grad(self, p: nn.Parameter) -> torch.Tensor | None:
        """This rank's reduced gradient piece of any trainable parameter (None if it has none)."""
        return p.grad

    def full_grads(self, params: Mapping[Key, nn.Parameter]) -> dict[Key, torch.Tensor]:
        """This rank's reduced (data-parallel averaged, clipped) gradient piece of each weight."""
        out = {}
        for key, p in params.items():
            if p.grad is None:
                raise AssertionError(f"no gradient for {key}: is the weight trainable?")
            out[key] = p.grad
        return out

    def lora_grads(
        self, factors: Mapping[Key, tuple[nn.Parameter, nn.Parameter]]
    ) -> dict[Key, tuple[torch.Tensor, torch.Tensor]]:
        """Whole ``(grad(B), grad(A))`` of each LoRA pair (``factors`` maps key -> (A, B))."""
        out = {}
        for key, (a, b) in factors.items():
            if a.grad is None or b.grad is None:
                raise AssertionError(f"no LoRA gradient for {key}")
            out[key] = (b.grad, a.grad)
        return out

    def local_weights(self, params: Mapping[Key, nn.Parameter]) -> dict[Key, torch.Tensor]:
        """The piece of each weight this rank owns, as a tensor whose in-place edits update the model
        (laid out like the IGIA piece of ``full_grads``)."""
        return {k: p.data for k, p in params.items()}

    def global_numel(self, p: nn.Parameter) -> int:
        """Number of entries of the whole (unsharded) weight."""
        return p.numel()

    def lora_slices(self, params: Mapping[Key, nn.Parameter]) -> dict[Key, tuple[int, int]] | None:
        """(offset, numel) of the flat slice of each base weight this rank holds; None = whole."""
        return None

    def apply_merge(
        self,
        params: Mapping[Key, nn.Parameter],
        groups: Sequence[MergeGroup],
        merge_rule: MergeRule,
        sign_consistent: bool = True,
    ) -> dict[Key, tuple[int, int]]:
        """Merge each group's masked sources into its target (method.md), in every copy of the weight
        the engine keeps. Returns per merged matrix this rank's (mask entries, merged entries) counts,
        which sum over ranks to the global counts. Here: pieces are aligned, merge is local."""
        local = self.local_weights(params)
        counts: dict[Key, tuple[int, int]] = {}
        for tkey, sources in groups:
            target = local[tkey]
            pairs = [(local[s].reshape(target.shape), m.reshape(target.shape)) for s, m in sources]
            added = merge_(target, pairs, merge_rule, sign_consistent)
            for (skey, mask), n in zip(sources, added, strict=True):
                counts[skey] = (int(mask.sum()), n)
            self.store_weight(params[tkey], target)
        return counts

    def store_weight(self, param: nn.Parameter, local_piece: torch.Tensor) -> None:
        """Write back a weight piece from ``local_weights`` after an edit (no-op: it is a view)."""

    def transform_weight(self, param: nn.Parameter, fn: Callable[[torch.Tensor], torch.Tensor]) -> int:
        """Replace the whole weight ``W`` by ``fn(W)`` in every copy the engine keeps (``fn`` gets the whole
        weight, runs identically on every rank and returns a tensor of its shape). Returns the bytes this rank
        exchanged to assemble it (0 here)."""
        with torch.no_grad():
            param.data.copy_(fn(param.data).to(param.dtype))
        return 0

    def reset_optimizer_state(self, stepper: Any, params: Sequence[nn.Parameter]) -> None:
        """Zero the optimizer moments of ``params`` (every tensor of their state but ``step``) in what the loop
        steps (a torch optimizer here)."""
        opt = (
            stepper if isinstance(stepper, torch.optim.Optimizer) else getattr(stepper, "optimizer", stepper)
        )
        for p in params:
            for key, value in opt.state.get(p, {}).items():
                if key != "step" and isinstance(value, torch.Tensor):
                    value.zero_()

    # ---- checkpoints of the engine's own state ----------------------------------------------------
    def default_tag(self, stepper: Any) -> str:
        """The checkpoint tag when none is given: ``step<optimizer steps taken>``."""
        steps = [int(st["step"]) for st in getattr(stepper, "state", {}).values() if "step" in st]
        return f"step{max(steps, default=0)}"

    def save_engine_state(
        self,
        stepper: Any,
        model: nn.Module,
        save_dir: Path,
        tag: str,
        lr_scheduler: Any,
        client_state: Mapping[str, Any],
        save_id: str,
    ) -> None:
        """This rank's model weights, optimizer and scheduler state and ``client_state`` (JSON-able) as
        ``<tag>/engine_rank<r>.safetensors`` (no pickle; this rank's shards where the engine shards)."""
        from gradpruner_ds.io import write_tensors

        state = {
            "model": {k: self.local(v) for k, v in model.state_dict().items()},
            "optimizer": self.optimizer_state(stepper),
            "scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
            "client": dict(client_state),
        }
        (save_dir / tag).mkdir(parents=True, exist_ok=True)
        write_tensors(save_dir / tag / f"engine_rank{self.rank}.safetensors", state, save_id)

    def load_engine_state(
        self, stepper: Any, model: nn.Module, load_dir: Path, tag: str, lr_scheduler: Any
    ) -> dict[str, Any]:
        """Restore :meth:`save_engine_state` into ``model`` (already replayed to the saved structure), the
        optimizer ``stepper`` and ``lr_scheduler``; returns the client state."""
        import json

        from gradpruner_ds.io import read_tensors

        save_id = json.loads((load_dir / tag / "gradpruner" / "state.json").read_text()).get("save_id", "")
        path = load_dir / tag / f"engine_rank{self.rank}.safetensors"
        saved = read_tensors(path, save_id, what="engine state")
        weights = model.state_dict()
        if set(weights) != set(saved["model"]):
            raise user_error(
                "a checkpoint's model weights must be those of the model it is loaded into",
                f"{path}: {sorted(set(weights) ^ set(saved['model']))[:4]} differ",
                "resume with the model (and gradpruner block) of the run that saved it",
            )
        with torch.no_grad():
            for k, v in weights.items():
                self.local(v).copy_(saved["model"][k])
        if stepper is not None:
            self.load_optimizer_state(stepper, saved["optimizer"])
        if lr_scheduler is not None and saved["scheduler"] is not None:
            lr_scheduler.load_state_dict(saved["scheduler"])
        return dict(saved["client"])

    @staticmethod
    def local(t: torch.Tensor) -> torch.Tensor:
        """This rank's piece of a model or optimizer tensor (the tensor itself in one process)."""
        return t

    def optimizer_state(self, optimizer: Any) -> dict[str, Any] | None:
        """The torch optimizer's state dict (this rank's pieces of its tensors)."""
        if optimizer is None:
            return None
        sd = optimizer.state_dict()
        return {"state": {str(k): {n: self.local(v) if torch.is_tensor(v) else v for n, v in st.items()}
                          for k, st in sd["state"].items()},
                "param_groups": sd["param_groups"]}  # fmt: skip

    def load_optimizer_state(self, optimizer: Any, saved: Mapping[str, Any] | None) -> None:
        if saved is None:
            return
        optimizer.load_state_dict(
            {
                "state": {int(k): dict(v) for k, v in saved["state"].items()},
                "param_groups": saved["param_groups"],
            }
        )

    def log_events(self, events: Mapping[str, float], step: int) -> None:
        """Send the prune's scalar events to the engine's experiment tracker (none here)."""

    def make_teacher(self, model: nn.Module) -> nn.Module:
        """A frozen copy of ``model`` as it is now, laid out like it (whole weights: one process and ZeRO-1/2;
        FSDP2 overrides this to copy each rank's shards), for the distillation after the prune (``recovery``).

        The copy carries no hooks: every hook table on every module (an engine's gradient hooks, the
        statistics' forward hooks) is emptied for the copy and restored on ``model`` -- a copied hook
        would drive a copy of the engine or feed the student's statistics with the teacher's activations."""
        import copy

        saved = []
        for m in model.modules():
            for name, value in list(vars(m).items()):
                if "hook" in name and isinstance(value, dict) and value:
                    saved.append((m, name, value))
                    setattr(m, name, type(value)())
        try:
            teacher = copy.deepcopy(model)
        finally:
            for m, name, value in saved:
                setattr(m, name, value)
        teacher.requires_grad_(False)
        return teacher

    # ---- continuing after the surgery -------------------------------------------------------------
    def rebuild(
        self,
        model: nn.Module,
        removed_params: list[nn.Parameter],
        optimizer: Any,
        lr_scheduler: Any,
    ) -> tuple[Any, Any]:
        """Drop the removed parameters from the optimizer in place, carrying every kept parameter's
        state (e.g. Adam's exp_avg, exp_avg_sq, step). The LR scheduler keeps pointing at the same
        optimizer, so its schedule continues unchanged."""
        if optimizer is not None:  # a wrapper's torch optimizer (accelerate's AcceleratedOptimizer) likewise
            inner = (
                optimizer
                if isinstance(optimizer, torch.optim.Optimizer)
                else getattr(optimizer, "optimizer", optimizer)
            )
            prune_torch_optimizer_(inner, removed_params)
        return optimizer, lr_scheduler
