"""GradPruner in your own DeepSpeed loop (ZeRO-1/2/3), the ``"gradpruner"`` block in the DeepSpeed config. Run from
the repository root (the default --text is its README).

    deepspeed --num_gpus 2 examples/deepspeed_loop.py --model PATH --deepspeed_config configs/zero3.json --gradpruner
"""

import argparse
import json

import deepspeed
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import gradpruner_ds

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True, help="a from_pretrained folder (Llama, Mistral, Qwen, Gemma)")
parser.add_argument("--text", default="README.md", help="a text file to train on")
parser.add_argument("--steps", type=int, default=12)
parser.add_argument("--output_dir", default="outputs/example")
parser.add_argument("--local_rank", type=int, default=-1)  # passed by the deepspeed launcher
deepspeed.add_config_arguments(parser)  # --deepspeed, --deepspeed_config
gradpruner_ds.add_argparse_args(parser)  # --gradpruner, --gradpruner_config
args = parser.parse_args()
ds_config = json.load(open(args.deepspeed_config))
ds_config.setdefault("train_micro_batch_size_per_gpu", 2)  # configs/zero*.json leave the batch to the script
ds_config.setdefault("gradient_accumulation_steps", 1)
gp_config = gradpruner_ds.resolve_config(args, ds_config)  # checked now; None without --gradpruner

deepspeed.init_distributed()
tokenizer = AutoTokenizer.from_pretrained(args.model)
model = AutoModelForCausalLM.from_pretrained(args.model)
model.train()
tokens = tokenizer(open(args.text).read(), return_tensors="pt").input_ids[0]
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / args.steps)
engine, _, _, scheduler = deepspeed.initialize(
    model=model, optimizer=optimizer, config=ds_config, lr_scheduler=scheduler
)
pruner = gradpruner_ds.for_deepspeed(engine, ds_config, total_steps=args.steps, config=gp_config)
torch.manual_seed(engine.global_rank)
for _step in range(args.steps):
    for _ in range(engine.gradient_accumulation_steps()):
        starts = torch.randint(0, len(tokens) - 64, (engine.train_micro_batch_size_per_gpu(),))
        batch = torch.stack([tokens[s : s + 64] for s in starts]).to(engine.device)
        out = engine(input_ids=batch, labels=batch)
        loss = pruner.distill(out.loss, out.logits, {"input_ids": batch, "labels": batch})  # "recovery" term
        engine.backward(loss)
        pruner.observe()  # reads this rank's reduced gradient shard; a no-op outside the window
        engine.step()
    engine, scheduler = pruner.maybe_prune(engine, scheduler)  # a new engine after the prune
gradpruner_ds.save_pretrained(engine, f"{args.output_dir}/final", tokenizer)  # every rank; from_pretrained loads it
torch.distributed.barrier()
torch.distributed.destroy_process_group()  # end the ranks together (on CPU, gloo can abort a rank at exit otherwise)
