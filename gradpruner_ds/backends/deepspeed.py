# DeepSpeed attaches its partitioning state (ds_tensor, ds_numel, _hp_mapping, ...) to Parameter
# objects at run time, so attribute checks cannot see it:
# mypy: disable-error-code="attr-defined"
"""DeepSpeed ZeRO-1/2/3 engine adapter (what the stages share; ``zero12.py`` and ``zero3.py`` hold the
stage-specific parts): with those two, the only modules that know DeepSpeed internals.

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

import abc
import contextlib
import math
import sys
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradpruner_ds.backends.optimizer_state import CarriedState
from gradpruner_ds.backends.sharded import ShardedBackend
from gradpruner_ds.core.igia import Key, sq_norms
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
    """GradPruner on a ``deepspeed.DeepSpeedEngine`` with ZeRO stage 1, 2 or 3: what the stages share.

    :func:`gradpruner_ds.backends.backend_for` picks the adapter of the engine's stage:
    :class:`~gradpruner_ds.backends.zero12.Zero12Backend` (flat fp32 partitions, per-parameter fragments)
    or :class:`~gradpruner_ds.backends.zero3.Zero3Backend` (every parameter sliced into equal shards). The
    stage-specific parts, written here as abstract hooks, are the pieces of a parameter (``piece``,
    ``grad_piece``, ``local_weights``), the merge, and how the kept parameters' optimizer state is read and
    written across the rebuild (``kept_groups``, ``flat_partitions``, ``read_state``, ``write_state``,
    ``link_state``)."""

    stage: int

    def __init__(self, engine: Any, ds_config: Mapping[str, Any]) -> None:
        self.engine = engine
        self.ds_config = dict(ds_config)
        self.stage = int(engine.zero_optimization_stage())
        self.group = engine.optimizer.dp_process_group
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)

    def at_boundary(self) -> bool:
        """Gradients are complete (reduced) only at a gradient-accumulation boundary."""
        return bool(self.engine.is_gradient_accumulation_boundary())

    # ---- stage-specific (abstract; see the subclasses) --------------------------------------------------
    @abc.abstractmethod
    def kept_groups(self, gone: set[int], n_groups: int) -> list[list[nn.Parameter]]:
        """The kept parameters of each client param group, in the engine's order."""

    @abc.abstractmethod
    def flat_partitions(self) -> list[torch.Tensor]:
        """The fp32 flat partitions the client optimizer steps (its state is keyed by them)."""

    @abc.abstractmethod
    def read_state(self, p: nn.Parameter, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """This rank's piece of ``p``'s fp32 master ("fp32") and optimizer state ``keys``."""

    @abc.abstractmethod
    def write_state(self, entry: dict[str, Any], keys: Sequence[str]) -> None:
        """Write a kept parameter's carried pieces into the rebuilt engine."""

    def link_state(self) -> None:
        """Called when the client optimizer's state exists (before reading, after creating it)."""

    # ---- shared -------------------------------------------------------------------------------------
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
        rest = [self.grad_piece(p) for p in self._trainable() if id(p) not in skip]
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
        return {k: self.grad_piece(p) for k, p in params.items()}

    def lora_slices(self, params: Mapping[Key, nn.Parameter]) -> dict[Key, tuple[int, int]] | None:
        return {k: self.piece(p) for k, p in params.items()}

    def log_events(self, events: Mapping[str, float], step: int) -> None:
        """DeepSpeed's monitor (the config's ``tensorboard`` / ``wandb`` / ``csv_monitor`` / ``comet`` blocks):
        it writes on rank 0 when one is enabled, at the engine's sample count (the x-axis of DeepSpeed's own
        series)."""
        monitor = getattr(self.engine, "monitor", None)
        if monitor is not None and getattr(monitor, "enabled", False):  # DeepSpeed's own series: samples on x
            x = int(getattr(self.engine, "global_samples", step))
            monitor.write_events([(name, value, x) for name, value in events.items()])

    # ---- checkpoints: the engine's own ------------------------------------------------------------------
    def default_tag(self, stepper: Any) -> str:
        return f"global_step{stepper.global_steps}"

    def save_engine_state(
        self,
        stepper: Any,
        model: nn.Module,
        save_dir: Any,
        tag: str,
        lr_scheduler: Any,
        client_state: Mapping[str, Any],
        save_id: str,
    ) -> None:
        """``engine.save_checkpoint`` (model, optimizer, the scheduler it holds, ``client_state``), ``latest``
        left to the commit. DeepSpeed writes its own files with pickle (``torch.save``)."""
        stepper.save_checkpoint(str(save_dir), tag=tag, client_state=dict(client_state), save_latest=False)

    def load_engine_state(
        self, stepper: Any, model: nn.Module, load_dir: Any, tag: str, lr_scheduler: Any
    ) -> dict[str, Any]:
        """``engine.load_checkpoint``. DeepSpeed reads its files with pickle (``torch.load(weights_only=False)``):
        load only checkpoints you trust."""
        _, client_state = stepper.load_checkpoint(str(load_dir), tag=tag)
        return dict(client_state or {})

    # ---- rebuild: carry the kept parameters' state into a new engine over the pruned module --------------
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
        kept_groups = self.kept_groups(gone, len(hparams))
        carried = CarriedState(self, client, kept_groups)
        counters = {
            k: getattr(old, k) for k in ("global_steps", "global_samples", "micro_steps", "skipped_steps")
        }
        old_scheduler = old.lr_scheduler

        _teardown(old, removed_params)
        _mark_replaced(old)
        del old, client
        self.engine = None
        removed_params.clear()
        release_memory()

        new_client = client_cls(
            [{**h, "params": ps} for h, ps in zip(hparams, kept_groups, strict=True) if ps]
        )
        if lr_scheduler is None:
            lr_scheduler = old_scheduler  # a scheduler DeepSpeed built from the config's "scheduler"
        if (
            lr_scheduler is not None
        ):  # it follows the new optimizer; the new engine steps it iff the old one did
            lr_scheduler.optimizer = new_client
        # the optimizer and scheduler objects are carried, so the config must not build new ones
        config = {k: v for k, v in self.ds_config.items() if k not in ("optimizer", "scheduler")}
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=new_client,
            config=config,
            lr_scheduler=lr_scheduler if old_scheduler is not None else None,
        )
        self.engine = engine
        self.group = engine.optimizer.dp_process_group
        for k, v in counters.items():
            setattr(engine, k, v)
        carried.write(engine)
        return engine, lr_scheduler

    def rebind(self, old: Any) -> None:
        """Make the torn-down engine object ``old`` the current (rebuilt) engine: both share one attribute
        dict, so code that holds ``old`` (the HF Trainer's inner loop keeps it in a local variable) drives the
        pruned engine, and this backend uses ``old`` from now on."""
        new = self.engine
        cls = getattr(type(old), "_replaced_from", type(old))
        if cls is not type(new):
            raise TypeError(f"cannot rebind a {cls.__name__} to a {type(new).__name__}")
        object.__setattr__(old, "__class__", type(new))
        object.__setattr__(old, "__dict__", new.__dict__)
        self.engine = old


