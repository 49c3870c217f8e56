"""GradPruner inside the Hugging Face Trainer: one process, DDP (torchrun without --deepspeed), DeepSpeed (a Trainer
config with "auto" batch sizes and a "gradpruner" block). Run from the repository root (the default --text is its
README). A model FSDP2-sharded at load time works the same way (launch/train_hf.py --fsdp2, docs/usage.md).

    python examples/hf_trainer.py --model PATH --gradpruner_config configs/demo.json
    torchrun --nproc_per_node 2 examples/hf_trainer.py --model PATH --deepspeed configs/trainer_zero3.json
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import gradpruner_ds
from gradpruner_ds.integrations.hf_trainer import add_gradpruner

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True, help="a from_pretrained folder (Llama, Mistral, Qwen, Gemma)")
parser.add_argument("--text", default="README.md", help="a text file to train on")
parser.add_argument("--steps", type=int, default=12)
parser.add_argument("--output_dir", default="outputs/example_trainer")
parser.add_argument("--deepspeed", default=None, help="a DeepSpeed config with a \"gradpruner\" block")
parser.add_argument("--gradpruner_config", default=None, help="a JSON file holding the gradpruner block")
args = parser.parse_args()

tokenizer = AutoTokenizer.from_pretrained(args.model)
tokens = tokenizer(open(args.text).read(), return_tensors="pt").input_ids[0]
chunks = [tokens[i : i + 64] for i in range(0, len(tokens) - 64, 32)]
train = [{"input_ids": c, "labels": c} for c in chunks]
model = AutoModelForCausalLM.from_pretrained(args.model)
training = TrainingArguments(
    output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=2, learning_rate=1e-4,
    max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[], deepspeed=args.deepspeed,
    use_cpu=not torch.cuda.is_available(),
)
trainer = Trainer(model=model, args=training, train_dataset=train, processing_class=tokenizer)
block = gradpruner_ds.read_block_file(args.gradpruner_config) if args.gradpruner_config else None
add_gradpruner(trainer, block)  # block None: the "gradpruner" block of the DeepSpeed config
trainer.train()
# the pruned model from whatever holds it (one process, DeepSpeed engine, FSDP2); every rank, rank 0 writes
gradpruner_ds.save_pretrained(trainer.model_wrapped, f"{args.output_dir}/final", tokenizer)
# several processes: end them together (on CPU, gloo can abort one at interpreter exit otherwise)
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
