"""Real launches of the repository's scripts in their own process group, time-boxed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.ranks import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TIMEOUT = 150.0


def tool(name: str) -> str | None:
    """An executable from this interpreter's environment (the venv), else from PATH."""
    path = BIN / name
    return str(path) if path.is_file() else shutil.which(name)


def launch(cmd: list[str], timeout: float = TIMEOUT, expect_rc: int = 0) -> str:
    """Run ``cmd`` in the repo root; returns its combined output; fails on another exit code or timeout.

    The command runs in its own session and is killed as a whole process group when it exceeds its
    time box, so a hung rank can never hang CI."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
               MASTER_PORT=str(free_port()), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank it started
        out, _ = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-4000:]}")
    assert proc.returncode == expect_rc, f"exit code {proc.returncode}: {' '.join(cmd)}\n{out[-6000:]}"
    return out
