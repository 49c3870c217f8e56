"""GradPruner inside TRL's SFTTrainer (a transformers Trainer subclass: add_gradpruner works the same way). Run from
the repository root (the default --text is its README).

    python examples/trl_sft.py --model PATH --gradpruner_config configs/demo.json
"""

import argparse

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

import gradpruner_ds
from gradpruner_ds.integrations.hf_trainer import add_gradpruner

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True, help="a from_pretrained folder (Llama, Mistral, Qwen, Gemma)")
parser.add_argument("--text", default="README.md", help="a text file to train on")
parser.add_argument("--steps", type=int, default=12)
parser.add_argument("--output_dir", default="outputs/example_trl")
parser.add_argument("--gradpruner_config", required=True, help="a JSON file holding the gradpruner block")
args = parser.parse_args()
block = gradpruner_ds.read_block_file(args.gradpruner_config)  # checked before any work below

tokenizer = AutoTokenizer.from_pretrained(args.model)
lines = [line for line in open(args.text).read().splitlines() if len(line) > 40]
dataset = Dataset.from_list([{"text": line} for line in lines])
model = AutoModelForCausalLM.from_pretrained(args.model)
config = SFTConfig(
    output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=2, learning_rate=1e-4,
    logging_steps=1, save_strategy="no", report_to=[], max_length=64, use_cpu=not torch.cuda.is_available(),
)
trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
add_gradpruner(trainer, block)
trainer.train()
gradpruner_ds.save_pretrained(trainer.model_wrapped, f"{args.output_dir}/final", tokenizer)
# several processes: end them together (on CPU, gloo can abort one at interpreter exit otherwise)
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
