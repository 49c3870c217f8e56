#!/usr/bin/env bash
# The demo on 2 CPU ranks under DeepSpeed ZeRO-3 (torchrun): the same real model, data and GradPruner
# block as scripts/demo.sh, with IGIA accumulated on each rank's gradient shard, one all-reduce for the
# ranking, a shard-local merge and the engine re-partitioned in place. Extra arguments go to train.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -m torch.distributed.run --nproc_per_node 2 -m launch.train --deepspeed \
  --deepspeed_config configs/zero3.json --gradpruner --gradpruner_config configs/demo.json \
  --output_dir outputs/demo_zero3 "$@"
