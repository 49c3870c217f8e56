# DeepSpeed attaches its partitioning state (ds_tensor, ds_numel, _hp_mapping, ...) to Parameter
# objects at run time, so attribute checks cannot see it:
# mypy: disable-error-code="attr-defined"
"""DeepSpeed ZeRO-1/2/3 engine adapter: the only module that knows DeepSpeed internals.

Where things are (DeepSpeed 0.19.8, checked by tests/dist):

* ZeRO-3: each parameter is partitioned as a flat slice of ``ceil(numel / world)`` entries per rank
  (``p.ds_tensor``; padding at the end of the last rank). Between ``engine.backward`` at an
  accumulation boundary and ``engine.step``, ``safe_get_local_grad(p)`` is this rank's slice of the
  reduced, averaged, not yet clipped gradient, and ``safe_get/set_local_fp32_param`` /
  ``safe_get/set_local_optimizer_state`` address the fp32 master and Adam state of the same slice.
  Same-named sublayers of different layers have the same shape, hence the same slices: the merge is
  shard-local.
* ZeRO-1/2: the low-precision parameters are replicated; the fp32 master and optimizer state are
  flat partitions, and ``p._hp_mapping`` names this rank's fragment of each parameter (offsets differ
  from parameter to parameter). The fragment of the reduced gradient is ``get_lp_grad_fragment``.

After the surgery the engine is rebuilt in place: a new ``deepspeed.initialize`` over the same
(pruned) module with a new client optimizer of the same class and hyper-parameters; fp32 masters,
Adam moments and ``step`` of the kept parameters are carried (ZeRO-3: slice by slice, no gather;
ZeRO-1/2: one layer at a time, since fragments move when the flat partitions shrink), and the old
engine is torn down completely (its hooks, ZeRO-3's module stack, coordinator cache and per-module
backward closures would otherwise keep it and the dropped layers alive).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradpruner_ds.backends.base import MergeGroup
from gradpruner_ds.backends.sharded import ShardedBackend
from gradpruner_ds.core.igia import Key, sq_norms
from gradpruner_ds.core.merge import MergeRule, merge_
from gradpruner_ds.diagnostics import release_memory
from gradpruner_ds.errors import user_error
from gradpruner_ds.log import get_logger

log = get_logger("deepspeed")


def skip_cpu_shm_comm_build() -> None:
    """Stop the first ``deepspeed.init_distributed`` on CPU from JIT-compiling a shared-memory comm op
    (~50 s) that training never uses (it serves inference all-reduce only)."""
    import deepspeed  # noqa: F401  (makes sure the module below is loaded)

    # ``deepspeed.comm.torch`` as an attribute is the torch package (deepspeed.comm re-exports it)
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # type: ignore[attr-defined]


class DeepSpeedBackend(ShardedBackend):
    """GradPruner on a ``deepspeed.DeepSpeedEngine`` with ZeRO stage 1, 2 or 3."""

    def __init__(self, engine: Any, ds_config: Mapping[str, Any]) -> None:
        self.engine = engine
        self.ds_config = dict(ds_config)
        self.stage = int(engine.zero_optimization_stage())
        if self.stage not in (1, 2, 3):
            raise user_error(
                "the DeepSpeed backend supports ZeRO stages 1, 2 and 3",
                self.stage,
                'set "zero_optimization": {"stage": 1|2|3} in the DeepSpeed config',
            )
        self.group = engine.optimizer.dp_process_group
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)

    def at_boundary(self) -> bool:
        """Gradients are complete (reduced) only at a gradient-accumulation boundary."""
        return bool(self.engine.is_gradient_accumulation_boundary())

    # ---- this rank's pieces -------------------------------------------------------------------------
    def _z3_valid(self, p: nn.Parameter) -> int:
        """Entries of ``p.ds_tensor`` that belong to the parameter (the rest is padding)."""
        part = p.ds_tensor.numel()
        return max(0, min(part, p.ds_numel - self.rank * part))

    def _frag(self, p: nn.Parameter) -> tuple[int, int]:
        """(offset, numel) of this rank's piece of ``p`` in the flattened parameter."""
        if self.stage == 3:
            return self.rank * p.ds_tensor.numel(), self._z3_valid(p)
        if not p.requires_grad:  # replicated frozen weight (LoRA base): split evenly, like ZeRO-3
            part = -(-p.numel() // self.world_size)
            return min(self.rank * part, p.numel()), max(0, min(part, p.numel() - self.rank * part))
        hm = getattr(p, "_hp_mapping", None)
        if hm is None:
            return 0, 0
        return hm.lp_fragment_address.start, hm.lp_fragment_address.numel

    def local_grad(self, p: nn.Parameter) -> torch.Tensor | None:
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_grad

            g = safe_get_local_grad(p)
            return None if g is None else g.reshape(-1)[: self._z3_valid(p)]
        return self._local_grad(p)

    def _local_grad(self, p: nn.Parameter) -> torch.Tensor:
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_grad

            g = safe_get_local_grad(p)
            if g is None:
                raise AssertionError(
                    "no local gradient: call observe() between engine.backward and engine.step"
                )
            return g.reshape(-1)[: self._z3_valid(p)]
        hm = getattr(p, "_hp_mapping", None)
        if hm is None:
            return torch.zeros(0, dtype=torch.float32)
        g = hm.get_lp_grad_fragment(p._index_in_param_group).reshape(-1)
        start, numel = self._frag(p)
        if g.numel() == p.numel() and numel != p.numel():  # bf16 keeps a full accumulation buffer
            g = g.narrow(0, start, numel)
        return g

    def _trainable(self) -> list[nn.Parameter]:
        return [p for p in self.engine.module.parameters() if p.requires_grad]

    def step_check(
        self,
        observed: Iterable[torch.Tensor],
        norms: torch.Tensor | None = None,
        params: Collection[nn.Parameter] = (),
    ) -> tuple[bool, float]:
        """One all-reduce: the squared norm of ALL trainable gradients (non-finite iff any entry is), from which
        the engine's clipping factor (applied later, inside ``engine.step``) is recomputed. With ``norms``
        and ``params`` (the local pieces' norms of the observed weights) only the other trainable
        gradients are read here."""
        skip: set[int] = set()
        total = torch.zeros((), dtype=torch.float64)
        if norms is not None and params:
            skip = {id(p) for p in params}
            total += norms.sum()
        rest = [self._local_grad(p) for p in self._trainable() if id(p) not in skip]
        stats = (total + sq_norms(rest).sum()).reshape(1)  # inf/nan if any entry is: no separate pass
        self.all_reduce_sum_(stats)
        if not math.isfinite(float(stats[0])):
            return False, 1.0
        loss_scale = float(getattr(self.engine.optimizer, "loss_scale", 1.0) or 1.0)
        scale = 1.0 / loss_scale
        clip = float(self.engine.gradient_clipping() or 0.0)
        if clip > 0:
            norm = math.sqrt(float(stats[0])) / loss_scale
            scale *= min(1.0, clip / (norm + 1e-6))
        return True, scale

    def full_grads(self, params: Mapping[Key, nn.Parameter]) -> dict[Key, torch.Tensor]:
        return {k: self._local_grad(p) for k, p in params.items()}

    def _shape(self, p: nn.Parameter) -> torch.Size:
        return p.ds_shape if self.stage == 3 else p.shape

    def global_numel(self, p: nn.Parameter) -> int:
        return int(p.ds_numel) if self.stage == 3 else p.numel()

    def lora_slices(self, params: Mapping[Key, nn.Parameter]) -> dict[Key, tuple[int, int]] | None:
        return {k: self._frag(p) for k, p in params.items()}

    def local_weights(self, params: Mapping[Key, nn.Parameter]) -> dict[Key, torch.Tensor]:
        """fp32 master pieces (copies for ZeRO-3; views into the flat partition for ZeRO-1/2)."""
        out = {}
        for k, p in params.items():
            if self.stage == 3:
                from deepspeed.utils import safe_get_local_fp32_param

                if p.requires_grad:
                    out[k] = safe_get_local_fp32_param(p).reshape(-1)[: self._z3_valid(p)].clone()
                else:  # frozen base weight (LoRA mode): its only copy is ds_tensor
                    out[k] = p.ds_tensor.reshape(-1)[: self._z3_valid(p)].float().clone()
            else:
                hm = getattr(p, "_hp_mapping", None)
                if hm is not None:
                    out[k] = hm.get_hp_fragment().data.reshape(-1)
                else:
                    start, numel = self._frag(p)
                    out[k] = p.data.reshape(-1)[start : start + numel].float()
        return out

    # ---- merge ------------------------------------------------------------------------------------------
    def apply_merge(
        self, params: Mapping[Key, nn.Parameter], groups: Sequence[MergeGroup], rule: MergeRule
    ) -> dict[Key, tuple[int, int]]:
        if self.stage == 3:
            return super().apply_merge(params, groups, rule)
        return self._apply_merge_zero12(params, groups, rule)

    def store_weight(self, param: nn.Parameter, local_piece: torch.Tensor) -> None:
        """ZeRO-3: write the merged slice into the fp32 master and the low-precision shard."""
        valid = self._z3_valid(param)
        param.ds_tensor.data.reshape(-1)[:valid].copy_(local_piece.to(param.ds_tensor.dtype))
        if param.requires_grad:
            from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

            master = safe_get_local_fp32_param(param).reshape(-1).clone()
            master[:valid] = local_piece
            safe_set_local_fp32_param(param, master)

    def _full_fp32(self, p: nn.Parameter) -> torch.Tensor:
        """ZeRO-1/2: the whole fp32 value of one parameter from the ranks' master fragments."""
        hm = getattr(p, "_hp_mapping", None)
        if not p.requires_grad:
            return p.data.float().clone()  # frozen: replicated, never in the optimizer
        buf = torch.zeros(p.numel(), dtype=torch.float32)
        if hm is not None:
            start, numel = self._frag(p)
            buf[start : start + numel] = hm.get_hp_fragment().reshape(-1)
        self.all_reduce_sum_(buf)
        return buf.view(p.shape)

    def _apply_merge_zero12(
        self, params: Mapping[Key, nn.Parameter], groups: Sequence[MergeGroup], rule: MergeRule
    ) -> dict[Key, tuple[int, int]]:
        """Fragments of different parameters do not line up, so each target is merged whole, one
        matrix at a time: masks and fp32 values are assembled from fragments (sum of disjoint pieces),
        every rank computes the same merge, writes its master fragment and the replicated copy."""
        counts: dict[Key, tuple[int, int]] = {}
        for tkey, sources in groups:
            tp = params[tkey]
            target = self._full_fp32(tp).clone()
            pairs = []
            for skey, mask_piece in sources:
                sp = params[skey]
                full_mask = torch.zeros(sp.numel(), dtype=torch.uint8)
                start, numel = self._frag(sp)
                full_mask[start : start + numel] = mask_piece.to(torch.uint8)
                self.all_reduce_sum_(full_mask)
                pairs.append((self._full_fp32(sp), full_mask.view(sp.shape).bool()))
            added = merge_(target, pairs, rule)
            t_start, t_numel = self._frag(tp)
            for (skey, mask_piece), n_added in zip(sources, added, strict=True):
                # mask pieces are disjoint over ranks; the whole-matrix merge ran on every rank, so only
                # rank 0 reports its count, and the all-reduced counts equal the global ones
                counts[skey] = (int(mask_piece.sum()), n_added if self.rank == 0 else 0)
            hm = getattr(tp, "_hp_mapping", None)
            if hm is not None:
                hm.get_hp_fragment().data.reshape(-1).copy_(target.reshape(-1)[t_start : t_start + t_numel])
            tp.data.copy_(target.to(tp.dtype))
        return counts

    def log_events(self, events: Mapping[str, float], step: int) -> None:
        """DeepSpeed's monitor (the config's ``tensorboard`` / ``wandb`` / ``csv_monitor`` / ``comet`` blocks):
        it writes on rank 0 when one is enabled."""
        monitor = getattr(self.engine, "monitor", None)
        if monitor is not None and getattr(monitor, "enabled", False):
            monitor.write_events([(name, value, step) for name, value in events.items()])

    # ---- rebuild --------------------------------------------------------------------------------------
    def rebuild(
        self,
        model: nn.Module,
        removed_params: list[nn.Parameter],
        optimizer: Any,
        lr_scheduler: Any,
    ) -> tuple[Any, Any]:
        """Tear down the engine, re-initialize DeepSpeed over the pruned module and carry the kept
        parameters' fp32 masters, Adam moments, step, the LR schedule and the engine's counters.
        Returns ``(new_engine, lr_scheduler)``."""
        import deepspeed

        old = self.engine
        gone = {id(p) for p in removed_params}
        client = old.optimizer.optimizer  # the torch optimizer DeepSpeed wraps
        client_cls = type(client)
        hparams = [{k: v for k, v in g.items() if k != "params"} for g in client.param_groups]
        kept_groups: list[list[nn.Parameter]] = [[] for _ in hparams]
        if self.stage == 3:  # ZeRO-3 splits each client group into sub-groups
            for i, sub in enumerate(old.optimizer.fp16_groups):
                kept_groups[old.optimizer.sub_group_to_group_id[i]].extend(
                    p for p in sub if id(p) not in gone
                )
        else:
            for i, grp in enumerate(old.optimizer.bit16_groups):
                kept_groups[i].extend(p for p in grp if id(p) not in gone)
        step = _adam_step(client)
        moments = any("exp_avg" in st for st in client.state.values())  # none before the first step
        carried = self._save_state([p for g in kept_groups for p in g], moments)
        counters = {
            k: getattr(old, k) for k in ("global_steps", "global_samples", "micro_steps", "skipped_steps")
        }
        old_scheduler = old.lr_scheduler

        _teardown(old, removed_params)
        del old, client
        self.engine = None
        removed_params.clear()
        release_memory()

        new_client = client_cls(
            [{**h, "params": ps} for h, ps in zip(hparams, kept_groups, strict=True) if ps]
        )
        if lr_scheduler is None:
            lr_scheduler = old_scheduler  # a scheduler DeepSpeed built from the config's "scheduler"
        if lr_scheduler is not None:
            lr_scheduler.optimizer = new_client
        # the optimizer and scheduler objects are carried, so the config must not build new ones
        config = {k: v for k, v in self.ds_config.items() if k not in ("optimizer", "scheduler")}
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=new_client, config=config, lr_scheduler=lr_scheduler
        )
        self.engine = engine
        self.group = engine.optimizer.dp_process_group
        for k, v in counters.items():
            setattr(engine, k, v)
        self._restore_state(carried, step, moments)
        return engine, lr_scheduler

    def rebind(self, old: Any) -> None:
        """Make the torn-down engine object ``old`` the current (rebuilt) engine: both share one attribute
        dict, so code that holds ``old`` (the HF Trainer's inner loop keeps it in a local variable) drives the
        pruned engine, and this backend uses ``old`` from now on."""
        new = self.engine
        if type(old) is not type(new):
            raise TypeError(f"cannot rebind a {type(old).__name__} to a {type(new).__name__}")
        object.__setattr__(old, "__dict__", new.__dict__)
        self.engine = old

    def _save_state(self, kept: list[nn.Parameter], moments: bool) -> dict[int, dict[str, Any]]:
        """This rank's piece of each kept parameter's fp32 master and (once the optimizer has
        stepped) Adam moments — local copies, no gather."""
        out: dict[int, dict[str, Any]] = {}
        keys = ("exp_avg", "exp_avg_sq") if moments else ()
        if self.stage != 3 and moments:
            # DeepSpeed links each fragment to the optimizer state once, right after the FIRST param
            # group has stepped, so with several groups (the HF Trainer's decay / no-decay split) the
            # later groups' fragments point at a still-empty state: link again now that all exist
            opt = self.engine.optimizer
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()
        for p in kept:
            entry: dict[str, Any] = {"param": p, "frag": self._frag(p)}
            if self.stage == 3:
                from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

                entry["fp32"] = safe_get_local_fp32_param(p).clone()
                for k in keys:
                    entry[k] = safe_get_local_optimizer_state(p, k).clone()
            else:
                hm = p._hp_mapping
                if hm is not None:
                    entry["fp32"] = hm.get_hp_fragment().clone()
                    for k in keys:
                        entry[k] = hm.get_optim_state_fragment(k).clone()
            out[id(p)] = entry
        return out

    def _restore_state(self, carried: dict[int, dict[str, Any]], step: Any, moments: bool) -> None:
        opt = self.engine.optimizer
        client = opt.optimizer
        # torch Adam creates its state lazily at the first step: create it now, then fill it
        flats = opt.fp32_partitioned_groups_flat if self.stage == 3 else opt.single_partition_of_fp32_groups
        for flat in flats:
            client.state[flat] = {
                "step": step.clone() if torch.is_tensor(step) else step,
                "exp_avg": torch.zeros_like(flat),
                "exp_avg_sq": torch.zeros_like(flat),
            }
        if self.stage != 3:  # link the new per-parameter fragments to the state just created
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()
        for entry in carried.values():
            p = entry["param"]
            if self.stage == 3:
                from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

                safe_set_local_fp32_param(p, entry["fp32"])
                for k in ("exp_avg", "exp_avg_sq"):
                    if k in entry:
                        safe_set_local_optimizer_state(p, entry[k], k)
                continue
            # ZeRO-1/2: the fragments moved; assemble one parameter at a time from the old fragments
            old_start, old_numel = entry["frag"]
            hm = p._hp_mapping
            new_start, new_numel = self._frag(p)
            for key in ("fp32", "exp_avg", "exp_avg_sq") if moments else ("fp32",):
                buf = torch.zeros(p.numel(), dtype=torch.float32)
                if key in entry:
                    buf[old_start : old_start + old_numel] = entry[key].reshape(-1)
                self.all_reduce_sum_(buf)
                if hm is not None:
                    dst = hm.get_hp_fragment() if key == "fp32" else hm.get_optim_state_fragment(key)
                    dst.data.reshape(-1).copy_(buf[new_start : new_start + new_numel])
        carried.clear()


