"""GradPruner inside the real HF ``Trainer`` (``launch/train_hf.py``) on 2 CPU ranks: DeepSpeed ZeRO-2,
ZeRO-3 and FSDP2 (sharded at load time by transformers), each checked against the single-process
Trainer run of the same computation (tiny random Llama, real intent_recognition data, sequential
sampling so every world size sees the same global batches): the same plan, the same per-step losses
before and after the in-place prune, the Trainer's step count, and a pruned ``gradpruner_final`` that
``from_pretrained`` loads and that computes the same logits as the single-process one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.procs import ROOT, launch, tool
from helpers.ranks import free_port
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.dist

SCRIPT = str(ROOT / "launch" / "train_hf.py")
BLOCK = {"window_steps": 2, "num_drop": 2, "num_merge": 1, "criterion": "igia_sum", "progress_bar": False}
STEPS, LAYERS, KEPT = 5, 8, 5
COMMON = ["--tiny", "--tiny_layers", str(LAYERS), "--max_steps", str(STEPS)]


def trainer_config(tmp: Path, stage: int) -> Path:
    cfg = json.loads((ROOT / "configs" / f"trainer_zero{stage}.json").read_text())
    cfg["gradpruner"] = BLOCK
    path = tmp / f"trainer_zero{stage}.json"
    path.write_text(json.dumps(cfg))
    return path


def check(out: Path, log: str) -> dict[str, Any]:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == STEPS and len(summary["losses"]) == STEPS
    assert summary["layers_before"] == LAYERS and summary["layers_after"] == KEPT
    assert "pruned model saved to" in log
    return summary


def final_logits(out: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(out / "gradpruner_final", dtype=torch.float32)
    assert model.config.num_hidden_layers == KEPT == len(model.model.layers)
    assert model.config.gradpruner["original_num_layers"] == LAYERS
    ids = torch.arange(3, 19).reshape(2, 8)
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("trainer_single")
    block = out / "block.json"
    block.write_text(json.dumps(BLOCK))
    log = launch([sys.executable, SCRIPT, *COMMON, "--per_device_batch", "4", "--gradpruner_config", str(block),
                  "--output_dir", str(out)])
    return out, check(out, log)


def same_run(a: dict[str, Any], b: dict[str, Any]) -> None:
    for key in ("dropped", "merged", "targets", "step", "observed_steps"):
        assert a["plan"][key] == b["plan"][key], key
    assert a["plan"]["scores"] == pytest.approx(b["plan"]["scores"], rel=1e-4)
    # steps 1-2 observed, pruned after step 2, steps 3-5 on the pruned model with the carried optimizer
    assert a["losses"] == pytest.approx(b["losses"], abs=2e-5)


def test_single_process_trainer_prunes(single):
    out, summary = single
    plan = summary["plan"]
    order = sorted(range(LAYERS), key=lambda i: plan["scores"][i])  # the lowest scores go first
    assert summary["engine"] == "single"
    assert sorted(plan["dropped"]) == sorted(order[:2]) and plan["merged"] == order[2:3]
    report = json.loads((out / "gradpruner" / "gradpruner_report.json").read_text())
    assert report["params_after"] < report["params_before"]


@pytest.mark.skipif(tool("torchrun") is None, reason="torchrun not installed")
@pytest.mark.parametrize("stage", [2, 3])
def test_trainer_deepspeed_matches_single_process(tmp_path, single, stage):
    cmd = [tool("torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), SCRIPT, *COMMON,
           "--per_device_batch", "2", "--deepspeed", str(trainer_config(tmp_path, stage)),
           "--output_dir", str(tmp_path)]
    summary = check(tmp_path, launch(cmd))
    assert summary["engine"] == "deepspeed" and summary["world"] == 2
    same_run(summary, single[1])
    assert torch.allclose(final_logits(tmp_path), final_logits(single[0]), atol=1e-4)


@pytest.mark.skipif(tool("torchrun") is None, reason="torchrun not installed")
def test_trainer_ddp_matches_single_process(tmp_path, single):
    """torchrun without DeepSpeed or FSDP: the Trainer wraps the model in DDP; add_gradpruner picks the DDP
    adapter from trainer.model_wrapped, and after the prune the Trainer's DDP object is the new wrapper."""
    block = tmp_path / "block.json"
    block.write_text(json.dumps(BLOCK))
    cmd = [tool("torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), SCRIPT, *COMMON,
           "--per_device_batch", "2", "--gradpruner_config", str(block), "--output_dir", str(tmp_path)]  # fmt: skip
    summary = check(tmp_path, launch(cmd))
    assert summary["engine"] == "ddp" and summary["world"] == 2
    same_run(summary, single[1])
    assert torch.allclose(final_logits(tmp_path), final_logits(single[0]), atol=1e-4)


@pytest.mark.skipif(tool("accelerate") is None, reason="accelerate not installed")
def test_accelerate_launch_trainer_fsdp2_matches_single_process(tmp_path, single):
    """``accelerate launch`` on 2 CPU processes; the model is FSDP2-sharded at load time by transformers
    (``DistributedConfig(fsdp_size=2)``), which the Trainer trains without wrapping it again."""
    block = tmp_path / "block.json"
    block.write_text(json.dumps(BLOCK))
    cmd = [tool("accelerate"), "launch", "--config_file", str(ROOT / "configs" / "accelerate_fsdp2.yaml"),
           "--main_process_port", str(free_port()), SCRIPT, *COMMON, "--per_device_batch", "2", "--fsdp2",
           "--gradpruner_config", str(block), "--output_dir", str(tmp_path)]
    summary = check(tmp_path, launch(cmd))
    assert summary["engine"] == "fsdp2" and summary["world"] == 2
    same_run(summary, single[1])
    assert torch.allclose(final_logits(tmp_path), final_logits(single[0]), atol=1e-4)


@pytest.mark.skipif(tool("torchrun") is None, reason="torchrun not installed")
def test_trainer_deepspeed_resumes_from_its_checkpoint_after_the_prune(tmp_path, single):
    """ZeRO-2 on 2 ranks: a run that saves every 2 steps, then a NEW run resumed from checkpoint-4 (after
    the prune at step 2): the pruned architecture is rebuilt before the Trainer loads the engine's
    checkpoint, nothing is observed again, and the losses of steps 5.. and the final model are the
    uninterrupted run's."""
    ds = str(trainer_config(tmp_path, 2))
    base = [tool("torchrun"), "--nproc_per_node", "2", SCRIPT, *COMMON, "--per_device_batch", "2", "--deepspeed", ds]
    first = tmp_path / "first"
    check(first, launch([*base[:3], "--master_port", str(free_port()), *base[3:], "--save_steps", "2",
                         "--output_dir", str(first)]))  # fmt: skip
    assert (first / "checkpoint-4" / "gradpruner" / "state.json").exists()
    second = tmp_path / "second"
    log = launch([*base[:3], "--master_port", str(free_port()), *base[3:], "--output_dir", str(second),
                  "--resume_from_checkpoint", str(first / "checkpoint-4")])  # fmt: skip
    assert "resuming a pruned run" in log and "observing" not in log.split("resuming a pruned run")[1]
    resumed = json.loads((second / "summary.json").read_text())
    assert resumed["layers_after"] == KEPT and resumed["global_step"] == STEPS
    assert resumed["losses"] == pytest.approx(single[1]["losses"], abs=2e-5)
    assert torch.allclose(final_logits(second), final_logits(single[0]), atol=1e-4)


KD_BLOCK = {**BLOCK, "recovery": {"distill_steps": 2, "temperature": 2.0, "weight": 0.5}}


@pytest.fixture(scope="module")
def single_kd(tmp_path_factory, single) -> tuple[Path, dict[str, Any]]:
    """The single-process Trainer run with a recovery block; its distilled steps differ from the run
    without it exactly where the teacher lives."""
    one = tmp_path_factory.mktemp("trainer_single_kd")
    block = one / "block.json"
    block.write_text(json.dumps(KD_BLOCK))
    ref = check(one, launch([sys.executable, SCRIPT, *COMMON, "--per_device_batch", "4", "--gradpruner_config",
                             str(block), "--output_dir", str(one)]))  # fmt: skip
    window = BLOCK["window_steps"]
    plain = single[1]["losses"]
    assert ref["losses"][:window] == pytest.approx(plain[:window], abs=1e-6)
    assert all(abs(a - b) > 1e-4 for a, b in zip(ref["losses"][window : window + 2], plain[window : window + 2]))
    return one, ref


@pytest.mark.skipif(tool("torchrun") is None, reason="torchrun not installed")
@pytest.mark.parametrize("stage", [2, 3])
def test_trainer_recovery_under_deepspeed_matches_single_process(tmp_path, single_kd, stage):
    """The recovery block under the HF Trainer (``add_gradpruner`` adds the distillation term to the Trainer's
    loss): ZeRO-2 (a whole teacher) and ZeRO-3 (a teacher partitioned like the student) on 2 ranks equal the
    single-process Trainer run with the same block."""
    cfg = json.loads((ROOT / "configs" / f"trainer_zero{stage}.json").read_text())
    cfg["gradpruner"] = KD_BLOCK
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    cmd = [tool("torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), SCRIPT, *COMMON,
           "--per_device_batch", "2", "--deepspeed", str(tmp_path / "ds.json"), "--output_dir", str(tmp_path)]
    summary = check(tmp_path, launch(cmd))
    assert summary["engine"] == "deepspeed" and summary["world"] == 2
    same_run(summary, single_kd[1])
    assert torch.allclose(final_logits(tmp_path), final_logits(single_kd[0]), atol=1e-4)


@pytest.mark.skipif(tool("torchrun") is None, reason="torchrun not installed")
@pytest.mark.parametrize("stage", [2, 3])
def test_trainer_resume_during_the_distillation_matches_single_process(tmp_path, single_kd, stage):
    """2 ranks under the HF Trainer: a run with the recovery block saves every step; a NEW run resumed from
    checkpoint-3 (pruned after step 2, one of the 2 distillation steps done) restores each rank's piece of the
    teacher (whole under ZeRO-2, partitioned under ZeRO-3) before the surgery, distills the remaining step,
    and ends with the single-process run's losses and model. (The Trainer's FSDP2 path -- a model sharded
    at load time -- cannot be checkpointed: transformers refuses it.)"""
    cfg = json.loads((ROOT / "configs" / f"trainer_zero{stage}.json").read_text())
    cfg["gradpruner"] = KD_BLOCK
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    base = [SCRIPT, *COMMON, "--per_device_batch", "2", "--deepspeed", str(tmp_path / "ds.json")]

    def run(*extra: str) -> str:
        return launch([tool("torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), *base, *extra])

    first = tmp_path / "first"
    check(first, run("--save_steps", "1", "--output_dir", str(first)))
    saved = first / "checkpoint-3" / "gradpruner"
    assert {p.name for p in saved.glob("stats_rank*")} == {"stats_rank0.safetensors", "stats_rank1.safetensors"}
    second = tmp_path / "second"
    log = run("--output_dir", str(second), "--resume_from_checkpoint", str(first / "checkpoint-3"))
    assert "1 of 2 steps done, teacher restored" in log and "teacher freed" in log
    resumed = json.loads((second / "summary.json").read_text())
    assert resumed["layers_after"] == KEPT and resumed["global_step"] == STEPS
    assert resumed["losses"] == pytest.approx(single_kd[1]["losses"], abs=2e-5)
    assert torch.allclose(final_logits(second), final_logits(single_kd[0]), atol=1e-4)


@pytest.mark.skipif(tool("torchrun") is None, reason="torchrun not installed")
def test_trainer_with_peft_lora_under_zero3_matches_single_process(tmp_path):
    """peft LoRA adapters under the Trainer (``--lora``: get_peft_model on the model transformers built under
    zero.Init), ZeRO-3 on 2 ranks: the plan, the losses (merge into the frozen base weights included) and the
    complete pruned model in ``gradpruner_final`` (adapters merged) are the single-process Trainer's."""
    block = tmp_path / "block.json"
    block.write_text(json.dumps(BLOCK))
    one = tmp_path / "one"
    ref = check(one, launch([sys.executable, SCRIPT, *COMMON, "--per_device_batch", "4", "--lora", "4",
                             "--gradpruner_config", str(block), "--output_dir", str(one)]))  # fmt: skip
    cfg = json.loads((ROOT / "configs" / "trainer_zero3.json").read_text())
    cfg["gradpruner"] = BLOCK
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    two = tmp_path / "two"
    cmd = [tool("torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), SCRIPT, *COMMON,
           "--per_device_batch", "2", "--lora", "4", "--deepspeed", str(tmp_path / "ds.json"), "--output_dir", str(two)]
    summary = check(two, launch(cmd))
    assert summary["engine"] == "deepspeed" and summary["world"] == 2
    same_run(summary, ref)
    assert torch.allclose(final_logits(two), final_logits(one), atol=1e-4)
