"""Multi-node recipes: two torchrun 'nodes' on loopback, and the SLURM script rendered with stubs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.ranks import free_port

pytestmark = pytest.mark.dist
ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return env


def _tiny_training(tmp_path: Path, ds_config: str) -> list[str]:
    """launch/train.py on the tiny model with a small GradPruner block, writing into tmp_path/out."""
    gp = tmp_path / "gp.json"
    gp.write_text(json.dumps({"window_steps": 2, "num_drop": 2, "num_merge": 1, "progress_bar": False}))
    args = "--tiny --max_steps 6 --batch_size 4 --micro_batch_size 2 --eval_size 0 --no_save --deepspeed"
    return [str(ROOT / "launch" / "train.py"), *args.split(), "--deepspeed_config", str(ROOT / "configs" / ds_config),
            "--gradpruner", "--gradpruner_config", str(gp), "--output_dir", str(tmp_path / "out")]


def _run_nodes(cmds: list[list[str]], cwd: Path, out: Path) -> None:
    """One process per simulated node, all time-boxed; all must succeed and the plan must be written."""
    procs = [
        subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for cmd in cmds
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, text in zip(procs, outs, strict=True):
        assert p.returncode == 0, text[-3000:]
    report = json.loads((out / "gradpruner_report.json").read_text())
    assert len(report["plan"]["dropped"]) == 2 and len(report["plan"]["merged"]) == 1


def test_two_torchrun_nodes_on_loopback_prune_in_place(tmp_path):
    rdzv = ["--nnodes", "2", "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    torchrun = [sys.executable, "-m", "torch.distributed.run", *rdzv]
    script = _tiny_training(tmp_path, "zero3.json")
    _run_nodes([torchrun + ["--node_rank", str(i)] + script for i in range(2)], ROOT, tmp_path / "out")


def test_deepspeed_launcher_hostfile_two_nodes_on_loopback(tmp_path):
    """The DeepSpeed launcher with a two-entry hostfile, one launcher per 'node' (--no_ssh --node_rank)."""
    (tmp_path / "hostfile").write_text("node0 slots=1\nnode1 slots=1\n")
    launcher = [str(Path(sys.executable).parent / "deepspeed"), "--hostfile", str(tmp_path / "hostfile"), "--no_ssh",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    script = _tiny_training(tmp_path, "zero1.json")
    _run_nodes([launcher + ["--node_rank", str(i)] + script for i in range(2)], tmp_path, tmp_path / "out")


def test_slurm_script_renders_the_expected_torchrun_command(tmp_path):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-node-07\\ngpu-node-08\\n'\n")
    (stubs / "srun").write_text(
        f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {tmp_path}/srun_args\nenv > {tmp_path}/srun_env\n"
    )
    for f in stubs.iterdir():
        f.chmod(0o755)
    env = dict(
        os.environ,
        PATH=f"{stubs}:{os.environ['PATH']}",
        SLURM_JOB_NODELIST="gpu-node-[07-08]",
        SLURM_NNODES="2",
        SLURM_JOB_ID="4242",
        CONFIG="configs/llama3.1-70b_zero3_8nodes.json",
    )
    subprocess.run(
        ["bash", str(ROOT / "launch" / "cluster" / "slurm_gradpruner.sbatch")],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=30,
    )
    args = (tmp_path / "srun_args").read_text().split("\n")
    assert args[:2] == ["--kill-on-bad-exit=1", "torchrun"]
    cmd = " ".join(args)
    assert "--nnodes 2 --nproc_per_node 8" in cmd
    assert "--rdzv_endpoint gpu-node-07:29500" in cmd and "--rdzv_id 4242" in cmd
    assert (
        "launch/train.py --deepspeed --deepspeed_config configs/llama3.1-70b_zero3_8nodes.json --gradpruner"
        in cmd
    )
    srun_env = (tmp_path / "srun_env").read_text()
    assert "MASTER_ADDR=gpu-node-07" in srun_env and "NCCL_IB_HCA=mlx5" in srun_env
    assert (ROOT / "configs" / "llama3.1-70b_zero3_8nodes.json").exists()
