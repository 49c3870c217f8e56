"""One training recipe, run either as plain single-process PyTorch or under DeepSpeed on N ranks, so
that the distributed result can be checked against the single-process result of the same computation."""

from __future__ import annotations

from typing import Any

import torch

from gradpruner_ds.config import GradPrunerConfig
from gradpruner_ds.pruner import GradPruner
from helpers.tiny import batches, tiny_llama

LR = 1e-3


def lr_lambda(step: int) -> float:
    return min(1.0, (step + 1) / 2) * 0.9**step


def ds_config(
    stage: int,
    micro: int,
    gas: int,
    clip: float,
    bf16: bool = False,
    block: dict | None = None,
    persist: int = 0,
) -> dict:
    """``persist``: ZeRO-3's ``stage3_param_persistence_threshold`` (parameters at most this size are kept
    whole on every rank; 0: every parameter is partitioned)."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": clip,
        "zero_optimization": {
            "stage": stage,
            "reduce_bucket_size": 20000,
            "allgather_bucket_size": 20000,
            "stage3_param_persistence_threshold": persist,
            "stage3_prefetch_bucket_size": 20000,
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if bf16:
        cfg["bf16"] = {"enabled": True}
    if block is not None:
        cfg["gradpruner"] = block
    return cfg


def global_batches(
    steps: int, world: int, micro: int, gas: int, seed: int = 5
) -> list[list[dict[str, torch.Tensor]]]:
    """Per optimizer step, per accumulation micro-step: the GLOBAL micro-batch (world * micro rows)."""
    flat = batches(steps * gas, batch=world * micro, seq=10, seed=seed)
    return [flat[s * gas : (s + 1) * gas] for s in range(steps)]


def single_process_run(
    block: dict,
    steps: int,
    world: int,
    micro: int,
    gas: int,
    clip: float,
    num_layers: int = 6,
    lora: bool | str = False,
) -> dict[str, Any]:
    """The reference: one process, the whole global batch, torch AdamW + LambdaLR, torch clipping."""
    model = make_model(num_layers, lora)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    pruner = GradPruner(model, GradPrunerConfig.from_dict(block), total_steps=steps)
    losses = []
    for micro_batches in global_batches(steps, world, micro, gas):
        total = 0.0
        for b in micro_batches:
            res = model(**b)
            loss = pruner.distill(res.loss, res.logits, b) / gas  # = out.loss without a 'recovery' block
            loss.backward()
            total += loss.item()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        pruner.observe()
        opt.step()
        sched.step()
        opt.zero_grad()
        opt, sched = pruner.maybe_prune(opt, sched)
        losses.append(total)
    return run_result({}, losses, pruner)


def run_result(out: dict[str, Any], losses: list[float], pruner: GradPruner) -> dict[str, Any]:
    """What every run returns for the comparison: its per-step losses, the scores, the plan and the merge
    (None: resumed after the prune)."""
    assert pruner.plan is not None
    out.update(
        losses=losses,
        scores=list(pruner.plan.scores),
        plan=pruner.plan.to_dict(),
        merge=pruner.report["merge"] if pruner.report else None,
        repair=pruner.report.get("repair") if pruner.report else None,
        recovery=pruner.report.get("recovery") if pruner.report else None,
    )
    return out


def make_model(num_layers: int, lora: bool | str):
    """``lora``: False (the plain model), True (LoRA r=4 on every linear) or "default" (peft's default
    ``LoraConfig()``: r=8 on the architecture's default targets, q_proj and v_proj for Llama). The B
    matrices are drawn non-zero so the adapters change the model from the first step."""
    model = tiny_llama(num_layers, seed=0)
    if lora:
        from peft import LoraConfig, get_peft_model

        from helpers.naive import LINEARS

        config = (
            LoraConfig()
            if lora == "default"
            else LoraConfig(r=4, lora_alpha=8, target_modules=list(LINEARS), lora_dropout=0.0)
        )
        model = get_peft_model(model, config)
        torch.manual_seed(1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
    return model


def deepspeed_run(
    rank: int,
    world: int,
    block: dict,
    steps: int,
    stage: int,
    micro: int,
    gas: int,
    clip: float,
    num_layers: int = 6,
    lora: bool | str = False,
    bf16: bool = False,
    instrument: bool = False,
    ckpt_dir: str | None = None,
    save_at: int | None = None,
    resume: bool = False,
    save_every: int | None = None,
    offload: bool = False,
    persist: int = 0,
) -> dict[str, Any]:
    """The same recipe under DeepSpeed: each rank takes its rows of every global micro-batch.

    ``instrument`` also records the collectives issued by observe / planning / merge and the live
    tensor bytes before and after the prune, and whether the old engine was released.
    ``save_at=k`` saves a checkpoint after optimizer step k and stops; ``resume`` loads the latest
    checkpoint from ``ckpt_dir`` first and runs the remaining steps. ``persist``: see ``ds_config``."""
    import gc
    import weakref

    import deepspeed

    from gradpruner_ds.backends import backend_for
    from gradpruner_ds.checkpoint import load_checkpoint, save_checkpoint
    from gradpruner_ds.diagnostics import count_collectives, live_tensor_bytes

    model = make_model(num_layers, lora)
    cfg = ds_config(stage, micro, gas, clip, bf16=bf16, persist=persist)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if offload:  # ZeRO-3 optimizer offload needs DeepSpeed's CPU Adam (a one-time op build)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        opt = DeepSpeedCPUAdam(trainable, lr=LR, weight_decay=0.01, adamw_mode=True)
    else:
        opt = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, lr_scheduler=sched)
    pruner = GradPruner(
        engine.module,
        GradPrunerConfig.from_dict(block),
        total_steps=steps,
        backend=backend_for(engine, ds_config=cfg),
    )
    out: dict[str, Any] = {"observe_calls": [], "plan_calls": [], "merge_calls": []}
    if instrument:
        import gradpruner_ds.pruner as pruner_module

        for owner, name in ((pruner, "observe"), (pruner, "make_plan"), (pruner_module, "merge_layers")):
            orig = getattr(owner, name)
            key = {"observe": "observe_calls", "make_plan": "plan_calls", "merge_layers": "merge_calls"}[name]

            def wrapped(*a, __orig=orig, __key=key, **kw):
                with count_collectives() as calls:
                    result = __orig(*a, **kw)
                out[__key].append(calls)
                return result

            setattr(owner, name, wrapped)  # a rank's own process: the module-level patch is its alone
    losses = []
    start = 0
    if resume:
        assert ckpt_dir is not None
        engine, sched, _ = load_checkpoint(engine, pruner, ckpt_dir, lr_scheduler=sched)
        start = engine.global_steps
    for step, micro_batches in enumerate(global_batches(steps, world, micro, gas)):
        if step < start:
            continue
        total = torch.zeros(1, dtype=torch.float64)
        for b in micro_batches:
            mine = {k: v[rank * micro : (rank + 1) * micro] for k, v in b.items()}
            res = engine(**mine)
            loss = pruner.distill(res.loss, res.logits, mine)
            engine.backward(loss)
            total += loss.item() / gas
            pruner.observe()  # a no-op before the accumulation boundary
            engine.step()
        torch.distributed.all_reduce(total)
        if instrument and pruner.cutting:
            out["bytes_before"] = live_tensor_bytes()
            out["igia_bytes"] = pruner.igia.nbytes()
            old_ref = weakref.ref(engine)
        engine, sched = pruner.maybe_prune(engine, sched)
        if instrument and "bytes_before" in out and "bytes_after" not in out:
            out["bytes_after"] = live_tensor_bytes()
            if stage == 3:
                out["partition_numel_after"] = sum(p.ds_tensor.numel() for p in engine.module.parameters())
        losses.append(float(total) / world)
        if save_every is not None and (step + 1) % save_every == 0:
            assert ckpt_dir is not None
            save_checkpoint(engine, pruner, ckpt_dir)
        if save_at is not None and step + 1 == save_at:
            assert ckpt_dir is not None
            save_checkpoint(engine, pruner, ckpt_dir)
            return {"losses": losses}
    if instrument:  # the last loss of the window held the old autograd graph until the next step
        del loss
        gc.collect()
        out["old_engine_alive"] = old_ref() is not None
    return run_result(out, losses, pruner)


def fsdp2_run(
    rank: int,
    world: int,
    block: dict,
    steps: int,
    micro: int,
    gas: int,
    clip: float,
    num_layers: int = 6,
    lora: bool = False,
    bf16: bool = False,
    instrument: bool = False,
    ckpt_dir: str | None = None,
    save_at: int | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """The same recipe under FSDP2: fully_shard per decoder layer + root, each rank its rows. ``save_at=k``
    saves a checkpoint (``gradpruner_ds.save_checkpoint``) after optimizer step k and stops; ``resume`` loads
    the latest one from ``ckpt_dir`` first and runs the remaining steps."""
    import gc

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from gradpruner_ds.backends.fsdp2 import FSDP2Backend
    from gradpruner_ds.diagnostics import live_tensor_bytes

    model = make_model(num_layers, lora)
    inner = model.base_model.model if lora else model
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kw = {"mp_policy": mp} if mp is not None else {}
    for layer in inner.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    pruner = GradPruner(
        model, GradPrunerConfig.from_dict(block), total_steps=steps, backend=FSDP2Backend(model)
    )
    out: dict[str, Any] = {"observe_calls": []}
    losses = []
    start = 0
    if resume:
        from gradpruner_ds.checkpoint import load_checkpoint

        assert ckpt_dir is not None
        opt, sched, client = load_checkpoint(opt, pruner, ckpt_dir, lr_scheduler=sched)
        start = client["step"]
    for step, micro_batches in enumerate(global_batches(steps, world, micro, gas)):
        if step < start:
            continue

        def before() -> None:  # after the optimizer step: the window may be complete now
            if instrument and pruner.cutting:
                out["bytes_before"] = live_tensor_bytes()

        loss, opt, sched, calls = fsdp2_step(model, pruner, opt, sched, micro_batches, rank, world, micro, gas,
                                             clip, before_prune=before)  # fmt: skip
        out["observe_calls"].append(calls)
        if instrument and "bytes_before" in out and "bytes_after" not in out:
            gc.collect()
            out["bytes_after"] = live_tensor_bytes()
        losses.append(loss)
        if save_at is not None and step + 1 == save_at:
            from gradpruner_ds.checkpoint import save_checkpoint

            assert ckpt_dir is not None
            save_checkpoint(opt, pruner, ckpt_dir, client_state={"step": step + 1}, lr_scheduler=sched)
            return {"losses": losses}
    return run_result(out, losses, pruner)


def ddp_run(
    rank: int,
    world: int,
    block: dict,
    steps: int,
    micro: int,
    gas: int,
    clip: float,
    num_layers: int = 6,
    lora: bool = False,
    save_dir: str | None = None,
) -> dict[str, Any]:
    """The same recipe under DDP (gloo): each rank its rows of every global micro-batch, DDP averages the
    gradients; GradPruner picks the DDP adapter from the wrapped model. ``save_dir``: the final model written
    there with ``gradpruner_ds.save_pretrained`` (every rank, rank 0 writes)."""
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(make_model(num_layers, lora))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    pruner = GradPruner(model, GradPrunerConfig.from_dict(block), total_steps=steps)
    out: dict[str, Any] = {"backend": type(pruner.backend).__name__}
    losses = []
    for micro_batches in global_batches(steps, world, micro, gas):
        total = torch.zeros(1, dtype=torch.float64)
        for b in micro_batches:
            mine = {k: v[rank * micro : (rank + 1) * micro] for k, v in b.items()}
            res = model(**mine)
            loss = pruner.distill(res.loss, res.logits, mine) / gas
            loss.backward()
            total += loss.item()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
        pruner.observe()
        opt.step()
        sched.step()
        opt.zero_grad()
        opt, sched = pruner.maybe_prune(opt, sched)
        torch.distributed.all_reduce(total)
        losses.append(float(total) / world)
    if save_dir is not None:
        import gradpruner_ds

        gradpruner_ds.save_pretrained(model, save_dir)
    return run_result(out, losses, pruner)


def fsdp2_step(
    model: Any,
    pruner: GradPruner,
    opt: Any,
    sched: Any,
    micro_batches: list[dict],
    rank: int,
    world: int,
    micro: int,
    gas: int,
    clip: float,
    before_prune: Any = None,
) -> tuple[float, Any, Any, dict]:
    """One optimizer step of an FSDP2 loop on this rank's rows of ``micro_batches`` (the distillation term
    added, clipping, observe, step, maybe prune); returns the mean loss over ranks, the optimizer and
    scheduler (new after a prune) and the collectives ``observe`` issued."""
    from gradpruner_ds.diagnostics import count_collectives

    total = torch.zeros(1, dtype=torch.float64)
    for b in micro_batches:
        mine = {k: v[rank * micro : (rank + 1) * micro] for k, v in b.items()}
        res = model(**mine)
        loss = pruner.distill(res.loss, res.logits, mine) / gas
        loss.backward()
        total += loss.item()
    del loss, res
    if clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
    with count_collectives() as calls:
        pruner.observe()
    opt.step()
    if sched is not None:
        sched.step()
    opt.zero_grad()
    if before_prune is not None:
        before_prune()
    opt, sched = pruner.maybe_prune(opt, sched)
    torch.distributed.all_reduce(total)
    return float(total) / world, opt, sched, calls
