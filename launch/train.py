#!/usr/bin/env python
"""Fine-tune SmolLM2-135M on a multiple-choice task and prune it with GradPruner during training.

The project's demo and reference training script. One process (plain PyTorch)::

    python -m launch.train --gradpruner --gradpruner_config configs/demo.json --output_dir runs/demo

DeepSpeed ZeRO-1/2/3 on several CPU ranks (any launcher; one thread per rank)::

    torchrun --nproc_per_node 2 launch/train.py --deepspeed --deepspeed_config configs/zero3.json --gradpruner ...
    mpirun -np 2 python -m launch.train --deepspeed --deepspeed_config configs/zero2.json --gradpruner ...
    deepspeed --num_gpus 2 launch/train.py --deepspeed --deepspeed_config configs/zero1.json --gradpruner ...

What it does: a deterministic train/val/test split of the task (``split_task``), causal-LM training on
``prompt + answer`` (prompt tokens masked), AdamW with linear warmup + linear decay, gradient clipping
and accumulation for ``--max_steps`` optimizer steps. ``--batch_size`` is the GLOBAL batch per optimizer
step; the data order comes from a ``DistributedSampler`` whose global micro-batch ``k`` is the same set of
items for every world size, so runs with the same ``--batch_size`` see the same global batches.
Accuracy (log-likelihood multiple choice) is measured on rank 0 on a test subset before training and,
after training, on the saved pruned checkpoint. The final model + tokenizer are written to
``<output_dir>/final`` as safetensors (``gradpruner_ds.save_pretrained``: transformers' shard size, gathered
one layer at a time under ZeRO-3), loadable with ``AutoModelForCausalLM.from_pretrained``;
``<output_dir>/summary.json`` holds the run's numbers and the GradPruner report (plan, scores, PNG) lands in
the block's ``output_dir`` (default ``--output_dir``). A run whose final loss or weights are not finite (it
diverged) saves neither and exits with a ``gradpruner:`` error (exit code 2), unless ``--save_non_finite``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_TASK = ROOT / "data" / "bigbench" / "intent_recognition.json"


# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------


def add_lora(model: Any, rank: int) -> Any:
    """``model`` with peft LoRA adapters of rank ``rank`` (alpha 4r, no dropout) on every decoder linear."""
    from peft import LoraConfig, get_peft_model

    from gradpruner_ds.arch import get_arch

    targets = sorted({n.rsplit(".", 1)[-1] for n in get_arch(model).linear_names})
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=4 * rank, lora_dropout=0.0, target_modules=targets))


def build_parser() -> argparse.ArgumentParser:
    """The script's command line: training options, DeepSpeed's and GradPruner's argument groups."""
    import deepspeed

    from gradpruner_ds.args import add_argparse_args

    p = argparse.ArgumentParser(
        description="Fine-tune (and GradPrune) SmolLM2-135M on a multiple-choice task.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--task", type=str, default=str(DEFAULT_TASK), help="BIG-bench .json task file or PIQA folder")
    p.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2",
                   help="'smollm2': the real SmolLM2-135M-Instruct; 'tiny': a small random Llama (tests)")
    p.add_argument("--tiny", dest="model", action="store_const", const="tiny", help="same as --model tiny")
    p.add_argument("--tiny_layers", type=int, default=8, help="decoder layers of the tiny model")
    p.add_argument("--output_dir", type=str, default="runs/demo", help="report, summary.json and final/ go here")
    p.add_argument("--max_steps", type=int, default=60, help="optimizer steps")
    p.add_argument("--batch_size", type=int, default=8, help="GLOBAL batch per optimizer step (all ranks)")
    p.add_argument("--micro_batch_size", type=int, default=4, help="per-rank batch per forward/backward")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--warmup_steps", type=int, default=None, help="linear warmup steps (default: 10%% of steps)")
    p.add_argument("--gradient_clipping", type=float, default=None,
                   help="max grad norm (default: the DeepSpeed config's value; 1.0 without DeepSpeed); 0 = off")
    p.add_argument("--max_length", type=int, default=128, help="max tokens per training/eval sequence")
    p.add_argument("--eval_size", type=int, default=40,
                   help="test items scored before/after; 0 = no evaluation; -1 = the whole test split")
    p.add_argument("--max_test", type=int, default=None,
                   help="cap on the test split (items beyond it go to training); default: 20%% of the task")
    p.add_argument("--eval_at", type=str, default="",
                   help="comma-separated optimizer steps after which the in-memory model is scored on the test "
                        "items too (one process, or DeepSpeed ZeRO-1/2): the accuracy curve of one run")
    p.add_argument("--skip_eval_before", action="store_true", help="do not score the model before training")
    p.add_argument("--lora", type=int, default=0, metavar="R",
                   help="train peft LoRA adapters of rank R (alpha 4R) on every linear of the decoder instead of "
                        "full fine-tuning (one process or DeepSpeed); 0 = full fine-tuning")
    p.add_argument("--eval_batch_size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="model init (tiny), data order")
    p.add_argument("--data_seed", type=int, default=0, help="train/val/test split seed")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads per process (0: 1 per rank under --deepspeed, else the idle cores)")
    p.add_argument("--no_save", action="store_true", help="do not write the final checkpoint")
    p.add_argument("--save_non_finite", action="store_true",
                   help="write the final checkpoint even when the final loss or the weights are not finite (a "
                        "diverged run; summary.json says non_finite: true); without it such a run saves nothing "
                        "and exits with a gradpruner: error")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    p.add_argument("--verbose", action="store_true", help="keep DeepSpeed / transformers info logs")
    deepspeed.add_config_arguments(p)
    add_argparse_args(p)
    return p


# --------------------------------------------------------------------------------------------------
# Process group
# --------------------------------------------------------------------------------------------------


def _launched_world_size() -> int:
    """World size announced by a launcher (torchrun/deepspeed: WORLD_SIZE; mpirun: PMI_/OMPI_ vars)."""
    for var in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def init_distributed() -> tuple[int, int]:
    """Initialize torch.distributed through DeepSpeed (gloo on CPU); returns ``(rank, world)``.

    torchrun and the deepspeed launcher set RANK/WORLD_SIZE/MASTER_*; under ``mpirun`` DeepSpeed's MPI
    discovery (mpi4py: works with the mpich wheel) fills them in, with ``MASTER_PORT`` from the
    environment when set (default 29500).
    """
    import deepspeed
    import torch.distributed as dist

    from gradpruner_ds.backends.deepspeed import skip_cpu_shm_comm_build

    skip_cpu_shm_comm_build()
    port = int(os.environ.get("MASTER_PORT", "29500"))
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=True, distributed_port=port, verbose=False)
    return dist.get_rank(), dist.get_world_size()