@contextlib.contextmanager
def gather_full(params: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """ZeRO-3: the whole values of ``params`` on every rank for the duration of the block (a collective)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(params), modifier_rank=None):
        yield list(params)


_FROM_BLOCK: Any = object()


def for_deepspeed(
    engine: Any,
    ds_config: Mapping[str, Any],
    *,
    total_steps: int | None = None,
    config: Any = _FROM_BLOCK,
) -> Any:
    """A ``GradPruner`` on a DeepSpeed engine. ``config``: the ``GradPrunerConfig`` of
    ``gradpruner_ds.resolve_config(args, ds_config)`` -- None when ``--gradpruner`` is not given, and then a
    :class:`~gradpruner_ds.pruner.DisabledPruner` whose calls do nothing is returned; left out, the
    ``"gradpruner"`` block of ``ds_config`` is used. Use it in the training loop as::

        loss = engine(**batch).loss
        engine.backward(loss)
        pruner.observe()                      # a no-op except at accumulation boundaries in the window
        engine.step()
        engine, lr_scheduler = pruner.maybe_prune(engine, lr_scheduler)   # new engine after the prune
    """
    from gradpruner_ds.config import load_config
    from gradpruner_ds.pruner import DisabledPruner, GradPruner

    if config is None:
        return DisabledPruner()
    cfg = load_config(ds_config) if config is _FROM_BLOCK else config
    assert cfg is not None  # load_config(required=True) raises instead of returning None
    return GradPruner(
        engine.module, cfg, total_steps=total_steps, backend=DeepSpeedBackend(engine, ds_config)
    )


def save_checkpoint(
    engine: Any, pruner: Any, save_dir: str, tag: str | None = None, client_state: dict | None = None
) -> str:
    """``engine.save_checkpoint`` plus GradPruner's state (``pruner.state_dict()``) in
    ``<save_dir>/<tag>/gradpruner/``, committed only when every rank's files are written: ``latest`` moves
    last (a rank that dies during the save leaves the previous checkpoint the one to resume). Call on every
    rank; returns the tag."""
    from pathlib import Path

    from gradpruner_ds.checkpoint import SUBDIR, commit_checkpoint, save_pruner_state
    from gradpruner_ds.dist import wait_all

    tag = tag or f"global_step{engine.global_steps}"
    engine.save_checkpoint(save_dir, tag=tag, client_state=client_state or {}, save_latest=False)
    timeout = 300.0
    if hasattr(pruner, "state_dict"):  # a DisabledPruner has nothing to save
        save_pruner_state(pruner, Path(save_dir) / tag / SUBDIR)
        timeout = pruner.config.consensus_timeout_s
    group = engine.optimizer.dp_process_group
    commit_checkpoint(
        save_dir, tag, dist.get_rank(group), lambda: wait_all(timeout, group, "the checkpoint commit")
    )
    return tag


def load_checkpoint(
    engine: Any, pruner: Any, load_dir: str, tag: str | None = None, lr_scheduler: Any = None
) -> tuple[Any, Any, dict]:
    """Resume: restore GradPruner's state, replay the surgery if the saved run was already pruned
    (a new engine over the pruned model), then ``engine.load_checkpoint``. ``tag`` None: the one ``latest``
    names, which must be complete. Returns ``(engine, lr_scheduler, client_state)``."""
    from pathlib import Path

    from gradpruner_ds.checkpoint import SUBDIR, load_pruner_state, resolve_tag

    tag = resolve_tag(load_dir, tag)
    plan = load_pruner_state(pruner, Path(load_dir) / tag / SUBDIR) if hasattr(pruner, "state_dict") else None
    if plan is not None:
        engine, lr_scheduler = pruner.replay(plan, engine, lr_scheduler)
    _, client_state = engine.load_checkpoint(load_dir, tag=tag)
    return engine, lr_scheduler, client_state or {}


def _adam_step(client: torch.optim.Optimizer) -> Any:
    for st in client.state.values():
        if "step" in st:
            return st["step"].clone() if torch.is_tensor(st["step"]) else st["step"]
    return torch.tensor(0.0)


def _teardown(engine: Any, removed_params: list[nn.Parameter]) -> None:
    """Release an engine for real: ``engine.destroy()`` plus the references it leaves behind.

    Measured on DeepSpeed 0.19.8: after ``destroy()`` the engine stays reachable through its forward
    hooks on the module, ZeRO-3's module-global ``FWD_MODULE_STACK``, the coordinator's class-level
    lru_cache, the per-module ``pre_bwd_fn``/``post_bwd_fn`` autograd classes (whose closures hold the
    modules, whose parameters hold ``_z3_optimizer``) and references held from C++ autograd hooks.
    We remove each of these and finally empty the old optimizer and engine, so whatever still points
    at their shells holds no tensor."""
    module = engine.module
    optimizer = engine.optimizer
    engine.destroy()
    for attr in ("module_forward_pre_hook", "module_forward_post_hook"):
        handle = getattr(engine, attr, None)
        if handle is not None:
            handle.remove()
    try:
        from deepspeed.runtime.zero import parameter_offload
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

        parameter_offload.FWD_MODULE_STACK.clear()
        cached = getattr(
            PartitionedParameterCoordinator, "_PartitionedParameterCoordinator__params_to_release", None
        )
        if cached is not None and hasattr(cached, "cache_clear"):
            cached.cache_clear()
    except ImportError:  # pragma: no cover - layout of a different DeepSpeed version
        log.warning("could not clear ZeRO-3 module stack / coordinator cache (DeepSpeed layout changed)")
    for m in module.modules():
        for attr in ("pre_bwd_fn", "post_bwd_fn"):
            m.__dict__.pop(attr, None)
    for p in removed_params:  # dropped parameters: no path back to the old optimizer, no shard kept
        for attr in [a for a in p.__dict__ if a.startswith(("ds_", "_z3", "_hp", "_dp"))]:
            p.__dict__.pop(attr, None)
        p.data = torch.empty(0, dtype=p.dtype)
    if optimizer is not None:
        inner = getattr(optimizer, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            inner.state.clear()
            inner.param_groups.clear()
        optimizer.__dict__.clear()
    for attr in [a for a in engine.__dict__ if not a.startswith("_")]:
        engine.__dict__.pop(attr, None)
    engine._modules.clear()
