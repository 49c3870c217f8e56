"""Run a function on N real gloo ranks (forked processes that share the parent's imports)."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(fn: Callable[..., Any], rank: int, world: int, port: int, args: tuple, q: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    import faulthandler
    import signal
    import sys

    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    if os.environ.get("GRADPRUNER_TEST_DUMP_AFTER"):
        import faulthandler
        import sys

        faulthandler.dump_traceback_later(float(os.environ["GRADPRUNER_TEST_DUMP_AFTER"]), file=sys.stderr)
    try:
        import deepspeed

        from gradpruner_ds.backends.deepspeed import skip_cpu_shm_comm_build

        skip_cpu_shm_comm_build()
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        result = fn(rank, world, *args)
        q.put((rank, "ok", result))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        q.put((rank, "error", traceback.format_exc()))
    finally:
        os._exit(0)  # gloo threads can abort interpreter shutdown (platform.md)


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 240.0) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` ranks; returns the per-rank results (rank order).

    Raises AssertionError with the failing rank's traceback, or on timeout (the ranks are killed).
    """
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, args, q)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    import queue
    import time

    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                import signal

                for p in procs:  # show where the stuck ranks are before they are killed
                    if p.is_alive() and p.pid is not None:
                        os.kill(p.pid, signal.SIGUSR1)
                time.sleep(2.0)
                raise AssertionError(f"ranks timed out after {timeout}s; finished: {sorted(results)}")
            try:
                rank, status, payload = q.get(timeout=min(left, 5.0))
            except queue.Empty:
                if errors and all(not p.is_alive() or True for p in procs):
                    break
                continue
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"rank {rank}:\n{payload}")
                if len(errors) == 1:
                    deadline = min(deadline, time.monotonic() + 30.0)  # let the others report, then stop
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world)]