@contextlib.contextmanager
def gather_full(params: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """ZeRO-3: the whole values of ``params`` on every rank for the duration of the block (a collective)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(params), modifier_rank=None):
        yield list(params)


_REPLACED_FIX = (
    "use the engine maybe_prune returned from the next step on: engine, lr_scheduler = pruner.maybe_prune(engine, "
    "lr_scheduler) (the pruned model needs a new engine)"
)


def _mark_replaced(engine: Any) -> None:
    """The torn-down engine answers every use with a ``gradpruner:`` error naming the fix (instead of
    DeepSpeed's "'DeepSpeedEngine' object has no attribute 'optimizer'")."""
    base = type(engine)

    def refuse(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise user_error(
            "this DeepSpeed engine was replaced at GradPruner's prune", base.__name__, _REPLACED_FIX
        )

    def getattr_(self: Any, name: str) -> Any:
        if name.startswith("__") or name in ("_parameters", "_buffers", "_modules"):
            raise AttributeError(name)
        raise user_error(
            f"this DeepSpeed engine was replaced at GradPruner's prune (used: .{name})",
            base.__name__,
            _REPLACED_FIX,
        )

    replaced = type(
        f"Replaced{base.__name__}",
        (base,),
        {"__call__": refuse, "forward": refuse, "backward": refuse, "step": refuse, "__getattr__": getattr_,
         "_replaced_from": base},
    )  # fmt: skip
    object.__setattr__(engine, "__class__", replaced)


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
