"""GradPruner in a loop driven by Hugging Face accelerate (``Accelerator.prepare``): DDP, or the DeepSpeed plugin.
Run from the repository root (the default --text is its README).

    accelerate launch --config_file configs/accelerate_ddp_cpu.yaml examples/accelerate_prepare.py --model PATH \\
        --gradpruner_config configs/demo.json
"""

import argparse

import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer

import gradpruner_ds
from gradpruner_ds.integrations.accelerate import for_accelerator

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True, help="a from_pretrained folder (Llama, Mistral, Qwen, Gemma)")
parser.add_argument("--text", default="README.md", help="a text file to train on")
parser.add_argument("--steps", type=int, default=12)
parser.add_argument("--output_dir", default="outputs/example_accelerate")
parser.add_argument("--gradpruner_config", required=True, help="a JSON file holding the gradpruner block")
args = parser.parse_args()
block = gradpruner_ds.read_block_file(args.gradpruner_config)  # checked before any work below

accelerator = Accelerator()
tokenizer = AutoTokenizer.from_pretrained(args.model)
model = AutoModelForCausalLM.from_pretrained(args.model)
model.train()
tokens = tokenizer(open(args.text).read(), return_tensors="pt").input_ids[0]
chunks = [tokens[i : i + 64] for i in range(0, len(tokens) - 64, 32)]
loader = torch.utils.data.DataLoader(chunks, batch_size=2, shuffle=True)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / args.steps)
model, optimizer, scheduler, loader = accelerator.prepare(model, optimizer, scheduler, loader)
pruner = for_accelerator(accelerator, model, block, total_steps=args.steps)
batches = iter(loader)
for _step in range(args.steps):
    batch = next(batches)
    out = model(input_ids=batch, labels=batch)
    accelerator.backward(pruner.distill(out.loss, out.logits, {"input_ids": batch, "labels": batch}))
    accelerator.clip_grad_norm_(model.parameters(), 1.0)
    pruner.observe()  # after backward and clipping (under the DeepSpeed plugin it ran inside backward)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    pruner.maybe_prune(optimizer, scheduler)  # the prepared objects stay the ones to use after the prune
gradpruner_ds.save_pretrained(model, f"{args.output_dir}/final", tokenizer)  # every process; the main one writes
accelerator.end_training()  # ends the processes together (on CPU, gloo can abort one at exit otherwise)
