#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: lint, types, the wheel in a clean venv without
# deepspeed (scripts/check_wheel.sh), unit, distributed and integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false
ruff check gradpruner_ds launch tests benchmarks
ruff format --check gradpruner_ds
mypy gradpruner_ds
bash scripts/check_wheel.sh
python -m pytest -p no:cacheprovider tests "$@"
