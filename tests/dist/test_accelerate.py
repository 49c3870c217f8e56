"""``accelerate launch`` with a DeepSpeed plugin config runs the training script with GradPruner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist
ROOT = Path(__file__).resolve().parents[2]


def test_accelerate_launch_with_deepspeed_plugin_config(tmp_path):
    gp = tmp_path / "gp.json"
    gp.write_text(json.dumps({"window_steps": 2, "num_drop": 2, "num_merge": 1, "progress_bar": False}))
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    cmd = [
        str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", "configs/accelerate_zero2.yaml",
        "launch/train.py", "--tiny", "--max_steps", "6", "--batch_size", "4", "--micro_batch_size", "2",
        "--eval_size", "0", "--no_save", "--deepspeed", "--deepspeed_config", "configs/zero2.json",
        "--gradpruner", "--gradpruner_config", str(gp), "--output_dir", str(tmp_path / "out"),
    ]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert "world 2" in p.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    report = json.loads((tmp_path / "out" / "gradpruner_report.json").read_text())
    assert report["plan"]["dropped"] and report["plan"]["merged"]
    assert summary
