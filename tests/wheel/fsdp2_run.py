"""An FSDP2 run of GradPruner with only the package's own requirements installed (no deepspeed, peft,
accelerate or matplotlib): run by scripts/check_wheel.sh under torchrun in a clean venv.

Two gloo ranks, a random 6-layer Llama sharded with fully_shard per decoder layer and at the root: observe
2 steps, prune 2 layers (default criterion), train 2 more steps, save with gradpruner_ds.save_pretrained,
reload with from_pretrained on rank 0 and compare the logits with the trained sharded model's."""

import importlib.util
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import gradpruner_ds

for missing in ("deepspeed", "peft", "accelerate", "matplotlib"):
    assert importlib.util.find_spec(missing) is None, f"{missing} is installed: this check needs a venv without it"

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
model = LlamaForCausalLM(cfg)
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
config = gradpruner_ds.GradPrunerConfig.from_dict({"window_steps": 2, "num_drop": 2, "progress_bar": False})
pruner = gradpruner_ds.GradPruner(model, config, total_steps=4, backend=gradpruner_ds.FSDP2Backend(model))
gen = torch.Generator().manual_seed(1)
for _ in range(4):
    ids = torch.randint(0, 64, (4, 12), generator=gen)[rank * 2 : rank * 2 + 2]
    model(input_ids=ids, labels=ids).loss.backward()
    pruner.observe()
    optimizer.step()
    optimizer.zero_grad()
    optimizer, _ = pruner.maybe_prune(optimizer)
assert pruner.plan is not None and len(model.model.layers) == 4
out = os.path.join(tempfile.gettempdir(), f"gradpruner_wheel_check_{os.environ.get('MASTER_PORT', '0')}")
gradpruner_ds.save_pretrained(model, out)
probe = torch.arange(12).reshape(1, 12)
with torch.no_grad():
    logits = model(input_ids=probe).logits
if rank == 0:
    loaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=probe).logits, logits, rtol=1e-5, atol=1e-5)
    print(f"wheel check: FSDP2 without deepspeed pruned layers {list(pruner.plan.removed)}; saved model reloads")
dist.barrier()
dist.destroy_process_group()
sys.exit(0)
