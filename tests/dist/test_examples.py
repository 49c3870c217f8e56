"""Every file of ``examples/`` (one per launch, linked from the README's launch table) run as written, the way
users run it: the plain loop with python, FSDP2 under torchrun, the DeepSpeed loop under torchrun, mpirun and
the deepspeed launcher (with and without ``--gradpruner``), the HF Trainer in one process and under torchrun
with a ZeRO-3 config. The model is a tiny random Llama saved with ``save_pretrained`` (loaded through
``from_pretrained`` as the examples do); each run's saved model reloads with the pruned layer count."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers.procs import ROOT, launch, tool
from helpers.ranks import free_port

pytestmark = pytest.mark.dist

EXAMPLES = ROOT / "examples"
EXAMPLE = EXAMPLES / "deepspeed_loop.py"
BLOCK = {"window_steps": 2, "num_drop": 2, "progress_bar": False, "plot": False}


def test_the_readme_links_every_example_with_its_command():
    readme = (ROOT / "README.md").read_text()
    for path in sorted(EXAMPLES.glob("*.py")):
        assert f"examples/{path.name}" in readme, path.name


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from launch.train import load_tokenizer, tiny_model

    out = tmp_path_factory.mktemp("tiny_model")
    tok = load_tokenizer()
    tiny_model(len(tok), 6, seed=0).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _run(
    launcher: list[str], tmp_path: Path, model_dir: Path, gradpruner: bool, stage: int = 3, block: dict = BLOCK
) -> str:
    """The DeepSpeed example with the shipped ``configs/zero<stage>.json`` as the README writes it; the block of
    the shipped config is for a real model, so a tiny model's block comes from ``--gradpruner_config``."""
    args = [str(EXAMPLE), "--model", str(model_dir), "--steps", "4", "--output_dir", str(tmp_path / "out"),
            "--deepspeed_config", str(ROOT / "configs" / f"zero{stage}.json")]  # fmt: skip
    if gradpruner:
        args += ["--gradpruner", "--gradpruner_config", str(_block_file(tmp_path, block))]
    return launch([*launcher, *args], timeout=240)


def _layers(tmp_path: Path, sub: str = "final") -> int:
    from transformers import AutoModelForCausalLM

    return len(AutoModelForCausalLM.from_pretrained(tmp_path / "out" / sub).model.layers)


