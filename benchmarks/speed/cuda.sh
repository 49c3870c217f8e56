#!/bin/bash
# The prepared GPU run of the speed benchmark (issue #4, item 5): bf16 mixed precision on CUDA with NCCL,
# world 1 (one GPU), and world 2 when two or more GPUs are visible (NCCL cannot put two ranks on one GPU).
# Needs: torch with CUDA, deepspeed, transformers (this repo's pins). Writes docs/benchmarks/speed_cuda_w<N>.json
# and prints the ratio tables; a ~200M-parameter Llama (16 layers, hidden 1024), sequence 512, micro-batch 4.
# Usage: bash benchmarks/speed/cuda.sh [OUT_DIR]   (PYTHON=... to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-docs/benchmarks}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
n=$($py -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
if [ "$n" -lt 1 ]; then
  echo "gradpruner: benchmarks/speed/cuda.sh needs a CUDA GPU; none is visible (run benchmarks/speed/run.py on CPU)" >&2
  exit 2
fi
nvidia-smi -L || true
$py -c 'import torch, deepspeed, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "deepspeed", deepspeed.__version__, "transformers", transformers.__version__)'
model=(--layers 16 --hidden 1024 --vocab 32000 --seq 512 --micro 4 --steps 8 --warmup 3)
for w in 1 2; do
  [ "$w" -le "$n" ] || { echo "world $w skipped: $n GPU(s) visible"; continue; }
  echo "== world $w, bf16, CUDA"
  $py benchmarks/speed/run.py --device cuda --dtype bf16 --world "$w" --engines zero1 zero2 zero3 fsdp2 \
      "${model[@]}" --out "$out/speed_cuda_w$w.json"
done
