"""Shared test setup: one thread per process (2-core machines), quiet libraries."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# child processes (the scripts the tests launch) import launch/ and benchmarks/ from the repository root
ROOT = Path(__file__).resolve().parents[1]
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)


import torch  # noqa: E402

torch.set_num_threads(1)