# --------------------------------------------------------------------------------------------------
# Model, data, schedule
# --------------------------------------------------------------------------------------------------


def load_tokenizer() -> Any:
    """The SmolLM2 tokenizer from the float-checkpoint cache (converted from the GGUF file if needed)."""
    from transformers import AutoTokenizer

    from launch.models import load_smollm2, prepare_tokenizer, smollm2_cache_path

    path = smollm2_cache_path()
    if not (path / "tokenizer.json").is_file():
        load_smollm2()  # one-time conversion (file-locked, safe when several ranks race)
    return prepare_tokenizer(AutoTokenizer.from_pretrained(path))


def tiny_model(vocab_size: int, num_layers: int, seed: int) -> Any:
    """A small random Llama (hidden 64) over the SmolLM2 vocabulary, for fast end-to-end tests.

    Random init gives near-identical layers; layer ``i``'s matrices are scaled by ``1 + 0.25 i`` so the
    layers differ clearly in importance and the prune plan is stable across engines and world sizes.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for prm in layer.parameters():
                if prm.dim() == 2:
                    prm.mul_(1.0 + 0.25 * i)
    return model


class TorchLoop:
    """One process, plain PyTorch: backward per micro-batch; clip, observe, optimizer step at the boundary."""

    def __init__(self, model: Any, optimizer: Any, scheduler: Any, gp_cfg: Any, total: int, gas: int, clip: float):
        from gradpruner_ds.pruner import DisabledPruner, GradPruner

        self.model, self.optimizer, self.scheduler, self.gas, self.clip = model, optimizer, scheduler, gas, clip
        self.pruner: Any = DisabledPruner() if gp_cfg is None else GradPruner(model, gp_cfg, total_steps=total)

    @property
    def module(self) -> Any:
        return self.model

    @property
    def holder(self) -> Any:
        """What gradpruner_ds.save_pretrained saves from."""
        return self.model

    def micro_step(self, batch: dict[str, Any]) -> float:
        out = self.model(**batch)  # with a 'recovery' block: + the pre-prune teacher's KL term for K steps
        loss = self.pruner.distill(out.loss, out.logits, batch) / self.gas
        loss.backward()
        return float(loss.item())

    def boundary(self) -> None:
        import torch

        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.clip)
        self.pruner.observe()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def after_step(self) -> None:
        self.optimizer, self.scheduler = self.pruner.maybe_prune(self.optimizer, self.scheduler)


class DeepSpeedLoop:
    """DeepSpeed ZeRO-1/2/3: the engine reduces, clips and steps; GradPruner observes between its backward
    and step; after the prune the loop holds the rebuilt engine."""

    def __init__(self, model: Any, optimizer: Any, scheduler: Any, ds_config: dict, gp_cfg: Any, total: int, gas: int):
        import deepspeed

        from gradpruner_ds.integrations.deepspeed import for_deepspeed

        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, lr_scheduler=scheduler)
        self.scheduler, self.gas = scheduler, gas
        self.pruner: Any = for_deepspeed(self.engine, ds_config, total_steps=total, config=gp_cfg)

    @property
    def module(self) -> Any:
        return self.engine.module

    @property
    def holder(self) -> Any:
        return self.engine

    def micro_step(self, batch: dict[str, Any]) -> float:
        out = self.engine(**batch)  # with a 'recovery' block: + the pre-prune teacher's KL term for K steps
        loss = self.pruner.distill(out.loss, out.logits, batch)
        self.engine.backward(loss)
        self.pruner.observe()  # a no-op except at accumulation boundaries inside the window
        self.engine.step()
        return float(loss.item()) / self.gas

    def boundary(self) -> None:
        """The engine stepped inside micro_step at the accumulation boundary."""

    def after_step(self) -> None:
        self.engine, self.scheduler = self.pruner.maybe_prune(self.engine, self.scheduler)


def lr_lambda(step: int, *, warmup: int, total: int) -> float:
    """Linear warmup from ``1/warmup`` to 1 over ``warmup`` steps, then linear decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def batch_geometry(batch_size: int, micro: int, world: int) -> tuple[int, int]:
    """``(micro_batch_size, grad_accumulation)`` with ``micro * world * gas == batch_size``.

    The requested micro batch is lowered to the largest value that divides the global batch evenly;
    a global batch that the world size does not divide is an error."""
    if batch_size < 1 or micro < 1:
        raise SystemExit(f"train.py: --batch_size and --micro_batch_size must be >= 1 (got {batch_size}, {micro})")
    if batch_size % world:
        raise SystemExit(
            f"train.py: --batch_size {batch_size} must be a multiple of the world size {world} "
            "(so that every run sees the same global batches)"
        )
    m = min(micro, batch_size // world)
    while (batch_size // world) % m:
        m -= 1
    return m, batch_size // (world * m)


def global_steps(loader: Any, sampler: Any, gas: int) -> Iterator[list[dict[str, Any]]]:
    """Endless optimizer steps: lists of ``gas`` micro-batches, epoch after epoch (partial steps dropped)."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        group: list[dict[str, Any]] = []
        for batch in loader:
            group.append(batch)
            if len(group) == gas:
                yield group
                group = []
        epoch += 1


# --------------------------------------------------------------------------------------------------
# Checkpoint
# --------------------------------------------------------------------------------------------------





# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


class RankPrinter:
    """``print`` on rank 0 only (flushed, so logs interleave correctly with the progress bar)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __call__(self, *parts: Any) -> None:
        if self.rank == 0:
            from tqdm.auto import tqdm

            tqdm.write(" ".join(str(p) for p in parts), file=sys.stdout)
            sys.stdout.flush()


def _quiet_libraries(verbose: bool, rank: int) -> None:
    import warnings

    import transformers

    if not verbose:
        # DeepSpeed calls torch.distributed functions that torch 2.13 deprecates, once per step
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.distributed")
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        with contextlib.suppress(Exception):
            from deepspeed.utils import logger as ds_logger

            ds_logger.setLevel(logging.WARNING)
    if rank != 0:
        logging.getLogger("DeepSpeed").setLevel(logging.ERROR)


def _free_cores() -> int:
    """Cores not busy with other work: ``cores - round(1-min load average)``, at least 1.

    On a 2-core machine that another job keeps busy, two OpenMP threads run many times slower than
    one (a descheduled thread stalls every parallel region), so a single-process run takes only the
    cores that are idle when it starts."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover - platforms without a load average
        return cores
    return max(1, min(cores, cores - round(load)))


def validate_args(args: argparse.Namespace) -> None:
    """Every argument checked before any work (``gradpruner:`` errors naming the argument and the fix)."""
    from gradpruner_ds.errors import user_error

    for name, low in (("max_steps", 1), ("batch_size", 1), ("micro_batch_size", 1), ("max_length", 8),
                      ("eval_batch_size", 1), ("tiny_layers", 2), ("eval_size", -1), ("lora", 0), ("threads", 0),
                      ("warmup_steps", 0), ("data_seed", 0)):  # fmt: skip
        value = getattr(args, name)
        if value is not None and value < low:
            raise user_error(f"--{name} must be at least {low}", value, f"pass --{name} >= {low}")
    for name in ("lr", "weight_decay", "gradient_clipping"):
        value = getattr(args, name)
        if value is not None and (value != value or value < 0 or (name == "lr" and value == 0)):
            kind = "positive" if name == "lr" else "non-negative"
            raise user_error(f"--{name} must be a {kind} number", value, f"pass e.g. --{name} {1e-4 if name == 'lr' else 0.0}")
    if args.max_test is not None and args.max_test < 1:
        raise user_error("--max_test must be at least 1", args.max_test, "pass a positive cap or leave it out")
    if not str(args.output_dir).strip():
        raise user_error("--output_dir must name a folder", args.output_dir, "pass e.g. --output_dir runs/demo")
    if not Path(args.task).exists():
        raise user_error("--task must be a BIG-bench .json file or a PIQA folder", args.task, "pass an existing path")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole run; returns the summary (also written to ``<output_dir>/summary.json`` on rank 0)."""
    validate_args(args)
    use_ds = bool(args.deepspeed)
    if not use_ds and _launched_world_size() > 1:
        raise SystemExit("train.py: several processes were launched; multi-process training needs --deepspeed")
    if use_ds:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads or (1 if use_ds else _free_cores()))

    from gradpruner_ds.args import resolve_config

    # ---- configs: everything is validated before any model is loaded ----
    ds_config: dict[str, Any] | None = None
    if use_ds:
        if not args.deepspeed_config:
            raise SystemExit("train.py: --deepspeed needs --deepspeed_config PATH (see configs/zero*.json)")
        from gradpruner_ds.io import read_json_file

        ds_config = read_json_file(args.deepspeed_config, "the DeepSpeed config")
    gp_cfg = resolve_config(args, ds_config)
    eval_at = _parse_eval_at(args.eval_at, args.max_steps)
    if eval_at and use_ds and int((ds_config or {}).get("zero_optimization", {}).get("stage", 0)) == 3:
        raise SystemExit("train.py: --eval_at scores the in-memory model, which ZeRO-3 partitions; use ZeRO-1/2 or one process")
    if gp_cfg is not None and gp_cfg.output_dir is None:
        gp_cfg = gp_cfg.model_copy(update={"output_dir": str(args.output_dir)})
    if not args.no_save:  # the final model's folder is checked now, not after the training
        from gradpruner_ds.export import check_target

        check_target(Path(args.output_dir) / "final")

    rank, world = init_distributed() if use_ds else (0, 1)
    log = RankPrinter(rank)
    _quiet_libraries(args.verbose, rank)
    out_dir = Path(args.output_dir)
    micro, gas = batch_geometry(args.batch_size, args.micro_batch_size, world)
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, round(0.1 * args.max_steps))
    if use_ds:
        assert ds_config is not None
        for key, value in (
            ("train_batch_size", args.batch_size),
            ("train_micro_batch_size_per_gpu", micro),
            ("gradient_accumulation_steps", gas),
        ):
            if key in ds_config and ds_config[key] != value:
                log(f"note: {key}={ds_config[key]} in the DeepSpeed config replaced by {value} (from the arguments)")
            ds_config[key] = value
        if args.gradient_clipping is not None:
            ds_config["gradient_clipping"] = args.gradient_clipping
        clip = float(ds_config.get("gradient_clipping", 1.0))  # DeepSpeed's own default is 1.0
    else:
        clip = 1.0 if args.gradient_clipping is None else args.gradient_clipping

    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    from gradpruner_ds.arch import decoder_layers
    from gradpruner_ds.pruner import count_params
    from launch.tasks import build_train_dataset, collate, evaluate_choices, load_task, split_task

    # ---- model and data ----
    t0 = time.perf_counter()
    if args.model == "smollm2":
        from launch.models import load_smollm2

        model, tokenizer = load_smollm2()
    else:
        tokenizer = load_tokenizer()
        model = tiny_model(len(tokenizer), args.tiny_layers, args.seed)
    model.config.use_cache = False
    if args.lora:
        model = add_lora(model, args.lora)
    dense_params = count_params(model)  # the model as it is saved: LoRA adapters merged, not counted
    dense_layers = len(decoder_layers(model))
    if gp_cfg is not None:  # budget and window checked against this model and run before any step
        gp_cfg.resolve_budget(dense_layers)
        gp_cfg.resolve_window(args.max_steps)
    examples = load_task(args.task)
    split = split_task(examples, seed=args.data_seed, max_test=args.max_test)
    test = split.test if args.eval_size < 0 else split.test[: args.eval_size]
    train_items = build_train_dataset(tokenizer, split.train, max_length=args.max_length)
    task_name = Path(args.task).stem
    log(
        f"model {args.model}: {dense_layers} layers, {dense_params:,} parameters (loaded in "
        f"{time.perf_counter() - t0:.1f}s); task {task_name}: {len(split.train)} train / {len(split.test)} test "
        f"items (scoring {len(test)})"
    )
    log(
        f"{'DeepSpeed ZeRO-' + str((ds_config or {}).get('zero_optimization', {}).get('stage', 0)) if use_ds else 'plain PyTorch'}"
        f", world {world}: {args.max_steps} steps x global batch {args.batch_size} (micro {micro} x {world} ranks "
        f"x {gas} accumulation), lr {args.lr} (warmup {warmup}), clipping {clip}, {torch.get_num_threads()} thread(s)/rank; "
        f"GradPruner {'on' if gp_cfg is not None and gp_cfg.enabled else 'off'}"
    )

    # ---- accuracy before training (rank 0; the others wait) ----
    acc_before: float | None = None
    if test and rank == 0 and not args.skip_eval_before:
        t0 = time.perf_counter()
        acc_before = evaluate_choices(model, tokenizer, test, batch_size=args.eval_batch_size, max_length=args.max_length)
        log(f"accuracy before training: {acc_before:.3f} ({len(test)} test items, {time.perf_counter() - t0:.1f}s)")
    if use_ds:
        dist.barrier()

    sampler = DistributedSampler(train_items, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(
        train_items,  # type: ignore[arg-type]
        batch_size=micro,
        sampler=sampler,
        drop_last=True,
        collate_fn=functools.partial(collate, pad_token_id=tokenizer.pad_token_id),
    )
    if len(loader) < gas:
        raise SystemExit(f"train.py: too few training items ({len(train_items)}) for one global batch of {args.batch_size}")

    # ---- optimizer, schedule, engine, pruner ----
    model.train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=args.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_lambda, warmup=warmup, total=args.max_steps)
    )
    loop: DeepSpeedLoop | TorchLoop
    if use_ds:
        assert ds_config is not None
        loop = DeepSpeedLoop(model, optimizer, scheduler, ds_config, gp_cfg, args.max_steps, gas)
    else:
        loop = TorchLoop(model, optimizer, scheduler, gp_cfg, args.max_steps, gas, clip)
    pruner = loop.pruner

    # ---- training ----
    from tqdm.auto import tqdm

    bar = tqdm(total=args.max_steps, desc="training", unit="step", disable=rank != 0, file=sys.stdout, dynamic_ncols=True)
    steps = global_steps(loader, sampler, gas)
    losses: list[float] = []
    t_train = time.perf_counter()
    step_times: list[float] = []
    prune_s = 0.0
    curve: list[dict[str, Any]] = []
    eval_s = 0.0
    for step in range(args.max_steps):  # the same loop for every engine: the engine is behind `loop`
        t_step = time.perf_counter()
        total = sum(loop.micro_step(batch) for batch in next(steps))
        loop.boundary()
        if world > 1:
            total_t = torch.tensor([total], dtype=torch.float64)
            dist.all_reduce(total_t)
            total = float(total_t) / world
        step_times.append(time.perf_counter() - t_step)
        layers_before, t_prune = len(decoder_layers(loop.module)), time.perf_counter()
        loop.after_step()  # every step: prunes at the end of the window (or of the repair phase), counts the steps after it
        if len(decoder_layers(loop.module)) != layers_before:
            prune_s = time.perf_counter() - t_prune
            log(f"step {step + 1}: pruned to {len(decoder_layers(model))} layers in {prune_s:.1f}s")
        losses.append(float(total))
        lr_now = loop.scheduler.get_last_lr()[0]
        state = "" if gp_cfg is None else ("repairing" if pruner.repairing else "observing" if pruner.observing else "pruned" if pruner.plan else "")
        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr_now:.2e}", layers=len(decoder_layers(model)), gp=state)
        bar.update(1)
        if step + 1 in eval_at and test:
            t_eval = time.perf_counter()
            if rank == 0:
                current = loop.module
                acc_now = evaluate_choices(current, tokenizer, test, batch_size=args.eval_batch_size, max_length=args.max_length)
                curve.append({"step": step + 1, "accuracy": acc_now, "layers": len(decoder_layers(current)),
                              "train_s": t_eval - t_train - eval_s})  # training time so far, evaluations excluded
                log(f"step {step + 1}: accuracy {acc_now:.3f} on {len(test)} test items")
            if use_ds:
                dist.barrier()
            eval_s += time.perf_counter() - t_eval
    bar.close()
    train_s = time.perf_counter() - t_train - eval_s
    med_step = sorted(step_times)[len(step_times) // 2]
    log(f"trained {args.max_steps} steps in {train_s:.1f}s (median step {med_step:.2f}s); loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    # ---- a diverged run is not a result: nothing is saved as final (unless --save_non_finite) ----
    module = loop.module
    non_finite = _non_finite(losses[-1], module, world)
    if non_finite:
        from gradpruner_ds.errors import user_error

        if not args.save_non_finite:
            raise user_error(
                "a run whose final loss or weights are not finite is not saved as its final model (it diverged)",
                non_finite,
                "lower --lr or check --gradient_clipping / the loss scale and train again; or pass --save_non_finite "
                "to write it anyway",
            )
        log(f"warning: {non_finite}; saved anyway (--save_non_finite)")

    # ---- save the (pruned) model ----
    final_dir = out_dir / "final"
    zero3 = use_ds and int(loop.holder.zero_optimization_stage()) == 3
    if not args.no_save:  # LoRA: the saved model is the pruned base with the trained adapters merged in
        from gradpruner_ds.export import save_pretrained

        t0 = time.perf_counter()
        save_pretrained(loop.holder, final_dir, tokenizer, allow_non_finite=args.save_non_finite)
        log(f"final model written to {final_dir} ({time.perf_counter() - t0:.1f}s)")
    if use_ds:
        dist.barrier()

    # ---- numbers after training (rank 0, from the saved checkpoint when there is one) ----
    summary: dict[str, Any] = {
        "model": args.model,
        "task": task_name,
        "mode": f"zero{loop.holder.zero_optimization_stage()}" if use_ds else "plain",
        "world_size": world,
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "micro_batch_size": micro,
        "gradient_accumulation": gas,
        "gradpruner": gp_cfg is not None,
        "dense_params": dense_params,
        "dense_layers": dense_layers,
        "losses": losses,
        "train_s": train_s,
        "median_step_s": med_step,
        "prune_s": prune_s,
        "eval_items": len(test),
        "acc_before": acc_before,
        "curve": curve,
        "eval_s": eval_s,
        "non_finite": bool(non_finite),
    }
    if pruner.plan is not None:
        summary["plan"] = {"dropped": list(pruner.plan.dropped), "merged": list(pruner.plan.merged),
                           "targets": [list(t) for t in pruner.plan.targets], "removed": list(pruner.plan.removed)}
    if rank == 0:
        if args.no_save:
            final_model = module.float() if not zero3 else None
        else:
            from transformers import AutoModelForCausalLM

            del module, loop
            final_model = AutoModelForCausalLM.from_pretrained(final_dir, dtype=torch.float32)
        if final_model is not None:
            summary["pruned_params"] = sum(p.numel() for p in final_model.parameters())
            summary["pruned_layers"] = len(decoder_layers(final_model))
            if test and args.no_save and curve and curve[-1]["step"] == args.max_steps:
                summary["acc_after"] = curve[-1]["accuracy"]  # the same in-memory model, already scored
            elif test:
                t0 = time.perf_counter()
                summary["acc_after"] = evaluate_choices(
                    final_model, tokenizer, test, batch_size=args.eval_batch_size, max_length=args.max_length
                )
                summary["eval_after_s"] = time.perf_counter() - t0
        _print_summary(log, summary)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _non_finite(final_loss: float, module: Any, world: int) -> str:
    """What is not finite at the end of the run ("" when nothing): the final loss (the same on every rank, it
    is all-reduced) and the weights (each rank checks what it holds: under ZeRO-3 its partition, under FSDP2
    its shard; one all-reduce of the count)."""
    import math

    import torch

    bad = []
    for name, p in module.named_parameters():
        t = getattr(p, "ds_tensor", None)  # ZeRO-3: this rank's partition of the parameter
        t = p if t is None else t
        t = t.to_local() if hasattr(t, "to_local") else t
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t.detach()).all()):
            bad.append(name)
    count = len(bad)
    if world > 1:
        import torch.distributed as dist

        total = torch.tensor([count], dtype=torch.int64)
        dist.all_reduce(total)
        count = int(total)
    parts = [f"final loss {final_loss}"] if not math.isfinite(final_loss) else []
    if count:
        parts.append(f"inf/NaN weights in {count} tensors" + (f" (e.g. {', '.join(bad[:3])})" if bad else ""))
    return "; ".join(parts)


