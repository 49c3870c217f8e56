"""Wrong pairings of engines and GradPruner on real gloo ranks, each a ``gradpruner:`` error naming the fix: the
DeepSpeed engine used after the prune replaced it, an FSDP2 model given the one-process adapter (and the same
model with no adapter given: picked from the model, the same result as FSDP2Backend)."""

from __future__ import annotations

import pytest
import torch
from helpers.ranks import run_ranks
from helpers.tiny import batches, tiny_llama

pytestmark = pytest.mark.dist

BLOCK = {"window_steps": 1, "num_drop": 1, "progress_bar": False}


def _old_engine(rank: int, world: int) -> str:
    import deepspeed

    from gradpruner_ds.config import GradPrunerConfig
    from gradpruner_ds.integrations.deepspeed import for_deepspeed

    model = tiny_llama(4)
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2}}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    pruner = for_deepspeed(engine, cfg, config=GradPrunerConfig.from_dict(BLOCK))
    old = engine
    b = {k: v[:2] for k, v in batches(1)[0].items()}
    engine.backward(engine(**b).loss)
    pruner.observe()
    engine.step()
    engine, _ = pruner.maybe_prune(engine)  # a new engine over the pruned model
    engine.backward(engine(**b).loss)  # the new one trains
    engine.step()
    try:
        old(**b)
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_the_old_deepspeed_engine_used_after_the_prune_names_the_fix():
    for msg in run_ranks(_old_engine, 2):
        assert msg.startswith("gradpruner: this DeepSpeed engine was replaced at GradPruner's prune"), msg
        assert "engine, lr_scheduler = pruner.maybe_prune(engine, lr_scheduler)" in msg


def _fsdp2(rank: int, world: int, explicit: str) -> object:
    from torch.distributed.fsdp import fully_shard

    from gradpruner_ds.backends.plain import Backend
    from gradpruner_ds.config import GradPrunerConfig
    from gradpruner_ds.pruner import GradPruner

    model = tiny_llama(4)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    backend = Backend() if explicit == "plain" else None
    try:
        pruner = GradPruner(model, GradPrunerConfig.from_dict(BLOCK), backend=backend)
    except ValueError as exc:
        return str(exc)
    return type(pruner.backend).__name__


def test_fsdp2_picks_its_adapter_and_refuses_the_one_process_one():
    assert run_ranks(_fsdp2, 2, "none") == ["FSDP2Backend", "FSDP2Backend"]
    for msg in run_ranks(_fsdp2, 2, "plain"):
        assert msg.startswith("gradpruner: the model is wrapped by FSDP2: GradPruner needs that engine's adapter"), msg


def _half_on(rank: int, world: int) -> str:
    """Rank 0 runs with GradPruner, rank 1 without (one rank launched without --gradpruner)."""
    import deepspeed

    from gradpruner_ds.config import GradPrunerConfig
    from gradpruner_ds.integrations.deepspeed import for_deepspeed

    model = tiny_llama(4)
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2}}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=cfg)
    try:
        for_deepspeed(engine, cfg, config=GradPrunerConfig.from_dict(BLOCK) if rank == 0 else None)
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_a_rank_without_gradpruner_is_the_same_error_on_every_rank():
    for msg in run_ranks(_half_on, 2, barrier=False):
        assert msg.startswith("gradpruner: GradPruner must be on on every rank or on none, but it is on on ranks [0] "
                              "and off on ranks [1]"), msg  # fmt: skip


def _wrapped_after(rank: int, world: int) -> str:
    from torch.distributed.fsdp import fully_shard

    from gradpruner_ds.config import GradPrunerConfig
    from gradpruner_ds.pruner import GradPruner

    model = tiny_llama(4)
    pruner = GradPruner(model, GradPrunerConfig.from_dict(BLOCK))  # one process so far: the plain adapter
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    model(**batches(1)[0]).loss.backward()
    try:
        pruner.observe()
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_a_model_wrapped_after_the_pruner_was_built_names_the_fix():
    (msg,) = run_ranks(_wrapped_after, 1)
    assert msg.startswith("gradpruner: the model was wrapped (or the job became distributed) after GradPruner"), msg
    assert "build GradPruner after wrapping" in msg
