"""GradPruner on a model sharded with PyTorch FSDP2 (``fully_shard``), your own loop. Run from the repository root
(the default --text is its README).

    torchrun --nproc_per_node 2 examples/fsdp2.py --model PATH --gradpruner --gradpruner_config configs/demo.json
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, AutoTokenizer

import gradpruner_ds

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True, help="a from_pretrained folder (Llama, Mistral, Qwen, Gemma)")
parser.add_argument("--text", default="README.md", help="a text file to train on")
parser.add_argument("--steps", type=int, default=12)
parser.add_argument("--output_dir", default="outputs/example_fsdp2")
gradpruner_ds.add_argparse_args(parser)  # --gradpruner, --gradpruner_config
args = parser.parse_args()
gp_config = gradpruner_ds.resolve_config(args, None)  # checked now; None without --gradpruner
if gp_config is not None and gp_config.output_dir is None:  # the report and plan beside the model
    gp_config = gp_config.model_copy(update={"output_dir": args.output_dir})

cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")
rank = dist.get_rank()
device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
if cuda:
    torch.cuda.set_device(device)
tokenizer = AutoTokenizer.from_pretrained(args.model)
model = AutoModelForCausalLM.from_pretrained(args.model).to(device)
model.train()
for layer in model.model.layers:  # each decoder layer its own FSDP unit, then the root
    fully_shard(layer)
fully_shard(model)
tokens = tokenizer(open(args.text).read(), return_tensors="pt").input_ids[0]
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / args.steps)
backend = gradpruner_ds.backend_for(model)  # the FSDP2 adapter: each rank reads its own gradient shard
pruner = gradpruner_ds.GradPruner(model, gp_config, total_steps=args.steps, backend=backend) if gp_config else None
torch.manual_seed(rank)
for _step in range(args.steps):
    starts = torch.randint(0, len(tokens) - 64, (2,))
    batch = torch.stack([tokens[s : s + 64] for s in starts]).to(device)
    out = model(input_ids=batch, labels=batch)
    loss = pruner.distill(out.loss, out.logits, {"input_ids": batch, "labels": batch}) if pruner else out.loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if pruner:
        pruner.observe()  # this rank's reduced gradient shard, after clipping
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    if pruner:
        optimizer, scheduler = pruner.maybe_prune(optimizer, scheduler)  # the same optimizer, pruned in place
gradpruner_ds.save_pretrained(model, f"{args.output_dir}/final", tokenizer)  # every rank; rank 0 writes
dist.destroy_process_group()
