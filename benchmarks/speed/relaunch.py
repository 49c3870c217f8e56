"""The restart pipeline's relaunch, as a real new job (started by ``benchmarks/speed/run.py`` with
torchrun): import the stack, join the process group, load the pruned HF checkpoint, wrap it (DeepSpeed
ZeRO-N or FSDP2) with a fresh optimizer, take one training step."""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", required=True, choices=["zero1", "zero2", "zero3", "fsdp2"])
    ap.add_argument("--model_dir", required=True)
    ap.add_argument("--micro", type=int, required=True)
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = ap.parse_args()
    os.environ["DS_ACCELERATOR"] = args.device

    import torch
    import torch.distributed as dist
    from transformers import LlamaForCausalLM

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    backend = "gloo"
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        backend = "nccl"
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, args.vocab, (args.micro, args.seq), generator=g).to(args.device)
    model = LlamaForCausalLM.from_pretrained(args.model_dir)
    opt_cls = torch.optim.AdamW
    if args.engine == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        dist.init_process_group(backend)
        model.to(args.device)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        kw = {"mp_policy": mp} if args.dtype == "bf16" else {}
        for layer in model.model.layers:
            fully_shard(layer, **kw)
        fully_shard(model, **kw)
        opt = opt_cls(model.parameters(), lr=1e-4)
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    else:
        import deepspeed

        from gradpruner_ds.backends.deepspeed import skip_cpu_shm_comm_build

        if args.device == "cpu":
            skip_cpu_shm_comm_build()
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
        stage = int(args.engine[-1])
        cfg = {
            "train_micro_batch_size_per_gpu": args.micro,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0,
            "zero_optimization": {"stage": stage, "reduce_bucket_size": 2e6, "allgather_bucket_size": 2e6,
                                  "stage3_prefetch_bucket_size": 2e6, "stage3_param_persistence_threshold": 1e4},
            "steps_per_print": 10**9,
        }  # fmt: skip
        if args.dtype == "bf16":
            cfg["bf16"] = {"enabled": True}
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=opt_cls(model.parameters(), lr=1e-4), config=cfg
        )
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
