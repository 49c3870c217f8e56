"""``accelerate launch`` with a DeepSpeed plugin config runs the training script with GradPruner."""

from __future__ import annotations

import json

import pytest
from helpers.procs import launch, tool

pytestmark = pytest.mark.dist


@pytest.mark.skipif(tool("accelerate") is None, reason="accelerate not installed")
def test_accelerate_launch_with_deepspeed_plugin_config(tmp_path):
    gp = tmp_path / "gp.json"
    gp.write_text(json.dumps({"window_steps": 2, "num_drop": 2, "num_merge": 1, "progress_bar": False}))
    cmd = [
        tool("accelerate"), "launch", "--config_file", "configs/accelerate_zero2.yaml",
        "launch/train.py", "--tiny", "--max_steps", "6", "--batch_size", "4", "--micro_batch_size", "2",
        "--eval_size", "0", "--no_save", "--deepspeed", "--deepspeed_config", "configs/zero2.json",
        "--gradpruner", "--gradpruner_config", str(gp), "--output_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    out = launch(cmd, timeout=300)
    assert "world 2" in out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    report = json.loads((tmp_path / "out" / "gradpruner_report.json").read_text())
    assert report["plan"]["dropped"] and report["plan"]["merged"]
    assert summary