@pytest.mark.skipif(tool("torchrun") is None, reason="torchrun not installed")
def test_example_under_torchrun_zero3_prunes_and_saves(tmp_path, model_dir):
    """With a recovery block too: the snippet's ``pruner.distill`` call adds the term for the one step after
    the prune (no warning that it is missing), then the teacher is freed."""
    torchrun = [tool("torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
    log = _run(torchrun, tmp_path, model_dir, gradpruner=True, block={**BLOCK, "recovery": {"distill_steps": 1}})
    assert "1 distillation steps done, teacher freed" in log and "added no distillation term" not in log
    assert _layers(tmp_path) == 4


@pytest.mark.skipif(tool("torchrun") is None, reason="torchrun not installed")
def test_example_without_the_flag_warns_and_does_not_prune(tmp_path, model_dir):
    torchrun = [tool("torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
    log = _run(torchrun, tmp_path, model_dir, gradpruner=False)
    assert "--gradpruner is not given: GradPruner is off and nothing will be pruned" in log
    assert _layers(tmp_path) == 6


@pytest.mark.skipif(tool("mpirun") is None, reason="mpirun not installed")
def test_example_under_mpirun_zero2(tmp_path, model_dir):
    _run([tool("mpirun"), "-np", "2", sys.executable], tmp_path, model_dir, gradpruner=True, stage=2)
    assert _layers(tmp_path) == 4


@pytest.mark.skipif(tool("deepspeed") is None, reason="the deepspeed launcher is not installed")
def test_example_under_the_deepspeed_launcher_zero1(tmp_path, model_dir):
    launcher = [tool("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
    _run(launcher, tmp_path, model_dir, gradpruner=True, stage=1)
    assert _layers(tmp_path) == 4


def _block_file(tmp_path: Path, block: dict = BLOCK) -> Path:
    path = tmp_path / "gradpruner.json"
    path.write_text(json.dumps(block))
    return path


def test_the_plain_loop_example(tmp_path, model_dir):
    launch([sys.executable, str(EXAMPLES / "plain_loop.py"), "--model", str(model_dir), "--steps", "4",
            "--output_dir", str(tmp_path / "out"), "--gradpruner", "--gradpruner_config", str(_block_file(tmp_path))])  # fmt: skip
    assert _layers(tmp_path) == 4


@pytest.mark.skipif(tool("torchrun") is None, reason="torchrun not installed")
def test_the_ddp_example_under_torchrun(tmp_path, model_dir):
    torchrun = [tool("torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
    launch([*torchrun, str(EXAMPLES / "ddp.py"), "--model", str(model_dir), "--steps", "4", "--output_dir",
            str(tmp_path / "out"), "--gradpruner", "--gradpruner_config", str(_block_file(tmp_path))], timeout=240)  # fmt: skip
    assert _layers(tmp_path) == 4
    assert (tmp_path / "out" / "gradpruner_report.json").exists()  # the report beside the model


@pytest.mark.skipif(tool("torchrun") is None, reason="torchrun not installed")
def test_the_fsdp2_example_under_torchrun(tmp_path, model_dir):
    torchrun = [tool("torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
    launch([*torchrun, str(EXAMPLES / "fsdp2.py"), "--model", str(model_dir), "--steps", "4", "--output_dir",
            str(tmp_path / "out"), "--gradpruner", "--gradpruner_config", str(_block_file(tmp_path))], timeout=240)  # fmt: skip
    assert _layers(tmp_path) == 4


def test_the_trainer_example_in_one_process(tmp_path, model_dir):
    launch([sys.executable, str(EXAMPLES / "hf_trainer.py"), "--model", str(model_dir), "--steps", "4",
            "--output_dir", str(tmp_path / "out"), "--gradpruner_config", str(_block_file(tmp_path))])  # fmt: skip
    assert _layers(tmp_path) == 4


@pytest.mark.skipif(tool("torchrun") is None, reason="torchrun not installed")
def test_the_trainer_example_under_torchrun_with_zero3(tmp_path, model_dir):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
                              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                              "zero_optimization": {"stage": 3}, "gradpruner": BLOCK}))  # fmt: skip
    torchrun = [tool("torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
    launch([*torchrun, str(EXAMPLES / "hf_trainer.py"), "--model", str(model_dir), "--steps", "4", "--output_dir",
            str(tmp_path / "out"), "--deepspeed", str(ds)], timeout=300)  # fmt: skip
    assert _layers(tmp_path) == 4


@pytest.mark.skipif(tool("accelerate") is None, reason="accelerate not installed")
@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_the_accelerate_prepare_example(tmp_path, model_dir, engine):
    """``accelerate launch``: DDP on 2 CPU processes (MULTI_CPU; prepare wraps the model in DDP) and the DeepSpeed
    plugin (ZeRO-2; the observation moves inside accelerator.backward, the prepared engine is rebound after the
    prune). The plugin runs one process here: accelerate 1.15 on CPU counts one process under its DeepSpeed
    plugin while the process group has two, and DeepSpeed then refuses the batch sizes it computed."""
    cfg = "configs/accelerate_ddp_cpu.yaml" if engine == "ddp" else "configs/accelerate_deepspeed_plugin.yaml"
    procs = [] if engine == "ddp" else ["--num_processes", "1"]
    launch([tool("accelerate"), "launch", "--config_file", cfg, *procs, "--main_process_port", str(free_port()),
            str(EXAMPLES / "accelerate_prepare.py"), "--model", str(model_dir), "--steps", "4",
            "--output_dir", str(tmp_path / "out"), "--gradpruner_config", str(_block_file(tmp_path))], timeout=300)  # fmt: skip
    assert _layers(tmp_path) == 4


def test_the_trl_sft_example(tmp_path, model_dir):
    """TRL's SFTTrainer (a Trainer subclass) with add_gradpruner, one process."""
    pytest.importorskip("trl")
    launch([sys.executable, str(EXAMPLES / "trl_sft.py"), "--model", str(model_dir), "--steps", "4",
            "--output_dir", str(tmp_path / "out"), "--gradpruner_config", str(_block_file(tmp_path))])  # fmt: skip
    assert _layers(tmp_path) == 4
