"""Adapters to one training engine each (the :class:`~gradpruner_ds.engine.EngineAdapter` contract), and the one
place that recognises an engine from the objects a training loop holds (:func:`backend_for`; like DeepSpeed's
accelerator picker). Nothing outside this package names an engine's types or attributes.

=================  ===========================================  ==========================================
engine             adapter                                      module
=================  ===========================================  ==========================================
plain PyTorch      :class:`~.plain.Backend`                     ``plain.py``
DDP                :class:`~.ddp.DDPBackend`                    ``ddp.py``
DeepSpeed ZeRO-1/2 :class:`~.zero12.Zero12Backend`               ``zero12.py`` (on ``deepspeed.py``)
DeepSpeed ZeRO-3   :class:`~.zero3.Zero3Backend`                 ``zero3.py`` (on ``deepspeed.py``)
FSDP2              :class:`~.fsdp2.FSDP2Backend`                 ``fsdp2.py``
=================  ===========================================  ==========================================

``sharded.py`` holds what the sharded engines share; ``optimizer_state.py`` how the kept parameters' optimizer
state is carried across the surgery.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gradpruner_ds.engine import EngineAdapter
from gradpruner_ds.errors import user_error

Gather = Callable[[Sequence[torch.Tensor]], contextlib.AbstractContextManager[list[torch.Tensor]]]
"""Context manager giving the full (unsharded) values of some parameters on every rank."""


def is_deepspeed_engine(obj: Any) -> bool:
    """True for a ``deepspeed.DeepSpeedEngine`` (or anything that behaves as one)."""
    return callable(getattr(obj, "zero_optimization_stage", None)) and isinstance(
        getattr(obj, "module", None), nn.Module
    )


def is_fsdp2(obj: Any) -> bool:
    """True when ``obj`` is the root of an FSDP2 (``fully_shard``) tree."""
    return hasattr(obj, "_get_fsdp_state")


def is_zero3_partitioned(model: nn.Module) -> bool:
    """True for a model whose parameters ZeRO-3 partitioned at load time (before its engine exists, as the HF
    Trainer loads one under a ZeRO-3 config)."""
    return any(hasattr(p, "ds_tensor") for p in model.parameters())


def is_ddp(obj: Any) -> bool:
    """True for a ``torch.nn.parallel.DistributedDataParallel`` wrapper."""
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(obj, DistributedDataParallel)


def backend_for(obj: Any, *, ds_config: Mapping[str, Any] | None = None) -> EngineAdapter:
    """The engine adapter for what the training loop holds: a DeepSpeed engine (ZeRO-1/2/3; ``ds_config`` its
    config, default the engine's own), a DDP-wrapped model, an FSDP2-sharded model, or a plain model in one
    process. A plain model in a job of several processes is a ``gradpruner:`` error: each rank would prune on
    its own."""
    if is_deepspeed_engine(obj):
        stage = int(obj.zero_optimization_stage())
        if stage not in (1, 2, 3):
            raise user_error(
                "GradPruner's DeepSpeed backend supports ZeRO stages 1, 2 and 3",
                stage,
                'set "zero_optimization": {"stage": 1|2|3} in the DeepSpeed config',
            )
        config = dict(ds_config if ds_config is not None else getattr(obj, "config", None) or {})
        if stage == 3:
            from gradpruner_ds.backends.zero3 import Zero3Backend

            return Zero3Backend(obj, config)
        from gradpruner_ds.backends.zero12 import Zero12Backend

        return Zero12Backend(obj, config)
    if is_ddp(obj):
        from gradpruner_ds.backends.ddp import DDPBackend

        return DDPBackend(obj)
    if is_fsdp2(obj):
        from gradpruner_ds.backends.fsdp2 import FSDP2Backend

        return FSDP2Backend(obj)
    if isinstance(obj, nn.Module) and is_zero3_partitioned(obj):
        raise user_error(
            "the model's parameters are partitioned by DeepSpeed ZeRO-3: GradPruner needs the engine, not its module",
            type(obj).__name__,
            "pass the engine deepspeed.initialize returned (gradpruner_ds.for_deepspeed(engine, ds_config) or "
            "backend_for(engine))",
        )
    import os

    import torch.distributed as dist

    launched = (
        int(os.environ["WORLD_SIZE"]) if os.environ.get("WORLD_SIZE", "").isdigit() else 1
    )  # the launcher's
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else launched
    if max(world, launched) > 1:
        raise user_error(
            "this job has several processes but the model is not wrapped by an engine GradPruner recognises, so "
            "every rank would measure and prune on its own",
            f"{type(obj).__name__} in a job of {max(world, launched)} processes (WORLD_SIZE {launched})",
            "wrap it first (DistributedDataParallel, fully_shard, deepspeed.initialize, or accelerator.prepare "
            "with DDP / the DeepSpeed plugin) and give GradPruner the wrapped model (or engine)",
        )
    from gradpruner_ds.backends.plain import Backend

    return Backend()


def check_backend(model: Any, backend: EngineAdapter) -> None:
    """A ``gradpruner:`` error when an adapter given by hand does not fit the model (a wrapped model with the
    plain adapter: its ranks would measure and prune separately)."""
    picked = None
    if is_ddp(model) or is_fsdp2(model):
        picked = backend_for(model)
    if picked is not None and type(picked) is not type(backend):
        raise user_error(
            f"the model is wrapped by {'DDP' if is_ddp(model) else 'FSDP2'}: GradPruner needs that engine's adapter",
            type(backend).__name__,
            "leave backend= out (GradPruner picks the adapter from the model) or pass gradpruner_ds.backend_for(model)",
        )
    import torch.distributed as dist

    if (
        backend.world_size == 1
        and dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size() > 1
    ):
        backend_for(model)  # the several-processes error, or the adapter's own
        raise user_error(
            "this job has several processes but GradPruner was given the one-process adapter",
            type(backend).__name__,
            "leave backend= out, or pass gradpruner_ds.backend_for(model_or_engine)",
        )


def holder_of(obj: Any) -> tuple[nn.Module, Gather]:
    """The module holding the weights of what a loop trains (a model or a DeepSpeed engine) and how to gather a
    group of its parameters in full on every rank (a collective under ZeRO-3 and FSDP2)."""
    if is_ddp(obj):
        return obj.module, _as_is
    if is_deepspeed_engine(obj):
        if int(obj.zero_optimization_stage()) == 3:
            from gradpruner_ds.backends.deepspeed import gather_full

            return obj.module, gather_full
        return obj.module, _as_is
    if any(hasattr(p, "full_tensor") for p in obj.parameters()):  # FSDP2: DTensor parameters
        from gradpruner_ds.backends.fsdp2 import gather_full as fsdp_gather

        return obj, fsdp_gather
    return obj, _as_is


@contextlib.contextmanager
def _as_is(tensors: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    yield list(tensors)


def global_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The whole parameter's shape (ZeRO-3 keeps it in ``ds_shape``; a DTensor's ``shape`` is global)."""
    return tuple(getattr(p, "ds_shape", None) or p.shape)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a tensor (an FSDP2 DTensor's local shard; any other tensor as it is)."""
    return t.to_local() if hasattr(t, "to_local") else t


def teacher_for(model: nn.Module, timeout_s: float | None = None) -> nn.Module:
    """The distillation teacher for ``model`` as a framework holds it before its engine exists (the HF Trainer
    resuming during the distillation): sharded like it under FSDP2 and ZeRO-3 (partitioned at load time), else
    a whole copy (one process, ZeRO-1/2, whose engine does not partition the module's weights)."""
    if is_fsdp2(model):
        return backend_for(model).make_teacher(model)
    if is_zero3_partitioned(model):
        from gradpruner_ds.backends.zero3 import Zero3Teacher

        teacher = Zero3Teacher(model, None, timeout_s)
        teacher.requires_grad_(False)
        return teacher
    from gradpruner_ds.backends.plain import Backend

    return Backend().make_teacher(model)


def forget_removed_units(model: nn.Module) -> None:
    """After a surgery outside a running engine (a replayed resume before the engine exists): an FSDP2 root
    forgets the removed units' lazy-init bookkeeping (nothing to do for other engines)."""
    if is_fsdp2(model):
        backend_for(model).rebuild(model, [], None, None)
