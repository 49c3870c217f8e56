#!/usr/bin/env bash
# Build the wheel, install it into a clean venv with only its own requirements (no deepspeed, peft,
# accelerate, matplotlib), import it, and run GradPruner on 2 FSDP2 ranks there. Called by scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
work=${GRADPRUNER_WHEEL_DIR:-.cache/wheel-check}
rm -rf "$work/dist"
mkdir -p "$work"
.venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" . 2>&1 | grep -v "^WARNING: Location" || true
wheel=$(ls "$work"/dist/gradpruner_ds-*.whl)
if [ ! -x "$work/venv/bin/python" ]; then
  "$PY" -m venv "$work/venv"
  "$work/venv/bin/python" -m pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
fi
"$work/venv/bin/python" -m pip install -q --force-reinstall --no-deps "$wheel" 2>&1 | grep -v "^WARNING: Location" || true
"$work/venv/bin/python" -m pip install -q -c constraints.txt "$wheel" 2>&1 | grep -v "^WARNING: Location" || true
"$work/venv/bin/gradpruner-ds" --version
unzip -l "$wheel" | grep -q "gradpruner_ds/pruner.py"
! unzip -l "$wheel" | grep -q "tasks.py\|models.py"  # demo code stays out of the package
"$work/venv/bin/gradpruner-ds" config --list > "$work/configs.txt"  # the ready configs ship in the wheel
grep -qx "zero3.json" "$work/configs.txt"
OMP_NUM_THREADS=1 "$work/venv/bin/python" -m torch.distributed.run --nproc_per_node 2 --master_port "${MASTER_PORT:-29517}" \
  tests/wheel/fsdp2_run.py
