#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: lint, types, unit, distributed and integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."
# the tests train and evaluate on the real task data, which lives beside the checkout (project layout)
if [ ! -d ../shared/data ]; then
    echo "scripts/test.sh: the task data folder $(cd .. && pwd)/shared/data is missing: the tests need" \
         "../shared/data beside this checkout (copy or link the project's shared/ folder there)" >&2
    exit 2
fi
bash scripts/setup.sh
. .venv/bin/activate
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false
ruff check gradpruner_ds launch tests benchmarks
ruff format --check gradpruner_ds
mypy gradpruner_ds
python -m pytest -p no:cacheprovider tests "$@"
