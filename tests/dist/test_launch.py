"""Real launches of ``launch/train.py`` (torchrun, mpirun, the deepspeed launcher, plain python) on a tiny
random Llama over the SmolLM2 vocabulary, trained on the real intent_recognition data.

Every launch runs in its own session and is killed as a whole process group when it exceeds its time
box, so a hung rank can never hang CI. Each run is checked end to end: exit code 0, the GradPruner
report with a plan, and a ``final/`` checkpoint that ``from_pretrained`` reloads with the pruned number
of layers; a distributed run's plan must equal the single-process run's plan (same seed and data).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers.procs import ROOT, launch, tool
from helpers.ranks import free_port

pytestmark = pytest.mark.dist

TRAIN = ROOT / "launch" / "train.py"
LAYERS, REMOVED = 8, 3
BLOCK = {"window_steps": 3, "num_drop": 2, "num_merge": 1, "keep_fraction": 0.3, "progress_bar": False}
# global batch 4 of single items: every world size computes the same global-batch gradient
COMMON = ["--tiny", "--tiny_layers", str(LAYERS), "--max_steps", "8", "--batch_size", "4", "--micro_batch_size", "1",
          "--lr", "1e-3", "--eval_size", "0", "--seed", "0"]


def train_args(out: Path, block_file: Path | None, ds_config: str | None = None) -> list[str]:
    args = [str(TRAIN), *COMMON, "--output_dir", str(out)]
    if ds_config is not None:
        args += ["--deepspeed", "--deepspeed_config", str(ROOT / "configs" / ds_config)]
    if block_file is not None:
        args += ["--gradpruner", "--gradpruner_config", str(block_file)]
    return args


def check_run(out: Path, log: str, pruned: bool) -> dict[str, Any]:
    """The summary, report and final checkpoint of a finished run; returns the summary."""
    import torch
    from transformers import AutoModelForCausalLM

    summary = json.loads((out / "summary.json").read_text())
    layers = LAYERS - REMOVED if pruned else LAYERS
    assert "parameters: dense" in log and f"decoder layers: {LAYERS} -> {layers}" in log
    model = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32)
    assert len(model.model.layers) == layers and model.config.num_hidden_layers == layers
    assert sum(p.numel() for p in model.parameters()) == summary["pruned_params"]
    assert all(x == x for x in summary["losses"]) and len(summary["losses"]) == 8
    if pruned:
        report = json.loads((out / "gradpruner_report.json").read_text())
        assert len(report["plan"]["dropped"]) + len(report["plan"]["merged"]) == REMOVED
        assert report["params_after"] == summary["pruned_params"] < summary["dense_params"]
        assert model.config.gradpruner["original_num_layers"] == LAYERS
        summary["report"] = report
    else:
        assert not (out / "gradpruner_report.json").exists()
        assert summary["pruned_params"] == summary["dense_params"]
    return summary


def same_plan(a: dict[str, Any], b: dict[str, Any]) -> None:
    pa, pb = a["report"]["plan"], b["report"]["plan"]
    for key in ("dropped", "merged", "targets"):
        assert pa[key] == pb[key], key
    assert pa["scores"] == pytest.approx(pb["scores"], rel=1e-3)
    assert a["losses"] == pytest.approx(b["losses"], abs=1e-3)  # the same global batches, to float noise


@pytest.fixture(scope="module")
def block_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("block") / "tiny_block.json"
    path.write_text(json.dumps(BLOCK))
    return path


@pytest.fixture(scope="module")
def single(tmp_path_factory, block_file) -> dict[str, Any]:
    """(d) plain single process with --gradpruner: the reference plan (with a 3-item evaluation)."""
    out = tmp_path_factory.mktemp("plain_gp")
    args = train_args(out, block_file)
    args[args.index("--eval_size") + 1] = "3"
    log = launch([sys.executable, *args])
    summary = check_run(out, log, pruned=True)
    assert summary["acc_before"] is not None and "acc_after" in summary and "accuracy on 3" in log
    return summary


def test_plain_with_gradpruner(single):
    assert single["mode"] == "plain" and single["world_size"] == 1 and single["gradient_accumulation"] == 4


@pytest.fixture(scope="module")
def single_lora(tmp_path_factory, block_file) -> dict[str, Any]:
    """--lora 4 in one process: the reference for the LoRA runs under DeepSpeed."""
    out = tmp_path_factory.mktemp("plain_lora")
    log = launch([sys.executable, *train_args(out, block_file), "--lora", "4"])
    summary = check_run(out, log, pruned=True)
    summary["log"] = log
    return summary


def test_plain_with_lora_counts_the_parameters_of_the_saved_model(single_lora):
    """--lora: the summary's and the report's parameter counts are the model as saved (adapters merged), the
    same before and after the prune as without LoRA."""
    summary = single_lora
    assert summary["dense_params"] == summary["report"]["params_before"]
    frac = f"({100 * summary['pruned_params'] / summary['dense_params']:.1f}%)"
    assert frac in summary["log"].split("parameters: dense")[1]


@pytest.mark.skipif(tool("torchrun") is None, reason="torchrun not installed")
@pytest.mark.parametrize("stage", [2, 3])
def test_torchrun_lora_under_deepspeed_matches_single_process(tmp_path, block_file, single_lora, stage):
    """--lora with --deepspeed (ZeRO-2 and ZeRO-3 on 2 ranks): the plan, the losses and the saved model's
    size are the single-process LoRA run's; the saved model has the adapters merged in. configs/zero3.json
    keeps the tiny model's matrices whole on every rank (stage3_param_persistence_threshold): the merge into
    a frozen base weight must refresh that whole copy, not only the rank's slice (it once did not, and every
    loss after the prune differed)."""
    cmd = [tool("torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           *train_args(tmp_path, block_file, f"zero{stage}.json"), "--lora", "4"]  # fmt: skip
    summary = check_run(tmp_path, launch(cmd), pruned=True)
    assert summary["mode"] == f"zero{stage}" and summary["world_size"] == 2
    same_plan(summary, single_lora)
    assert summary["pruned_params"] == single_lora["pruned_params"]


def test_plain_without_gradpruner(tmp_path):
    log = launch([sys.executable, *train_args(tmp_path, None)])
    summary = check_run(tmp_path, log, pruned=False)
    assert "plan" not in summary


@pytest.mark.skipif(tool("torchrun") is None, reason="torchrun not installed")
def test_torchrun_zero3_matches_single_process(tmp_path, block_file, single):
    cmd = [tool("torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           *train_args(tmp_path, block_file, "zero3.json")]
    log = launch(cmd)
    summary = check_run(tmp_path, log, pruned=True)
    assert summary["mode"] == "zero3" and summary["world_size"] == 2
    same_plan(summary, single)


def _mpi_ok() -> str | None:
    if tool("mpirun") is None:
        return "mpirun not installed (pip install mpich mpi4py)"
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py not installed (DeepSpeed's MPI discovery needs it)"
    return None


@pytest.mark.skipif(_mpi_ok() is not None, reason=str(_mpi_ok()))
def test_mpirun_zero2(tmp_path, block_file, single):
    # DeepSpeed's MPI discovery (mpi4py) sets RANK/WORLD_SIZE/MASTER_ADDR; MASTER_PORT comes from the env
    log = launch([tool("mpirun"), "-np", "2", sys.executable, *train_args(tmp_path, block_file, "zero2.json")])
    summary = check_run(tmp_path, log, pruned=True)
    assert summary["mode"] == "zero2" and summary["world_size"] == 2
    same_plan(summary, single)


@pytest.mark.skipif(tool("deepspeed") is None, reason="the deepspeed launcher is not installed")
def test_deepspeed_launcher_zero1(tmp_path, block_file, single):
    # on CPU the launcher counts the CPU accelerator's devices; --num_gpus picks the number of ranks
    cmd = [tool("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           *train_args(tmp_path, block_file, "zero1.json")]
    log = launch(cmd)
    summary = check_run(tmp_path, log, pruned=True)
    assert summary["mode"] == "zero1" and summary["world_size"] == 2
    same_plan(summary, single)


@pytest.mark.skipif(tool("torchrun") is None, reason="torchrun not installed")
def test_torchrun_zero2_bf16(tmp_path, block_file):
    cmd = [tool("torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           *train_args(tmp_path, block_file, "zero2_bf16.json")]
    log = launch(cmd)
    summary = check_run(tmp_path, log, pruned=True)  # bf16 rounding: no exact comparison with fp32
    assert summary["mode"] == "zero2" and summary["world_size"] == 2
    assert json.loads((tmp_path / "final" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.skipif(tool("torchrun") is None, reason="torchrun not installed")
def test_config_errors_stop_every_rank_before_training(tmp_path):
    ds_config = tmp_path / "ds.json"
    ds_config.write_text(json.dumps({"zero_optimization": {"stage": 2}, "grad_pruner": BLOCK}))  # a typo
    args = [str(TRAIN), *COMMON, "--output_dir", str(tmp_path / "out"), "--deepspeed", "--deepspeed_config",
            str(ds_config), "--gradpruner"]
    log = launch([tool("torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), *args],
                 timeout=60, expect_rc=1)
    assert "gradpruner: the config has no 'gradpruner' block but a key that looks like a misspelling" in log
    # a user mistake is one message per rank, not a traceback (torchrun adds its own summary, exit code 1)
    assert f'File "{TRAIN}"' not in log and not (tmp_path / "out" / "final").exists()


@pytest.mark.skipif(tool("torchrun") is None, reason="torchrun not installed")
def test_a_diverged_zero3_run_saves_nothing_and_every_rank_exits_non_zero(tmp_path):
    """--lr 1e12: after the first updates the forward overflows and the loss is NaN (the same on every rank: it
    is all-reduced; DeepSpeed skips the non-finite steps, so the weights stay finite; each rank checks its own
    ZeRO-3 partition, one all-reduce): no final/ and no summary.json, one gradpruner: error per rank.
    (Drop only: a merge after overflow-skipped ZeRO-3 steps fails earlier, inside the merge's re-assembly of
    a whole parameter: reported with issue #30.)"""
    block = tmp_path / "drop.json"
    block.write_text(json.dumps({"window_steps": 3, "num_drop": 2, "progress_bar": False, "plot": False}))
    args = train_args(tmp_path, block, "zero3.json")
    args[args.index("--lr") + 1] = "1e12"
    log = launch([tool("torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), *args], expect_rc=1)
    assert log.count("gradpruner: a run whose final loss or weights are not finite is not saved") == 2, log[-3000:]
    assert "(got 'final loss nan')" in log
    assert not (tmp_path / "final").exists() and not (tmp_path / "summary.json").exists()