def _parse_eval_at(text: str, max_steps: int) -> set[int]:
    """The optimizer steps of ``--eval_at`` (validated: integers in [1, max_steps])."""
    steps: set[int] = set()
    for part in (x.strip() for x in text.split(",")):
        if not part:
            continue
        if not part.isdigit() or not 1 <= int(part) <= max_steps:
            raise SystemExit(f"train.py: --eval_at takes optimizer steps between 1 and --max_steps={max_steps} (got {part!r})")
        steps.add(int(part))
    return steps


def _print_summary(log: Callable[..., None], s: dict[str, Any]) -> None:
    log("=" * 72)
    if s.get("non_finite"):
        log("WARNING: this run did not end finite (saved only because of --save_non_finite)")
    if "pruned_params" in s:
        frac = 100.0 * s["pruned_params"] / s["dense_params"]
        kind = "pruned" if s["gradpruner"] else "final (GradPruner off)"
        log(f"parameters: dense {s['dense_params']:,} -> {kind} {s['pruned_params']:,} ({frac:.1f}%)")
        log(f"decoder layers: {s['dense_layers']} -> {s['pruned_layers']}")
    if "plan" in s:
        p = s["plan"]
        log(f"GradPruner plan: dropped {p['dropped']}, merged {[f'{a}->{b}' for a, b in p['targets']]}")
    if s.get("acc_before") is not None and "acc_after" in s:
        log(
            f"accuracy on {s['eval_items']} {s['task']} test items: before {s['acc_before']:.3f} -> "
            f"after {s['acc_after']:.3f} (after: the {'pruned' if s['gradpruner'] else 'trained'} model)"
        )
    log("=" * 72)


def end_process(body: Callable[[], Any], distributed: bool) -> int:
    """Run ``body`` as a launcher entry point and end the process.

    One process: the exit code (2 for a ``gradpruner:`` error, whose message names rule, value and fix).
    Several ranks: the process ends with ``barrier(); destroy_process_group(); os._exit`` -- gloo threads
    can otherwise abort interpreter shutdown ("terminate called without an active exception",
    platform.md), which turns a finished run into a failed launch."""
    from gradpruner_ds.errors import GradPrunerError

    if not distributed:
        try:
            body()
        except GradPrunerError as exc:
            print(exc, file=sys.stderr)
            return 2
        return 0
    import torch.distributed as dist

    code = 0
    try:
        body()
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    except SystemExit as exc:  # argparse (--help: 0) or a refused combination of flags
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc, file=sys.stderr)
            code = 2
    except GradPrunerError as exc:
        print(exc, file=sys.stderr)
        code = 2
    except BaseException:  # noqa: BLE001 - reported, then the process ends without gloo teardown races
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """Entry point; see :func:`end_process` for how the process ends."""
    args = build_parser().parse_args(argv)
    return end_process(lambda: run(args), distributed=bool(args.deepspeed))


if __name__ == "__main__":
    sys.exit(main())
