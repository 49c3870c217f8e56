#!/usr/bin/env bash
# Set up (if needed) and run the main job: fine-tune the real SmolLM2-135M on a real task with
# GradPruner on (observe -> score -> prune + merge -> keep training), then evaluate and save.
# Extra arguments go to launch/train.py (python -m launch.train --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -m launch.train --gradpruner --gradpruner_config configs/demo.json --output_dir outputs/demo "$@"
