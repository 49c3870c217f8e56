"""GradPruner in a Hugging Face ``Trainer`` run: one process, DeepSpeed ZeRO-1/2/3, or FSDP2.

The same fine-tuning as ``launch/train.py`` (SmolLM2-135M on a multiple-choice task from the
repository's ``data/``), written the Trainer way: ``TrainingArguments`` + ``Trainer`` + ``add_gradpruner``.

    # one process
    python -m launch.train_hf --gradpruner_config configs/gradpruner_trainer.json
    # DeepSpeed ZeRO-2 / ZeRO-3 on 2 CPU ranks (the block may also sit in the DeepSpeed config)
    torchrun --nproc_per_node 2 launch/train_hf.py --deepspeed configs/trainer_zero2.json
    # FSDP2: the model is sharded at load time by transformers (DistributedConfig(fsdp_size=world))
    torchrun --nproc_per_node 2 launch/train_hf.py --fsdp2 --gradpruner_config configs/gradpruner_trainer.json
    accelerate launch --config_file configs/accelerate_fsdp2.yaml launch/train_hf.py --fsdp2 \
        --gradpruner_config configs/gradpruner_trainer.json

Writes ``<output_dir>/summary.json`` (per-step losses, the plan, layers before/after), the GradPruner
report and the pruned model in ``<output_dir>/gradpruner_final`` (``from_pretrained`` loads it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_TASK = ROOT / "data" / "bigbench" / "intent_recognition.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default=str(DEFAULT_TASK), help="BIG-bench .json task file or PIQA folder")
    p.add_argument(
        "--tiny", action="store_true", help="a small random Llama over the SmolLM2 vocabulary (tests)"
    )
    p.add_argument("--tiny_layers", type=int, default=8)
    p.add_argument("--output_dir", default="runs/trainer")
    p.add_argument("--max_steps", type=int, default=20)
    p.add_argument("--per_device_batch", type=int, default=4)
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lr_scheduler", default="linear", help="TrainingArguments.lr_scheduler_type")
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--deepspeed", default=None, metavar="PATH", help="DeepSpeed config (TrainingArguments.deepspeed)"
    )
    p.add_argument("--fsdp2", action="store_true", help="shard with FSDP2 at load time (DistributedConfig)")
    p.add_argument(
        "--gradpruner_config",
        default=None,
        metavar="PATH",
        help="JSON file with the gradpruner block (default: the DeepSpeed config's block)",
    )
    p.add_argument("--lora", type=int, default=0, metavar="R",
                   help="train peft LoRA adapters of rank R (alpha 4R) on every linear of the decoder; 0 = full "
                        "fine-tuning")
    p.add_argument("--no_gradpruner", action="store_true", help="plain fine-tuning (the baseline)")
    p.add_argument("--save_steps", type=int, default=0, help="save a Trainer checkpoint every N steps (0: none)")
    p.add_argument("--resume_from_checkpoint", default=None, metavar="PATH",
                   help="resume from a Trainer checkpoint folder of an earlier run (checkpoint-<step>)")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    return p


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def load_model(args: argparse.Namespace, vocab_size: int) -> Any:
    """The real SmolLM2-135M-Instruct, or the tiny random Llama of ``launch/train.py --tiny`` (written
    once by rank 0), always through ``from_pretrained`` as a user would: under ZeRO-3 transformers then
    builds it inside ``deepspeed.zero.Init``, and under ``--fsdp2`` it shards it at load time
    (``DistributedConfig``), which tells the Trainer the model is already distributed."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from launch.models import load_smollm2, smollm2_cache_path

    src = smollm2_cache_path()
    if args.tiny:
        from launch.train import tiny_model

        src = Path(args.output_dir) / "tiny_init"
        if _world() > 1 and not dist.is_initialized():
            dist.init_process_group("gloo")
        if not dist.is_initialized() or dist.get_rank() == 0:
            tiny_model(vocab_size, args.tiny_layers, args.seed).save_pretrained(src)
        if dist.is_initialized():
            dist.barrier()
    elif not (src / "config.json").is_file():
        load_smollm2()  # one-time conversion of the shipped GGUF file (file-locked)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if args.fsdp2:
        from transformers.distributed import DistributedConfig

        kwargs["distributed_config"] = DistributedConfig(fsdp_size=_world())
    return AutoModelForCausalLM.from_pretrained(src, **kwargs)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if _world() > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.deepspeed and args.fsdp2:
        raise SystemExit("train_hf.py: --deepspeed and --fsdp2 exclude each other")

    import torch
    from transformers import Trainer, TrainingArguments

    from gradpruner_ds.arch import unwrap_model
    from gradpruner_ds.args import read_block_file
    from gradpruner_ds.config import GradPrunerConfig
    from gradpruner_ds.integrations.hf_trainer import add_gradpruner
    from launch.train import _quiet_libraries, load_tokenizer

    if _world() > 1:
        torch.set_num_threads(1)
    _quiet_libraries(False, int(os.environ.get("RANK", "0")))
    if args.deepspeed:
        from gradpruner_ds.backends.deepspeed import skip_cpu_shm_comm_build

        skip_cpu_shm_comm_build()
    # validate the GradPruner block before anything is loaded
    gp_cfg = None
    if not args.no_gradpruner:
        if args.gradpruner_config:
            gp_cfg = GradPrunerConfig.from_dict(read_block_file(args.gradpruner_config))
        elif args.deepspeed:
            from gradpruner_ds.config import load_config

            load_config(args.deepspeed)  # errors now; the callback reads the block from the Trainer's config
        else:
            raise SystemExit("train_hf.py: pass --gradpruner_config PATH (or --no_gradpruner)")

    from launch.tasks import build_train_dataset, collate, load_task, split_task

    tok = load_tokenizer()
    split = split_task(load_task(args.task), seed=0)
    train = build_train_dataset(tok, split.train, max_length=args.max_length)
    targs = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.per_device_batch,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        lr_scheduler_type=args.lr_scheduler,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        report_to=[],
        use_cpu=True,
        seed=args.seed,
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",  # the same global batches for any world size
        deepspeed=args.deepspeed,
        disable_tqdm=False,
    )
    if args.deepspeed:
        import deepspeed

        # transformers builds the model under zero.Init (ZeRO-3), which reads the world size from
        # DeepSpeed's communication layer: make it join the process group the Trainer's arguments made
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    model = load_model(args, len(tok))
    layers_before = model.config.num_hidden_layers
    if args.lora:
        from launch.train import add_lora

        model = add_lora(model, args.lora)
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=train,
        data_collator=lambda rows: collate(rows, tok.pad_token_id),
        processing_class=tok,
    )
    cb = None if args.no_gradpruner else add_gradpruner(trainer, gp_cfg, save_final=True)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    plan = cb.pruner.plan if cb is not None and cb.pruner is not None else None
    summary = {
        "world": _world(),
        "engine": "deepspeed" if args.deepspeed else ("fsdp2" if args.fsdp2 else ("ddp" if _world() > 1 else "single")),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "global_step": trainer.state.global_step,
        "layers_before": layers_before,
        "layers_after": unwrap_model(trainer.model).config.num_hidden_layers,
        "plan": plan.to_dict() if plan is not None else None,
    }
    if trainer.args.process_index == 0:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(
            f"world {summary['world']} engine {summary['engine']}: layers {layers_before} -> "
            f"{summary['layers_after']}; loss {summary['losses'][0]:.3f} -> {summary['losses'][-1]:.3f}"
        )
    return summary


if __name__ == "__main__":
    from launch.train import end_process

    sys.exit(end_process(main, distributed=_world() > 1))
